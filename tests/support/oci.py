"""Deterministic OCI test images built from Debian's busybox-static.

There is no network here, so every image a test pulls, imports or unpacks is
made by this module from the host's ``/bin/busybox`` and Python. Builds are
byte-for-byte reproducible (fixed mtimes, sorted tar entries, uid/gid 0, gzip
with mtime 0, JSON with sorted keys), so digests are stable across runs and a
test may assert exactly what berth stored.

The usual entry point is :func:`busybox_image`; :class:`Layer` builds any
other layer. The writers turn an :class:`Image` into an OCI image layout
directory (:func:`write_oci_layout`), an OCI archive (:func:`oci_archive`) or
a ``docker save`` archive (:func:`docker_save_archive`).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import random
import subprocess
import tarfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path, PurePosixPath
from typing import Any, Literal

import zstandard

# -- media types ---------------------------------------------------------------

OCI_LAYOUT_VERSION = "1.0.0"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"

ANNOTATION_REF_NAME = "org.opencontainers.image.ref.name"
ANNOTATION_CONTAINERD_NAME = "io.containerd.image.name"

Compression = Literal["none", "gzip", "zstd"]

#: Every file of every built image carries this mtime (2024-01-01T00:00:00Z).
FIXED_MTIME = 1704067200
FIXED_CREATED = "2024-01-01T00:00:00Z"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
BUSYBOX = Path("/bin/busybox")

#: After unpacking every layer of :func:`busybox_image`, these paths exist ...
BUSYBOX_PRESENT = (
    "bin/busybox",
    "bin/sh",
    "bin/ls",
    "etc/passwd",
    "etc/group",
    "etc/os-release",
    "data/hello.txt",
    "data/hello-link.txt",
    "opt/cache/fresh.txt",
    "tmp",
)
#: ... and these were removed by layer 3's whiteouts (plain and opaque).
BUSYBOX_ABSENT = ("data/remove-me.txt", "opt/cache/old-a.txt", "opt/cache/sub/old-b.txt")
#: Content of ``/data/hello.txt`` (and of its hard link ``/data/hello-link.txt``).
HELLO_TEXT = b"hello from berth\n"


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def chain_ids(diff_ids: Sequence[str]) -> list[str]:
    """OCI chain ids: ``chain(L0) = diff(L0)``, ``chain(Ln) = sha256(chain(Ln-1) + " " + diff(Ln))``."""
    out: list[str] = []
    for diff_id in diff_ids:
        out.append(diff_id if not out else sha256_digest(f"{out[-1]} {diff_id}".encode()))
    return out


def canonical_json(value: Any) -> bytes:
    """One byte string per value: sorted keys, no whitespace."""
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def compress(data: bytes, compression: Compression) -> bytes:
    """Deterministic compression: gzip with mtime 0, zstd with the content size in the frame."""
    if compression == "none":
        return data
    if compression == "gzip":
        return gzip.compress(data, compresslevel=6, mtime=0)
    if compression == "zstd":
        return zstandard.ZstdCompressor(level=3).compress(data)
    raise ValueError(f"compression: unknown {compression!r}")


def layer_media_type(compression: Compression, docker: bool = False) -> str:
    if docker:
        if compression == "zstd":
            raise ValueError("compression: Docker schema 2 has no zstd layer media type")
        return DOCKER_LAYER_GZIP if compression == "gzip" else DOCKER_LAYER
    return {"none": OCI_LAYER, "gzip": OCI_LAYER_GZIP, "zstd": OCI_LAYER_ZSTD}[compression]


# -- layers --------------------------------------------------------------------


@dataclass(frozen=True)
class _Entry:
    path: str
    type: bytes
    data: bytes = b""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    linkname: str = ""


class Layer:
    """A layer tarball built from declared entries, the same bytes every time.

    Paths are relative to the root (a leading ``/`` is dropped). Missing
    parent directories are added (mode 0755) so the tar unpacks anywhere.
    Entries are sorted by path, hard links last so their targets come first.
    Whiteouts follow the OCI spec: :meth:`whiteout` adds ``dir/.wh.name``,
    :meth:`opaque` adds ``dir/.wh..wh..opq``.
    """

    def __init__(self, mtime: int = FIXED_MTIME) -> None:
        self.mtime = mtime
        self._entries: dict[str, _Entry] = {}

    @staticmethod
    def _norm(path: str) -> str:
        norm = str(PurePosixPath("/", path).relative_to("/"))
        if norm in ("", ".") or ".." in PurePosixPath(norm).parts:
            raise ValueError(f"path: {path!r} is not a path inside the layer")
        return norm

    def _add(self, entry: _Entry) -> Layer:
        self._entries[entry.path] = entry
        return self

    def file(self, path: str, data: bytes | str, mode: int = 0o644, uid: int = 0, gid: int = 0) -> Layer:
        raw = data.encode() if isinstance(data, str) else data
        return self._add(_Entry(self._norm(path), tarfile.REGTYPE, raw, mode, uid, gid))

    def dir(self, path: str, mode: int = 0o755, uid: int = 0, gid: int = 0) -> Layer:
        return self._add(_Entry(self._norm(path), tarfile.DIRTYPE, mode=mode, uid=uid, gid=gid))

    def symlink(self, path: str, target: str) -> Layer:
        return self._add(_Entry(self._norm(path), tarfile.SYMTYPE, mode=0o777, linkname=target))

    def hardlink(self, path: str, target: str) -> Layer:
        """A hard link to ``target``, another regular file of this layer (or a lower one)."""
        return self._add(_Entry(self._norm(path), tarfile.LNKTYPE, linkname=self._norm(target)))

    def whiteout(self, path: str) -> Layer:
        """Delete ``path`` (file or directory) of the lower layers."""
        p = PurePosixPath(self._norm(path))
        return self.file(str(p.parent / f".wh.{p.name}"), b"")

    def opaque(self, path: str) -> Layer:
        """Hide everything the lower layers have under directory ``path``."""
        if self._norm(path) not in self._entries:
            self.dir(path)
        return self.file(str(PurePosixPath(self._norm(path)) / ".wh..wh..opq"), b"")

    def entries(self) -> list[str]:
        """Entry paths in tar order, implicit parents included."""
        return [e.path for e in self._ordered()]

    def _ordered(self) -> list[_Entry]:
        entries = dict(self._entries)
        for path in list(entries):
            for parent in PurePosixPath(path).parents:
                if str(parent) != "." and str(parent) not in entries:
                    entries[str(parent)] = _Entry(str(parent), tarfile.DIRTYPE, mode=0o755)
        ordered = sorted(entries.values(), key=lambda e: (e.type == tarfile.LNKTYPE, e.path))
        return ordered

    def tar(self) -> bytes:
        """The uncompressed layer (its sha256 is the layer's diff id)."""
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
            for e in self._ordered():
                info = tarfile.TarInfo(e.path)
                info.type = e.type
                info.mode = e.mode
                info.uid, info.gid = e.uid, e.gid
                info.uname = info.gname = ""
                info.mtime = self.mtime
                info.linkname = e.linkname
                if e.type == tarfile.REGTYPE:
                    info.size = len(e.data)
                    tf.addfile(info, io.BytesIO(e.data))
                else:
                    tf.addfile(info)
        return buf.getvalue()

    def build(self, compression: Compression = "gzip", docker: bool = False) -> LayerBlob:
        return LayerBlob.from_tar(self.tar(), compression, docker)


# -- built objects -------------------------------------------------------------


@dataclass(frozen=True)
class Blob:
    """Any content-addressed blob (config, manifest, index)."""

    media_type: str
    data: bytes = field(repr=False)

    @property
    def digest(self) -> str:
        return sha256_digest(self.data)

    @property
    def size(self) -> int:
        return len(self.data)

    def descriptor(self, **extra: Any) -> dict[str, Any]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size, **extra}


@dataclass(frozen=True)
class LayerBlob:
    """One layer as stored in a registry: the (maybe compressed) blob and its uncompressed tar."""

    media_type: str
    data: bytes = field(repr=False)
    tar: bytes = field(repr=False)
    compression: Compression
    digest: str
    diff_id: str

    @classmethod
    def from_tar(cls, tar: bytes, compression: Compression = "gzip", docker: bool = False) -> LayerBlob:
        data = compress(tar, compression)
        return cls(
            media_type=layer_media_type(compression, docker),
            data=data,
            tar=tar,
            compression=compression,
            digest=sha256_digest(data),
            diff_id=sha256_digest(tar),
        )

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def uncompressed_size(self) -> int:
        return len(self.tar)

    def descriptor(self) -> dict[str, Any]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size}


@dataclass(frozen=True)
class Platform:
    os: str = "linux"
    architecture: str = "amd64"
    variant: str = ""

    @classmethod
    def parse(cls, spec: str) -> Platform:
        """``linux/arm64/v8`` -> Platform('linux', 'arm64', 'v8')."""
        parts = spec.split("/")
        if len(parts) not in (2, 3):
            raise ValueError(f"platform: {spec!r} is not os/arch[/variant]")
        return cls(parts[0], parts[1], parts[2] if len(parts) == 3 else "")

    def to_json(self) -> dict[str, str]:
        out = {"architecture": self.architecture, "os": self.os}
        if self.variant:
            out["variant"] = self.variant
        return out

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)


@dataclass(frozen=True)
class Manifest:
    """One platform's image: manifest, config and layers, with every digest a test may assert."""

    platform: Platform
    manifest: Blob
    config: Blob
    layers: tuple[LayerBlob, ...]

    @property
    def digest(self) -> str:
        return self.manifest.digest

    @property
    def media_type(self) -> str:
        return self.manifest.media_type

    @property
    def diff_ids(self) -> list[str]:
        return [layer.diff_id for layer in self.layers]

    @property
    def chain_ids(self) -> list[str]:
        return chain_ids(self.diff_ids)

    @property
    def config_json(self) -> dict[str, Any]:
        value: dict[str, Any] = json.loads(self.config.data)
        return value

    def blobs(self) -> dict[str, Blob | LayerBlob]:
        out: dict[str, Blob | LayerBlob] = {self.config.digest: self.config}
        out.update((layer.digest, layer) for layer in self.layers)
        return out


@dataclass(frozen=True)
class Image:
    """What a test pushes, imports or pulls: one manifest, or an index over several.

    ``top`` is the manifest or the index a tag points at. ``manifests`` are
    the per-platform images (one when there is no index).
    """

    top: Blob
    manifests: tuple[Manifest, ...]

    @property
    def digest(self) -> str:
        return self.top.digest

    @property
    def media_type(self) -> str:
        return self.top.media_type

    @property
    def is_index(self) -> bool:
        return self.top.media_type in (OCI_INDEX, DOCKER_MANIFEST_LIST)

    def manifest_for(self, platform: str | Platform = "linux/amd64") -> Manifest:
        want = Platform.parse(platform) if isinstance(platform, str) else platform
        for m in self.manifests:
            if (m.platform.os, m.platform.architecture) == (want.os, want.architecture) and (
                not want.variant or want.variant == m.platform.variant
            ):
                return m
        raise KeyError(f"platform: no manifest for {want}")

    def blobs(self) -> dict[str, Blob | LayerBlob]:
        """Every blob reachable from ``top``, ``top`` included, by digest."""
        out: dict[str, Blob | LayerBlob] = {self.top.digest: self.top}
        for m in self.manifests:
            out[m.manifest.digest] = m.manifest
            out.update(m.blobs())
        return out


# -- assembling images -------------------------------------------------------------


def make_config(
    diff_ids: Sequence[str],
    platform: Platform,
    *,
    env: Sequence[str] = (f"PATH={DEFAULT_PATH}",),
    cmd: Sequence[str] = ("/bin/sh",),
    entrypoint: Sequence[str] | None = None,
    working_dir: str = "/",
    user: str = "",
    labels: Mapping[str, str] | None = None,
    history: Sequence[str] = (),
) -> bytes:
    """An image config (the same JSON shape for OCI and Docker)."""
    cfg: dict[str, Any] = {"Env": list(env), "Cmd": list(cmd), "WorkingDir": working_dir}
    if entrypoint is not None:
        cfg["Entrypoint"] = list(entrypoint)
    if user:
        cfg["User"] = user
    if labels:
        cfg["Labels"] = dict(labels)
    value: dict[str, Any] = {
        "created": FIXED_CREATED,
        **platform.to_json(),
        "config": cfg,
        "rootfs": {"type": "layers", "diff_ids": list(diff_ids)},
        "history": [{"created": FIXED_CREATED, "created_by": h} for h in history],
    }
    return canonical_json(value)


def make_manifest(
    layers: Sequence[LayerBlob],
    config: bytes,
    platform: Platform,
    docker: bool = False,
    annotations: Mapping[str, str] | None = None,
) -> Manifest:
    config_blob = Blob(DOCKER_CONFIG if docker else OCI_CONFIG, config)
    value: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": DOCKER_MANIFEST if docker else OCI_MANIFEST,
        "config": config_blob.descriptor(),
        "layers": [layer.descriptor() for layer in layers],
    }
    if annotations:
        value["annotations"] = dict(annotations)
    blob = Blob(value["mediaType"], canonical_json(value))
    return Manifest(platform, blob, config_blob, tuple(layers))


def make_index(manifests: Sequence[Manifest], docker: bool = False) -> Blob:
    media_type = DOCKER_MANIFEST_LIST if docker else OCI_INDEX
    value = {
        "schemaVersion": 2,
        "mediaType": media_type,
        "manifests": [m.manifest.descriptor(platform=m.platform.to_json()) for m in manifests],
    }
    return Blob(media_type, canonical_json(value))


def single(manifest: Manifest) -> Image:
    return Image(manifest.manifest, (manifest,))


def indexed(manifests: Sequence[Manifest], docker: bool = False) -> Image:
    return Image(make_index(manifests, docker), tuple(manifests))


# -- busybox -------------------------------------------------------------------


@cache
def _busybox() -> tuple[bytes, tuple[str, ...]]:
    data = BUSYBOX.read_bytes()
    listing = subprocess.run([str(BUSYBOX), "--list"], capture_output=True, text=True, check=True).stdout
    applets = tuple(sorted(a for a in listing.split() if a and "/" not in a and a != "busybox"))
    return data, applets


PASSWD = (
    "root:x:0:0:root:/root:/bin/sh\n"
    "app:x:1000:1000:app:/home/app:/bin/sh\n"
    "nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
)
GROUP = "root:x:0:\napp:x:1000:\nnogroup:x:65534:\n"
OS_RELEASE = 'NAME="berth test"\nID=berth-test\nVERSION_ID="1"\nPRETTY_NAME="berth test image (busybox)"\n'


def busybox_base_layer() -> Layer:
    """``/bin/busybox``, a symlink per applet, passwd/group (root, app 1000, nobody), ``/tmp``."""
    data, applets = _busybox()
    layer = Layer().file("bin/busybox", data, mode=0o755)
    for applet in applets:
        layer.symlink(f"bin/{applet}", "/bin/busybox")
    layer.file("etc/passwd", PASSWD).file("etc/group", GROUP)
    layer.dir("tmp", mode=0o1777).dir("root", mode=0o700).dir("home/app", mode=0o755, uid=1000, gid=1000)
    return layer


def _bulk(seed: int, n: int) -> bytes:
    """``n`` bytes, half seeded random (incompressible), half repetitive text."""
    rnd = random.Random(seed).randbytes(n // 2)
    text = (b"berth bulk data line %d\n" % seed) * (n // 40 + 1)
    return rnd + text[: n - len(rnd)]


def busybox_layers(
    compression: Compression | Sequence[Compression] = "gzip",
    *,
    docker: bool = False,
    bulk_bytes: int = 0,
) -> list[LayerBlob]:
    """The three busybox layers, plus two bulk layers when ``bulk_bytes`` > 0.

    1. busybox and its applets, passwd, group, /tmp;
    2. /etc/os-release, /data (hello.txt, remove-me.txt), /opt/cache (old-a, sub/old-b);
    3. whiteouts: /data/remove-me.txt (plain), /opt/cache (opaque) with a fresh file,
       and a hard link /data/hello-link.txt -> /data/hello.txt.

    ``bulk_bytes`` is spread over layers 2..5 as ``/bulk/<n>.bin`` files
    (half seeded random data, half compressible), for benchmarks.
    """
    layers = [
        busybox_base_layer(),
        Layer()
        .file("etc/os-release", OS_RELEASE)
        .file("data/hello.txt", HELLO_TEXT)
        .file("data/remove-me.txt", "this file is removed by a whiteout\n")
        .file("opt/cache/old-a.txt", "hidden by an opaque whiteout\n")
        .file("opt/cache/sub/old-b.txt", "hidden too\n"),
        Layer()
        .whiteout("data/remove-me.txt")
        .opaque("opt/cache")
        .file("opt/cache/fresh.txt", "after the opaque whiteout\n")
        .file("data/hello.txt", HELLO_TEXT)
        .hardlink("data/hello-link.txt", "data/hello.txt"),
    ]
    if bulk_bytes > 0:
        layers += [Layer(), Layer()]
        share = bulk_bytes // 4
        for i, layer in enumerate(layers[1:], start=2):
            layer.file(f"bulk/{i}.bin", _bulk(i, share))
    comps = [compression] * len(layers) if isinstance(compression, str) else list(compression)
    if len(comps) != len(layers):
        raise ValueError(f"compression: {len(comps)} given for {len(layers)} layers")
    return [layer.build(c, docker) for layer, c in zip(layers, comps, strict=True)]


def busybox_image(
    compression: Compression | Sequence[Compression] = "gzip",
    *,
    index: bool = False,
    docker: bool = False,
    bulk_bytes: int = 0,
    cmd: Sequence[str] = ("/bin/sh",),
    entrypoint: Sequence[str] | None = None,
    env: Sequence[str] = (f"PATH={DEFAULT_PATH}",),
    user: str = "",
    labels: Mapping[str, str] | None = None,
) -> Image:
    """The busybox test image (see :func:`busybox_layers` for its layers).

    ``compression`` is one value for every layer or one per layer, e.g.
    ``("gzip", "zstd", "none")``. ``index=True`` wraps linux/amd64 (the real
    one) and linux/arm64/v8 (same layers, its own config, so a distinct
    manifest) in an index. ``docker=True`` uses Docker schema 2 media types
    (manifest list, manifest, config, rootfs.diff.tar.gzip layers).
    ``bulk_bytes=48 << 20`` makes the ~50 MB five-layer benchmark image.
    """
    layers = busybox_layers(compression, docker=docker, bulk_bytes=bulk_bytes)
    history = [f"layer {i + 1}" for i in range(len(layers))]
    platforms = [Platform("linux", "amd64")] + ([Platform("linux", "arm64", "v8")] if index else [])
    manifests = [
        make_manifest(
            layers,
            make_config(
                [layer.diff_id for layer in layers],
                p,
                env=env,
                cmd=cmd,
                entrypoint=entrypoint,
                user=user,
                labels=labels,
                history=history,
            ),
            p,
            docker=docker,
        )
        for p in platforms
    ]
    return indexed(manifests, docker) if index else single(manifests[0])


def big_image(compression: Compression = "gzip", bulk_bytes: int = 48 << 20) -> Image:
    """~50 MB over five layers, for benchmarks of pull and unpack."""
    return busybox_image(compression, bulk_bytes=bulk_bytes)


# -- writers -------------------------------------------------------------------


def _tar_bytes(files: Iterable[tuple[str, bytes]]) -> bytes:
    """A deterministic tar of ``(path, data)`` pairs with their parent directories."""
    buf = io.BytesIO()
    seen: set[str] = set()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for path, data in files:
            for parent in reversed(PurePosixPath(path).parents):
                if str(parent) != "." and str(parent) not in seen:
                    seen.add(str(parent))
                    d = tarfile.TarInfo(str(parent))
                    d.type, d.mode, d.mtime = tarfile.DIRTYPE, 0o755, FIXED_MTIME
                    tf.addfile(d)
            info = tarfile.TarInfo(path)
            info.size, info.mode, info.mtime = len(data), 0o644, FIXED_MTIME
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def oci_layout_files(
    image: Image, ref_name: str | None = "latest", image_name: str | None = None
) -> list[tuple[str, bytes]]:
    """The files of an OCI image layout holding ``image``, sorted by path.

    ``index.json`` has one descriptor for ``image.top`` annotated with
    ``org.opencontainers.image.ref.name`` = ``ref_name`` (what ``skopeo
    oci:dir:ref`` and ``ctr import`` read) and, when given,
    ``io.containerd.image.name`` = ``image_name`` (what ``ctr export`` writes).
    """
    annotations: dict[str, str] = {}
    if ref_name is not None:
        annotations[ANNOTATION_REF_NAME] = ref_name
    if image_name is not None:
        annotations[ANNOTATION_CONTAINERD_NAME] = image_name
    extra = {"annotations": annotations} if annotations else {}
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [image.top.descriptor(**extra)]}
    files = [
        ("oci-layout", canonical_json({"imageLayoutVersion": OCI_LAYOUT_VERSION})),
        ("index.json", canonical_json(index)),
    ]
    files += [(f"blobs/sha256/{d.removeprefix('sha256:')}", b.data) for d, b in sorted(image.blobs().items())]
    return sorted(files)


def write_oci_layout(
    image: Image, directory: Path, ref_name: str | None = "latest", image_name: str | None = None
) -> Path:
    """Write ``image`` as an OCI image layout under ``directory`` (created if needed).

    Writing a second image into the same directory appends its descriptor to
    ``index.json`` (blobs are shared), as ``skopeo copy`` into a layout does.
    """
    directory.mkdir(parents=True, exist_ok=True)
    index_path = directory / "index.json"
    old: list[Any] = json.loads(index_path.read_bytes())["manifests"] if index_path.exists() else []
    for rel, data in oci_layout_files(image, ref_name, image_name):
        path = directory / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if rel == "index.json" and old:
            merged = json.loads(data)
            merged["manifests"] = old + merged["manifests"]
            data = canonical_json(merged)
        path.write_bytes(data)
    return directory


def oci_archive(
    image: Image, path: Path, ref_name: str | None = "latest", image_name: str | None = None
) -> Path:
    """Write ``image`` as an OCI archive: an uncompressed tar of its image layout."""
    path.write_bytes(_tar_bytes(oci_layout_files(image, ref_name, image_name)))
    return path


def docker_save_files(
    image: Image, repo_tag: str, platform: str = "linux/amd64", style: Literal["classic", "oci"] = "classic"
) -> list[tuple[str, bytes]]:
    """The files of a ``docker save`` archive of one platform of ``image``.

    ``classic`` (docker before 25): ``manifest.json`` = ``[{Config, RepoTags,
    Layers}]``, ``repositories``, ``<config hex>.json`` and per layer
    ``<id>/layer.tar`` (the *uncompressed* tar), ``<id>/VERSION``, ``<id>/json``.
    Layer ids are the hex of each layer's chain id: deterministic, though not
    the v1 ids docker would compute (importers only follow ``manifest.json``).

    ``oci`` (docker 25 and later): an OCI layout plus ``manifest.json`` and
    ``repositories`` whose paths point into ``blobs/sha256/``.
    """
    m = image.manifest_for(platform)
    repo, _, tag = repo_tag.rpartition(":")
    if not repo or "/" in tag:
        raise ValueError(f"repo_tag: {repo_tag!r} is not name:tag")
    if style == "oci":
        files = oci_layout_files(image, ref_name=tag, image_name=repo_tag)
        cfg_path = f"blobs/sha256/{m.config.digest.removeprefix('sha256:')}"
        layer_paths = [f"blobs/sha256/{layer.digest.removeprefix('sha256:')}" for layer in m.layers]
        top_id = m.layers[-1].digest.removeprefix("sha256:")
    else:
        cfg_path = m.config.digest.removeprefix("sha256:") + ".json"
        files = [(cfg_path, m.config.data)]
        layer_paths = []
        parent = ""
        for layer, chain in zip(m.layers, m.chain_ids, strict=True):
            lid = chain.removeprefix("sha256:")
            v1 = {"id": lid, "created": FIXED_CREATED, **({"parent": parent} if parent else {})}
            files += [
                (f"{lid}/VERSION", b"1.0"),
                (f"{lid}/json", canonical_json(v1)),
                (f"{lid}/layer.tar", layer.tar),
            ]
            layer_paths.append(f"{lid}/layer.tar")
            parent = lid
        top_id = parent
    manifest = [{"Config": cfg_path, "RepoTags": [repo_tag], "Layers": layer_paths}]
    files += [
        ("manifest.json", canonical_json(manifest)),
        ("repositories", canonical_json({repo: {tag: top_id}})),
    ]
    return sorted(files)


def docker_save_archive(
    image: Image,
    path: Path,
    repo_tag: str,
    platform: str = "linux/amd64",
    style: Literal["classic", "oci"] = "classic",
) -> Path:
    """Write a ``docker save`` tar of ``image`` (see :func:`docker_save_files`)."""
    path.write_bytes(_tar_bytes(docker_save_files(image, repo_tag, platform, style)))
    return path


def read_tar_members(data: bytes) -> dict[str, tarfile.TarInfo]:
    """Members of a tar (compressed or not) by name, for assertions."""
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    elif data[:4] == b"\x28\xb5\x2f\xfd":
        data = zstandard.ZstdDecompressor().decompressobj().decompress(data)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tf:
        return {m.name: m for m in tf.getmembers()}
