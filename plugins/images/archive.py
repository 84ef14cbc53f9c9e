"""Import and export of image archives: the offline path.

Formats read (:func:`import_archive`), detected from the members, plain or
compressed (gzip, bzip2, xz) tar:

* **OCI image layout** (``oci-layout``, ``index.json``, ``blobs/<alg>/<hex>``),
  as ``ctr export``, ``skopeo copy oci-archive:``, ``docker save`` since 25
  and berth's own export write it. Each descriptor of ``index.json`` is an
  image, named by its ``io.containerd.image.name`` annotation, else by
  ``org.opencontainers.image.ref.name`` when that is a whole reference; a
  ref name that is only a tag (``latest``) is appended to the ``name``
  argument.
* **docker save** before 25 (``manifest.json`` = ``[{Config, RepoTags,
  Layers}]``, ``<id>/layer.tar``). There is no manifest in it: berth
  synthesises a Docker schema 2 manifest (Docker media types, layers as
  stored: ``rootfs.diff.tar``, or ``.tar.gzip`` when the bytes are gzip),
  so the image is stored exactly as a pull of it would store it. Images are
  named by their ``RepoTags``, normalised (``busybox:1`` ->
  ``docker.io/library/busybox:1``).

An image the archive does not name gets ``name``; more than one unnamed
image, or none named at all, is an InvalidArgument. The archive is read
once, front to back, in a worker thread (tar parsing blocks), so it may be
a pipe: every blob goes straight into the content store, verified against
the digest its path names (``blobs/``), or digested as it is written
(docker layers). Only small documents (JSON) are kept in memory. Member
names are never used as file system paths, so a malicious archive can at
worst name blobs that do not exist; the layers themselves go through the
applier's confinement when unpacked. Links between members (docker save
links identical layers) are followed within the archive.

Written (:func:`export_archive`): an OCI image layout tar, streamed, with
``index.json`` naming each image as containerd does (both annotations).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import inspect
import json
import os
import posixpath
import tarfile
import tempfile
import threading
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol, TypeVar, cast

import structlog

from daemon.errors import AlreadyExists, BerthError, FailedPrecondition, InvalidArgument, NotFound
from daemon.metadata.images import Image
from daemon.protocols import ByteStream, ContentStore, ContentWriter, Descriptor
from daemon.reference import check_digest, parse_reference
from plugins.images.blobs import (
    DOCKER_CONFIG,
    DOCKER_LAYER,
    DOCKER_LAYER_GZIP,
    READ_CHUNK,
    add_labels,
    choose_manifest,
    has_blob,
    index_labels,
    manifest_labels,
    read_blob,
    read_blob_if_present,
    store_blob,
)
from plugins.images.registry.manifests import (
    DOCKER_MANIFEST,
    OCI_INDEX,
    Index,
    Manifest,
    descriptor_from_json,
    parse,
)
from plugins.images.registry.platforms import Platform

log = structlog.get_logger("berth.images")

T = TypeVar("T")

ANNOTATION_REF_NAME = "org.opencontainers.image.ref.name"
ANNOTATION_IMAGE_NAME = "io.containerd.image.name"
OCI_LAYOUT_VERSION = "1.0.0"
DOCKER_LAYER_ZSTD = "application/vnd.docker.image.rootfs.diff.tar.zstd"

#: A member kept in memory (a JSON document) is at most this big ...
MAX_DOCUMENT = 4 << 20
#: ... and all of them together at most this.
MAX_DOCUMENTS = 64 << 20
#: Links followed from one member to the next at most.
MAX_LINKS = 16

_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


@dataclass(frozen=True)
class ImportedImage:
    name: str
    target: Descriptor


class ArchiveSink(Protocol):
    """Where an export goes when it is not a file: anything with an async ``write``."""

    async def write(self, data: bytes) -> None: ...


# -- the bridge between the tar thread and the loop ---------------------------------------


class _Bridge:
    """Lets the tar worker thread run coroutines on the loop, and stops it when asked."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.stopped = threading.Event()

    def run(self, coro: Awaitable[T], *, always: bool = False) -> T:
        """Run ``coro`` on the loop and wait; ``always``: even once stopped (cleanup)."""
        if self.stopped.is_set() and not always:
            if inspect.iscoroutine(coro):
                coro.close()
            raise _Stopped()
        fut: Future[T] = asyncio.run_coroutine_threadsafe(cast(Any, coro), self.loop)
        return fut.result()


class _Stopped(Exception):
    """The import was cancelled: the worker thread unwinds."""


class _AsyncReader:
    """A blocking ``read`` over an async byte stream: all tarfile's stream mode asks of a file."""

    def __init__(self, stream: ByteStream, bridge: _Bridge) -> None:
        self._stream = stream
        self._bridge = bridge

    def read(self, n: int = -1) -> bytes:
        return self._bridge.run(self._stream.read(n if n >= 0 else READ_CHUNK))


# -- import ---------------------------------------------------------------------------------


@dataclass
class _Member:
    """A member written to the content store: its digest, size and first bytes."""

    digest: str
    size: int
    head: bytes


@dataclass
class _Scan:
    documents: dict[str, bytes]
    members: dict[str, _Member]
    links: dict[str, str]

    def resolve(self, name: str) -> str:
        """Follow links from ``name`` to a regular member."""
        for _ in range(MAX_LINKS):
            target = self.links.get(name)
            if target is None:
                return name
            name = target
        raise InvalidArgument(f"archive: member {name!r}: more than {MAX_LINKS} links in a row")

    def document(self, name: str, what: str) -> bytes:
        path = self.resolve(_clean(name))
        data = self.documents.get(path)
        if data is None:
            raise InvalidArgument(
                f"archive: {what} {name!r}: no such file in the archive (or not a document)"
            )
        return data


def _clean(name: str) -> str:
    return posixpath.normpath("/" + name).lstrip("/")


def _blob_digest(name: str) -> str | None:
    """``blobs/sha256/<hex>`` -> ``sha256:<hex>`` (checked); None for any other member."""
    parts = name.split("/")
    if len(parts) != 3 or parts[0] != "blobs":
        return None
    digest = f"{parts[1]}:{parts[2]}"
    check_digest(digest, f"archive: member {name!r}")
    return digest


class _Scanner:
    """Reads the tar in the worker thread; content store calls hop to the loop."""

    def __init__(self, cs: ContentStore, bridge: _Bridge) -> None:
        self.cs = cs
        self.bridge = bridge
        self.scan = _Scan({}, {}, {})
        self._documents_size = 0

    def read(self, fileobj: IO[bytes]) -> _Scan:
        try:
            with tarfile.open(fileobj=fileobj, mode="r|*") as tf:
                for member in tf:
                    self._member(tf, member)
        except tarfile.TarError as exc:
            raise InvalidArgument(f"archive: not a valid tar archive: {exc}") from None
        except EOFError as exc:
            raise InvalidArgument(f"archive: truncated: {exc}") from None
        return self.scan

    def _member(self, tf: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        name = _clean(member.name)
        if member.issym() or member.islnk():
            base = posixpath.dirname(name) if member.issym() else ""
            target = member.linkname if member.islnk() else posixpath.join(base, member.linkname)
            self.scan.links[name] = _clean(target)
            return
        if not member.isfile():
            return
        fileobj = tf.extractfile(member)
        if fileobj is None:
            return
        digest = _blob_digest(name)
        if digest is None and member.size <= MAX_DOCUMENT and not name.endswith(".tar"):
            self._documents_size += member.size
            if self._documents_size > MAX_DOCUMENTS:
                raise InvalidArgument(
                    f"archive: more than {MAX_DOCUMENTS} bytes of small files (not an image)"
                )
            self.scan.documents[name] = fileobj.read()
            return
        self.scan.members[name] = self._store(name, fileobj, member.size, digest)

    def _store(self, name: str, fileobj: IO[bytes], size: int, digest: str | None) -> _Member:
        """Stream one member into the content store: verified against ``digest``, or digested."""
        run = self.bridge.run
        ref = f"import-{digest}" if digest else f"import-{hashlib.sha256(name.encode()).hexdigest()[:32]}"
        head = b""
        try:
            writer: ContentWriter | None = run(self.cs.writer(ref, size, digest or ""))
        except AlreadyExists:
            writer = None
        if writer is None or (digest and writer.offset == size):
            if writer is not None:
                self._commit(writer, size, digest or "", name)
            assert digest is not None
            return _Member(digest, size, fileobj.read(8))
        try:
            if writer.offset:
                run(writer.truncate(0))
            hasher = hashlib.new(digest.partition(":")[0] if digest else "sha256")
            while chunk := fileobj.read(READ_CHUNK):
                if not head:
                    head = chunk[:8]
                hasher.update(chunk)
                run(writer.write(chunk))
            actual = f"{hasher.name}:{hasher.hexdigest()}"
            if digest and actual != digest:
                run(writer.close(), always=True)
                run(_abort(self.cs, ref), always=True)
                raise FailedPrecondition(
                    f"archive: blob {digest}: digest mismatch: member {name!r} hashes to {actual}"
                )
            self._commit(writer, size, actual, name)
            return _Member(actual, size, head)
        finally:
            run(writer.close(), always=True)

    def _commit(self, writer: ContentWriter, size: int, digest: str, name: str) -> None:
        with contextlib.suppress(AlreadyExists):  # another namespace or import had it
            self.bridge.run(writer.commit(size, digest))


async def _abort(cs: ContentStore, ref: str) -> None:
    with contextlib.suppress(NotFound):
        await cs.abort(ref)


async def import_archive(
    cs: ContentStore, source: str | Path | IO[bytes] | ByteStream, *, name: str | None = None
) -> list[ImportedImage]:
    """Store an archive's blobs in ``cs`` (under the caller's lease) and say which images it holds.

    The blobs of each image get their ``gc.ref`` labels; nothing is
    recorded as an image here (the service does that, then unpacks).
    """
    loop = asyncio.get_running_loop()
    bridge = _Bridge(loop)

    def work() -> _Scan:
        scanner = _Scanner(cs, bridge)
        if isinstance(source, (str, Path)):
            try:
                with open(source, "rb") as f:
                    return scanner.read(f)
            except FileNotFoundError:
                raise NotFound(f"archive {str(source)!r}: no such file") from None
            except IsADirectoryError:
                raise InvalidArgument(f"archive {str(source)!r}: is a directory, not a tar file") from None
        read = getattr(source, "read", None)
        if read is not None and inspect.iscoroutinefunction(read):
            return scanner.read(cast(IO[bytes], _AsyncReader(cast(ByteStream, source), bridge)))
        return scanner.read(cast(IO[bytes], source))

    future = loop.run_in_executor(None, work)
    try:
        scan = await asyncio.shield(future)
    except asyncio.CancelledError:
        bridge.stopped.set()
        with contextlib.suppress(BaseException):
            await future  # the thread stops at its next content store call
        raise
    if "index.json" in scan.documents:
        images = await _oci_images(cs, scan, name)
    elif "manifest.json" in scan.documents:
        images = await _docker_images(cs, scan, name)
    else:
        raise InvalidArgument(
            "archive: neither an OCI image layout (no index.json) "
            "nor a docker save archive (no manifest.json)"
        )
    for image in images:
        await label_tree(cs, image.target, image.name)
    log.info("import.archive", images=[i.name for i in images], blobs=len(scan.members))
    return images


def _normalized(name: str) -> str:
    """``busybox:1`` -> ``docker.io/library/busybox:1``; a name that is no reference stays as it is."""
    try:
        return str(parse_reference(name))
    except BerthError:
        return name


def _name_for(annotations: dict[str, str], name: str | None) -> str | None:
    full = annotations.get(ANNOTATION_IMAGE_NAME)
    if full:
        return _normalized(full)
    ref = annotations.get(ANNOTATION_REF_NAME, "")
    if ref and ("/" in ref or ":" in ref):
        return _normalized(ref)
    if ref and name:
        last = name.rsplit("/", 1)[-1]
        return name if ":" in last or "@" in name else f"{name}:{ref}"
    return None


def _assign_names(found: list[tuple[str | None, Descriptor]], name: str | None) -> list[ImportedImage]:
    unnamed = [d for n, d in found if n is None]
    if unnamed and not name:
        raise InvalidArgument(
            f"archive: image {unnamed[0].digest} has no name in the archive: give the import a name"
        )
    if len(unnamed) > 1:
        raise InvalidArgument(
            f"archive: {len(unnamed)} images have no name in the archive; one name cannot name them all"
        )
    return [ImportedImage(n if n is not None else cast(str, name), d) for n, d in found]


async def _oci_images(cs: ContentStore, scan: _Scan, name: str | None) -> list[ImportedImage]:
    try:
        index = json.loads(scan.document("index.json", "index"))
    except ValueError as exc:
        raise InvalidArgument(f"archive: index.json: not valid JSON: {exc}") from None
    layout = scan.documents.get("oci-layout")
    if layout is None:
        log.info("import.no_oci_layout_file")
    manifests = index.get("manifests") if isinstance(index, dict) else None
    if not isinstance(manifests, list) or not manifests:
        raise InvalidArgument("archive: index.json: no manifests")
    found: list[tuple[str | None, Descriptor]] = []
    for i, item in enumerate(manifests):
        desc = descriptor_from_json(item, f"archive: index.json: manifests[{i}]")
        if not await has_blob(cs, desc.digest):
            raise InvalidArgument(f"archive: index.json names {desc.digest}, which the archive does not hold")
        found.append(
            (_name_for(dict(desc.annotations), name), Descriptor(desc.media_type, desc.digest, desc.size))
        )
    return _assign_names(found, name)


async def _docker_images(cs: ContentStore, scan: _Scan, name: str | None) -> list[ImportedImage]:
    try:
        entries = json.loads(scan.document("manifest.json", "manifest"))
    except ValueError as exc:
        raise InvalidArgument(f"archive: manifest.json: not valid JSON: {exc}") from None
    if not isinstance(entries, list) or not entries:
        raise InvalidArgument("archive: manifest.json: expected a non-empty list of images")
    images: list[ImportedImage] = []
    for i, entry in enumerate(entries):
        what = f"archive: manifest.json[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("Config"), str):
            raise InvalidArgument(f"{what}: expected an object with Config, RepoTags and Layers")
        layers = entry.get("Layers")
        if not isinstance(layers, list) or not all(isinstance(p, str) for p in layers):
            raise InvalidArgument(f"{what}: Layers: expected a list of paths")
        config_desc = await _docker_config(cs, scan, entry["Config"], what)
        layer_descs = [_docker_layer(scan, p, what) for p in layers]
        manifest = {
            "schemaVersion": 2,
            "mediaType": DOCKER_MANIFEST,
            "config": {
                "mediaType": config_desc.media_type,
                "size": config_desc.size,
                "digest": config_desc.digest,
            },
            "layers": [{"mediaType": d.media_type, "size": d.size, "digest": d.digest} for d in layer_descs],
        }
        data = json.dumps(manifest, separators=(",", ":")).encode()
        target = Descriptor(DOCKER_MANIFEST, "sha256:" + hashlib.sha256(data).hexdigest(), len(data))
        await store_blob(cs, f"manifest-{target.digest}", target, data)
        tags = entry.get("RepoTags") or []
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            raise InvalidArgument(f"{what}: RepoTags: expected a list of names")
        named = [str(parse_reference(t)) for t in tags]
        if not named:
            images.extend(_assign_names([(None, target)], name))
        images.extend(ImportedImage(n, target) for n in named)
    return images


async def _docker_config(cs: ContentStore, scan: _Scan, path: str, what: str) -> Descriptor:
    resolved = scan.resolve(_clean(path))
    member = scan.members.get(resolved)
    if member is not None:
        return Descriptor(DOCKER_CONFIG, member.digest, member.size)
    data = scan.document(path, f"{what}: Config")
    desc = Descriptor(DOCKER_CONFIG, "sha256:" + hashlib.sha256(data).hexdigest(), len(data))
    await store_blob(cs, f"config-{desc.digest}", desc, data)
    return desc


def _docker_layer(scan: _Scan, path: str, what: str) -> Descriptor:
    resolved = scan.resolve(_clean(path))
    member = scan.members.get(resolved)
    if member is None:
        raise InvalidArgument(f"{what}: layer {path!r}: no such tar file in the archive")
    if member.head.startswith(_GZIP_MAGIC):
        media_type = DOCKER_LAYER_GZIP
    elif member.head.startswith(_ZSTD_MAGIC):
        media_type = DOCKER_LAYER_ZSTD
    else:
        media_type = DOCKER_LAYER
    return Descriptor(media_type, member.digest, member.size)


async def label_tree(cs: ContentStore, target: Descriptor, image: str) -> None:
    """Give an image's blobs their gc.ref labels (index -> manifests present, manifest -> config, layers)."""
    doc = parse(await read_blob(cs, target, f"{image}: manifest {target.digest}"), target, image=image)
    manifests: list[tuple[Descriptor, Manifest]] = []
    if isinstance(doc, Index):
        children: list[tuple[int, Descriptor]] = []
        for i, entry in enumerate(doc.manifests):
            child_desc = entry.descriptor
            data = await read_blob_if_present(cs, child_desc, f"{image}: manifest {child_desc.digest}")
            if data is not None:
                children.append((i, child_desc))
                child = parse(data, child_desc, image=image)
                if isinstance(child, Manifest):
                    manifests.append((child_desc, child))
        await add_labels(cs, target.digest, index_labels(children))
    else:
        manifests.append((target, doc))
    for desc, manifest in manifests:
        await add_labels(cs, desc.digest, manifest_labels(manifest))


# -- export ---------------------------------------------------------------------------------


def _blob_path(digest: str) -> str:
    algorithm, _, hexpart = digest.partition(":")
    return f"blobs/{algorithm}/{hexpart}"


async def _collect(
    cs: ContentStore, image: Image, platform: Platform | None, out: dict[str, Descriptor]
) -> None:
    """Add the blobs of ``image`` to ``out`` (by digest): NotFound naming what the store lacks."""
    name = image.name

    def missing(desc: Descriptor, what: str) -> NotFound:
        return NotFound(f"{name}: {what} {desc.digest} is not in the content store (pull the image again)")

    async def present(desc: Descriptor, what: str) -> None:
        if not await has_blob(cs, desc.digest):
            raise missing(desc, what)
        out.setdefault(desc.digest, desc)

    async def document(desc: Descriptor) -> Manifest | Index:
        """A manifest or index read (one lookup) and recorded in ``out``."""
        data = await read_blob_if_present(cs, desc, f"{name}: manifest {desc.digest}")
        if data is None:
            raise missing(desc, "manifest")
        out.setdefault(desc.digest, desc)
        return parse(data, desc, image=name)

    target = image.target
    doc = await document(target)
    manifests: list[Descriptor] = []
    if isinstance(doc, Index):
        if platform is None:
            manifests = [e.descriptor for e in doc.manifests if await has_blob(cs, e.descriptor.digest)]
            if not manifests:
                raise NotFound(
                    f"{name}: none of the manifests of index {target.digest} is in the content store"
                )
        else:
            manifests = [choose_manifest(doc, platform, name)[1]]
    else:
        manifests = [target]
    for desc in manifests:
        manifest = await document(desc)
        if not isinstance(manifest, Manifest):
            raise InvalidArgument(f"{name}: manifest {desc.digest} is an index, expected a manifest")
        await present(manifest.config, "config")
        for layer in manifest.layers:
            await present(layer, "layer")


def export_index(images: Sequence[Image]) -> bytes:
    """``index.json`` for ``images``: their targets, named as containerd names them."""
    entries = []
    for image in images:
        annotations = {ANNOTATION_IMAGE_NAME: image.name}
        with contextlib.suppress(BerthError):
            ref = parse_reference(image.name)
            if ref.tag:
                annotations[ANNOTATION_REF_NAME] = ref.tag
        target = image.target
        entries.append(
            {
                "mediaType": target.media_type,
                "digest": target.digest,
                "size": target.size,
                "annotations": annotations,
            }
        )
    return json.dumps(
        {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}, indent=None
    ).encode()


class _TarWriter:
    """A tar stream written on the loop: headers from tarfile, data from the content store."""

    def __init__(self, write: Callable[[bytes], Awaitable[None]]) -> None:
        self._write = write
        self.size = 0

    async def _emit(self, data: bytes) -> None:
        if data:
            await self._write(data)
            self.size += len(data)

    async def directory(self, name: str) -> None:
        info = tarfile.TarInfo(name)
        info.type, info.mode = tarfile.DIRTYPE, 0o755
        await self._emit(info.tobuf(tarfile.PAX_FORMAT))

    async def file(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mode = len(data), 0o644
        await self._emit(info.tobuf(tarfile.PAX_FORMAT))
        await self._emit(data)
        await self._pad(len(data))

    async def blob(self, cs: ContentStore, desc: Descriptor) -> None:
        reader = await cs.reader(desc.digest)
        try:
            if reader.size != desc.size:
                raise FailedPrecondition(
                    f"blob {desc.digest}: {reader.size} bytes in the content store, {desc.size} expected"
                )
            info = tarfile.TarInfo(_blob_path(desc.digest))
            info.size, info.mode = desc.size, 0o644
            await self._emit(info.tobuf(tarfile.PAX_FORMAT))
            offset = 0
            while offset < desc.size:
                chunk = await reader.read_at(offset, min(READ_CHUNK, desc.size - offset))
                if not chunk:
                    raise FailedPrecondition(f"blob {desc.digest}: ends at byte {offset} of {desc.size}")
                await self._emit(chunk)
                offset += len(chunk)
        finally:
            await reader.close()
        await self._pad(desc.size)

    async def _pad(self, size: int) -> None:
        rest = size % tarfile.BLOCKSIZE
        if rest:
            await self._emit(tarfile.NUL * (tarfile.BLOCKSIZE - rest))

    async def finish(self) -> None:
        await self._emit(tarfile.NUL * (2 * tarfile.BLOCKSIZE))
        rest = self.size % tarfile.RECORDSIZE
        if rest:
            await self._emit(tarfile.NUL * (tarfile.RECORDSIZE - rest))


async def export_archive(
    cs: ContentStore,
    images: Sequence[Image],
    out: str | Path | IO[bytes] | ArchiveSink,
    *,
    platform: Platform | None,
) -> None:
    """Stream ``images`` as an OCI image layout tar (``platform`` None: every manifest present).

    A path is written as a temporary file renamed into place at the end, so
    a failed export leaves nothing half-written behind.
    """
    if not images:
        raise InvalidArgument("export: no images given")
    blobs: dict[str, Descriptor] = {}
    for image in images:
        await _collect(cs, image, platform, blobs)
    if isinstance(out, (str, Path)):
        await _export_to_path(cs, images, blobs, Path(out))
        return
    write = getattr(out, "write", None)
    if write is None:
        raise InvalidArgument(f"export: cannot write to {type(out).__name__}")
    if inspect.iscoroutinefunction(write):
        await _write_tar(cs, images, blobs, cast(ArchiveSink, out).write)
        return

    async def to_file(data: bytes) -> None:
        await asyncio.to_thread(cast(IO[bytes], out).write, data)

    await _write_tar(cs, images, blobs, to_file)


async def _export_to_path(
    cs: ContentStore, images: Sequence[Image], blobs: dict[str, Descriptor], path: Path
) -> None:
    directory = path.parent if str(path.parent) else Path(".")
    fd, tmp = await asyncio.to_thread(tempfile.mkstemp, prefix=f".{path.name}.", dir=directory)
    f = os.fdopen(fd, "wb")
    try:

        async def write(data: bytes) -> None:
            await asyncio.to_thread(f.write, data)

        await _write_tar(cs, images, blobs, write)
        await asyncio.to_thread(_flush_close, f)
        await asyncio.to_thread(os.replace, tmp, path)
    except BaseException:
        f.close()
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _flush_close(f: IO[bytes]) -> None:
    f.flush()
    os.fsync(f.fileno())
    f.close()


async def _write_tar(
    cs: ContentStore,
    images: Sequence[Image],
    blobs: dict[str, Descriptor],
    write: Callable[[bytes], Awaitable[None]],
) -> None:
    tar = _TarWriter(write)
    await tar.file("oci-layout", json.dumps({"imageLayoutVersion": OCI_LAYOUT_VERSION}).encode())
    await tar.file("index.json", export_index(images))
    await tar.directory("blobs")
    for algorithm in sorted({d.partition(":")[0] for d in blobs}):
        await tar.directory(f"blobs/{algorithm}")
    for digest in sorted(blobs):
        await tar.blob(cs, blobs[digest])
    await tar.finish()
