"""Image blobs in the content store: media types, gc labels, reading, writing, walking.

An image in berth is a tree of content: the image record names its root
(an index or a manifest); an index names manifests, a manifest names its
config and layers. What keeps that tree from garbage collection are
``containerd.io/gc.ref.*`` labels on each blob, written exactly as containerd
writes them::

    index     containerd.io/gc.ref.content.m.<i>        = <manifest digest>   (manifests pulled)
    manifest  containerd.io/gc.ref.content.config       = <config digest>
              containerd.io/gc.ref.content.l.<i>        = <layer digest>
    config    containerd.io/gc.ref.snapshot.<snapshotter> = <chain id of the top layer>  (once unpacked)

so that an image deleted, then collected, takes exactly its own blobs and
snapshots along, and an image still present keeps everything it needs.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from daemon.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from daemon.metadata.encoding import to_datetime
from daemon.metadata.gc import LABEL_GC_REF_CONTENT, LABEL_GC_REF_SNAPSHOT
from daemon.protocols import ContentInfo, ContentReader, ContentStore, Descriptor
from plugins.images.registry.manifests import (
    MAX_MANIFEST_SIZE,
    Index,
    Manifest,
    is_index,
    parse,
)
from plugins.images.registry.platforms import Platform, select_manifest

OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
CONFIG_TYPES = frozenset({OCI_CONFIG, DOCKER_CONFIG})

OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"

#: The layer media types an image may have (the applier detects compression from the bytes).
LAYER_TYPES = frozenset(
    {
        OCI_LAYER,
        OCI_LAYER_GZIP,
        "application/vnd.oci.image.layer.v1.tar+zstd",
        "application/vnd.oci.image.layer.nondistributable.v1.tar",
        "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
        "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
        DOCKER_LAYER,
        DOCKER_LAYER_GZIP,
        "application/vnd.docker.image.rootfs.diff.tar.zstd",
        "application/vnd.docker.image.rootfs.foreign.diff.tar",
        "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
    }
)

#: Largest image config read into memory (containerd refuses configs above 4 MiB too).
MAX_CONFIG_SIZE = MAX_MANIFEST_SIZE
#: Bytes read from the content store at a time.
READ_CHUNK = 1 << 20

_EPOCH = to_datetime(0)


def check_layer(image: str, desc: Descriptor) -> None:
    """InvalidArgument naming the image and layer unless ``desc`` is a layer type berth unpacks."""
    if desc.media_type not in LAYER_TYPES:
        raise InvalidArgument(
            f"{image}: layer {desc.digest}: unknown layer media type {desc.media_type!r} "
            "(not a container image layer; expected an OCI or Docker tar, tar+gzip or tar+zstd)"
        )


def check_config(image: str, desc: Descriptor) -> None:
    if desc.media_type not in CONFIG_TYPES:
        raise InvalidArgument(
            f"{image}: config {desc.digest}: unknown config media type {desc.media_type!r} "
            f"(not a container image; expected {OCI_CONFIG} or {DOCKER_CONFIG})"
        )


# -- image config ----------------------------------------------------------------


@dataclass(frozen=True)
class ImageConfig:
    """The parts of an image config berth needs; ``raw`` is the whole JSON document."""

    descriptor: Descriptor
    diff_ids: tuple[str, ...]
    raw: Mapping[str, Any]

    @property
    def platform(self) -> str:
        parts = (self.raw.get("os"), self.raw.get("architecture"), self.raw.get("variant"))
        return "/".join(str(p) for p in parts if p)


def parse_config(data: bytes, desc: Descriptor, image: str) -> ImageConfig:
    """The config ``data`` (verified against ``desc``): FailedPrecondition if it has no usable rootfs."""
    what = f"{image}: config {desc.digest}"
    try:
        doc = json.loads(data)
    except ValueError as exc:
        raise FailedPrecondition(f"{what}: not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise FailedPrecondition(f"{what}: expected a JSON object")
    rootfs = doc.get("rootfs")
    diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not isinstance(diff_ids, list) or not all(isinstance(d, str) for d in diff_ids):
        raise FailedPrecondition(f"{what}: rootfs.diff_ids: expected a list of digests")
    for d in diff_ids:
        algorithm, _, hexpart = d.partition(":")
        if algorithm != "sha256" or len(hexpart) != 64:
            raise FailedPrecondition(f"{what}: rootfs.diff_ids: {d!r} is not a sha256 digest")
    return ImageConfig(desc, tuple(diff_ids), doc)


def check_layers_match(
    image: str, manifest_digest: str, layers: Sequence[Descriptor], config: ImageConfig
) -> None:
    if len(layers) != len(config.diff_ids):
        raise FailedPrecondition(
            f"{image}: manifest {manifest_digest} lists {len(layers)} layers but config "
            f"{config.descriptor.digest} has {len(config.diff_ids)} diff ids"
        )


def chain_ids(diff_ids: Sequence[str]) -> list[str]:
    """OCI chain ids: ``chain(L0) = diff(L0)``, ``chain(Ln) = sha256(chain(Ln-1) + " " + diff(Ln))``."""
    out: list[str] = []
    for diff_id in diff_ids:
        if not out:
            out.append(diff_id)
        else:
            out.append("sha256:" + hashlib.sha256(f"{out[-1]} {diff_id}".encode()).hexdigest())
    return out


# -- gc labels ---------------------------------------------------------------------


def index_labels(children: Sequence[tuple[int, Descriptor]]) -> dict[str, str]:
    """Labels of an index keeping the manifests at the given positions."""
    return {f"{LABEL_GC_REF_CONTENT}.m.{i}": d.digest for i, d in children}


def manifest_labels(manifest: Manifest) -> dict[str, str]:
    labels = {f"{LABEL_GC_REF_CONTENT}.config": manifest.config.digest}
    labels.update({f"{LABEL_GC_REF_CONTENT}.l.{i}": d.digest for i, d in enumerate(manifest.layers)})
    return labels


def snapshot_label(snapshotter: str) -> str:
    """The config label naming the top snapshot of the image's chain in ``snapshotter``."""
    return f"{LABEL_GC_REF_SNAPSHOT}{snapshotter}"


# -- reading -----------------------------------------------------------------------


class ContentStream:
    """A committed blob as a :class:`daemon.protocols.ByteStream` (what the applier reads)."""

    def __init__(self, reader: ContentReader) -> None:
        self._reader = reader
        self._offset = 0

    async def read(self, n: int = -1) -> bytes:
        remaining = self._reader.size - self._offset
        if remaining <= 0:
            return b""
        want = remaining if n < 0 else min(n, remaining)
        data = await self._reader.read_at(self._offset, want)
        self._offset += len(data)
        return data

    async def close(self) -> None:
        await self._reader.close()


async def read_blob(
    cs: ContentStore, desc: Descriptor, what: str, max_size: int = MAX_MANIFEST_SIZE
) -> bytes:
    """A small blob, whole, checked against ``desc`` (size and digest) once more."""
    if desc.size > max_size:
        raise InvalidArgument(f"{what}: {desc.size} bytes, more than the {max_size} allowed")
    reader = await cs.reader(desc.digest)
    try:
        if reader.size != desc.size:
            raise FailedPrecondition(
                f"{what}: {reader.size} bytes in the content store, {desc.size} expected"
            )
        chunks: list[bytes] = []
        offset = 0
        while offset < reader.size:
            chunk = await reader.read_at(offset, min(READ_CHUNK, reader.size - offset))
            if not chunk:
                break
            chunks.append(chunk)
            offset += len(chunk)
    finally:
        await reader.close()
    data = b"".join(chunks)
    algorithm = desc.digest.partition(":")[0]
    actual = f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}"
    if actual != desc.digest:
        raise FailedPrecondition(
            f"{what}: content store holds {actual} under {desc.digest} (corrupt on disk)"
        )
    return data


async def read_blob_if_present(
    cs: ContentStore, desc: Descriptor, what: str, max_size: int = MAX_MANIFEST_SIZE
) -> bytes | None:
    """:func:`read_blob`, or None if the store lacks the blob (one lookup, not has_blob + read_blob)."""
    try:
        return await read_blob(cs, desc, what, max_size)
    except NotFound:
        return None


async def has_blob(cs: ContentStore, digest: str) -> bool:
    try:
        await cs.info(digest)
    except NotFound:
        return False
    return True


# -- writing -----------------------------------------------------------------------


async def store_blob(
    cs: ContentStore, ref: str, desc: Descriptor, data: bytes, labels: Mapping[str, str] | None = None
) -> None:
    """Commit ``data`` as ``desc`` (verified), or just add ``labels`` if the blob is already there."""
    labels = dict(labels or {})
    try:
        writer = await cs.writer(ref, desc.size, desc.digest)
    except AlreadyExists:
        await add_labels(cs, desc.digest, labels)
        return
    try:
        if writer.offset != desc.size:  # a shared blob reports itself whole: just commit it
            if writer.offset:
                await writer.truncate(0)
            await writer.write(data)
        await writer.commit(desc.size, desc.digest, labels)
    except AlreadyExists:
        await add_labels(cs, desc.digest, labels)
    finally:
        await writer.close()


async def add_labels(cs: ContentStore, digest: str, labels: Mapping[str, str]) -> None:
    """Set ``labels`` on a blob, leaving its other labels alone."""
    if not labels:
        return
    info = ContentInfo(digest, 0, _EPOCH, _EPOCH, dict(labels))
    await cs.update(info, [f"labels.{key}" for key in labels])


# -- walking -----------------------------------------------------------------------


@dataclass(frozen=True)
class LocalImage:
    """An image as the content store holds it, for one platform."""

    target: Descriptor
    manifest_descriptor: Descriptor
    manifest: Manifest
    config: ImageConfig
    #: for an index: (position, descriptor) of the chosen manifest
    index_child: tuple[int, Descriptor] | None = None

    @property
    def chain_ids(self) -> list[str]:
        return chain_ids(self.config.diff_ids)

    @property
    def size(self) -> int:
        """Bytes of the image's blobs for this platform (target, manifest, config, layers)."""
        total = self.manifest_descriptor.size + self.config.descriptor.size
        total += sum(layer.size for layer in self.manifest.layers)
        if self.index_child is not None:
            total += self.target.size
        return total


def choose_manifest(index: Index, platform: Platform | None, image: str) -> tuple[int, Descriptor]:
    """The position and descriptor of ``platform``'s manifest in ``index`` (NotFound if none)."""
    chosen = select_manifest(index.manifests, platform, image=image)
    for i, entry in enumerate(index.manifests):
        if entry.descriptor is chosen:
            if is_index(chosen.media_type):
                raise InvalidArgument(
                    f"{image}: index points at another index {chosen.digest}: "
                    "nested indexes are not supported"
                )
            return i, chosen
    raise NotFound(f"{image}: no manifest for platform {platform}")  # unreachable: chosen is an entry


async def local_image(
    cs: ContentStore, target: Descriptor, platform: Platform | None, image: str
) -> LocalImage:
    """Walk an image from its target in the content store: NotFound naming what is missing."""

    async def fetch(desc: Descriptor, what: str, max_size: int = MAX_MANIFEST_SIZE) -> bytes:
        try:
            return await read_blob(cs, desc, f"{image}: {what} {desc.digest}", max_size)
        except NotFound:
            raise NotFound(
                f"{image}: {what} {desc.digest} is not in the content store (pull or import the image again)"
            ) from None

    doc = parse(await fetch(target, "manifest"), target, image=image)
    child: tuple[int, Descriptor] | None = None
    manifest_desc = target
    if isinstance(doc, Index):
        child = choose_manifest(doc, platform, image)
        manifest_desc = child[1]
        doc = parse(await fetch(manifest_desc, "manifest"), manifest_desc, image=image)
        if not isinstance(doc, Manifest):
            raise InvalidArgument(
                f"{image}: manifest {manifest_desc.digest} is an index, expected a manifest"
            )
    check_config(image, doc.config)
    config = parse_config(await fetch(doc.config, "config", MAX_CONFIG_SIZE), doc.config, image)
    check_layers_match(image, manifest_desc.digest, doc.layers, config)
    return LocalImage(target, manifest_desc, doc, config, child)
