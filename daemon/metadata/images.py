"""Images: a name in a namespace pointing at a target descriptor (containerd's images.Store).

An image record is small on purpose: a name (a reference such as
``docker.io/library/busybox:latest``), the descriptor of its root blob
(an index or a manifest), labels, and the target's annotations. Everything
else the image needs (manifests, configs, layers, the unpacked snapshot
chain) is reached from the target through ``containerd.io/gc.ref.*`` labels
on content, which is how garbage collection keeps it (:mod:`daemon.metadata.gc`).
Deleting an image only drops the record; the blobs go with the next GC.

Like :class:`~daemon.metadata.NamespaceStore`, each method exists as a
coroutine running its own transaction and as a synchronous ``*_tx`` method
for use inside :meth:`MetadataStore.write`.
"""

from __future__ import annotations

import builtins
import sqlite3
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

import structlog

from daemon import filters
from daemon.errors import AlreadyExists, InvalidArgument, NotFound
from daemon.metadata.encoding import decode_labels, encode_labels, now_ns, to_datetime
from daemon.metadata.namespaces import apply_label_mask
from daemon.metadata.validate import quote, require_namespace, validate_digest, validate_labels
from daemon.protocols import Descriptor

if TYPE_CHECKING:
    from daemon.metadata.store import MetadataStore

log = structlog.get_logger("berth.metadata")

#: Longest image name, ingest ref or snapshot key accepted, in characters.
NAME_MAX_LENGTH = 4096

EPOCH = to_datetime(0)

_COLUMNS = (
    "name, target_media_type, target_digest, target_size, target_annotations, labels, created_at, updated_at"
)


@dataclass
class Image:
    """An image record. ``created_at``/``updated_at`` are set by the store (ignored on create)."""

    name: str
    target: Descriptor
    labels: dict[str, str] = field(default_factory=dict)
    created_at: datetime = EPOCH
    updated_at: datetime = EPOCH


def validate_name(
    field: str, value: object, *, spaces: bool = False, max_length: int = NAME_MAX_LENGTH
) -> str:
    """A free-form name (image reference, ingest ref, snapshot key): not an identifier.

    Non-empty, at most ``max_length`` characters, no control characters,
    and no whitespace unless ``spaces`` (containerd's unpack keys such as
    ``extract-123 sha256:...`` contain a space).
    """
    if not isinstance(value, str):
        raise InvalidArgument(f"{field}: must be a string, not {type(value).__name__}")
    if not value:
        raise InvalidArgument(f"{field}: must not be empty")
    if len(value) > max_length:
        raise InvalidArgument(f"{field} {quote(value)}: longer than {max_length} characters")
    for ch in value:
        if unicodedata.category(ch).startswith("C") or (ch.isspace() and not (spaces and ch == " ")):
            what = "control characters" if spaces else "whitespace or control characters"
            raise InvalidArgument(f"{field} {quote(value)}: must not contain {what}")
    return value


def validate_image_name(name: object) -> str:
    """An image name is a reference (``docker.io/library/busybox:latest``), not an identifier."""
    return validate_name("image name", name)


def validate_target(owner: str, target: Descriptor) -> Descriptor:
    """The fields containerd checks on a target: digest, a positive size, a media type."""
    if not isinstance(target, Descriptor):
        raise InvalidArgument(f"{owner}: target: must be a Descriptor, not {type(target).__name__}")
    validate_digest(f"{owner}: target.digest", target.digest)
    if not isinstance(target.size, int) or target.size <= 0:
        raise InvalidArgument(f"{owner}: target.size must be greater than zero, not {target.size!r}")
    if not isinstance(target.media_type, str) or not target.media_type:
        raise InvalidArgument(f"{owner}: target.media_type must be set")
    annotations = validate_labels(f"{owner}: target annotations", target.annotations)
    return Descriptor(target.media_type, target.digest, target.size, annotations)


def _owner(name: str) -> str:
    return f"image {quote(name)}"


def _image(row: tuple[Any, ...]) -> Image:
    name, media_type, digest, size, annotations, labels, created, updated = row
    target = Descriptor(media_type, digest, int(size), decode_labels(annotations))
    return Image(name, target, decode_labels(labels), to_datetime(created), to_datetime(updated))


def adapt_image(image: Image) -> filters.Adaptor:
    """containerd's image filter fields: name, target.digest, target.mediatype, labels.*, annotations.*."""
    return filters.adapt_mapping(
        {
            "name": image.name,
            "target": {"digest": image.target.digest, "mediatype": image.target.media_type},
            "labels": image.labels,
            "annotations": dict(image.target.annotations),
        }
    )


def _apply_annotation_mask(
    owner: str, current: Mapping[str, str], new: Mapping[str, str], path: str
) -> dict[str, str]:
    if path == "annotations":
        return dict(new)
    key = path[len("annotations.") :]
    if not key:
        raise InvalidArgument(f"{owner}: update path {quote(path)}: empty annotation key")
    result = dict(current)
    if new.get(key, ""):
        result[key] = new[key]
    else:
        result.pop(key, None)
    return result


class ImageStore:
    """Create, read, update, delete and list the images of a namespace.

    ``on_delete`` (settable) is called after every successful delete: wire it
    to :meth:`daemon.metadata.gc.GCScheduler.request` so that the image's
    blobs are collected soon.
    """

    def __init__(self, store: MetadataStore, *, on_delete: Callable[[], None] | None = None) -> None:
        self._store = store
        self.on_delete = on_delete

    # -- async API --------------------------------------------------------------

    async def create(self, namespace: str, image: Image) -> Image:
        """Record ``image`` (creating the namespace if needed); AlreadyExists if the name is taken."""
        created = await self._store.write(lambda conn: self.create_tx(conn, namespace, image))
        log.info("image.create", namespace=namespace, name=image.name, digest=created.target.digest)
        return created

    async def get(self, namespace: str, name: str) -> Image:
        """NotFound if ``name`` is not an image of ``namespace``."""
        return await self._store.read(lambda conn: self.get_tx(conn, namespace, name))

    async def list(self, namespace: str, filters: Sequence[str] = ()) -> builtins.list[Image]:
        """The images of ``namespace`` matching ``filters`` (containerd syntax), sorted by name."""
        return await self._store.read(lambda conn: self.list_tx(conn, namespace, filters))

    async def update(self, namespace: str, image: Image, fieldpaths: Sequence[str] = ()) -> Image:
        """Change an image under a field mask.

        Paths: ``labels``, ``labels.<key>``, ``target`` (replaced as a
        whole), ``annotations``, ``annotations.<key>`` (the target's). No
        paths: labels and target are replaced by ``image``'s. Anything else is
        InvalidArgument; a missing image NotFound.
        """
        updated = await self._store.write(lambda conn: self.update_tx(conn, namespace, image, fieldpaths))
        log.info("image.update", namespace=namespace, name=image.name, paths=list(fieldpaths))
        return updated

    async def delete(self, namespace: str, name: str, *, target_digest: str = "") -> None:
        """Drop the record; NotFound if missing, or if ``target_digest`` is given and differs.

        The target check lets a client delete "this image, as long as it
        still points where I think" (containerd's ``DeleteTarget``).
        """
        await self._store.write(lambda conn: self.delete_tx(conn, namespace, name, target_digest))
        log.info("image.delete", namespace=namespace, name=name)
        if self.on_delete is not None:
            self.on_delete()

    # -- synchronous API ------------------------------------------------------

    def create_tx(self, conn: sqlite3.Connection, namespace: str, image: Image) -> Image:
        require_namespace(namespace)
        name = validate_image_name(image.name)
        target = validate_target(_owner(name), image.target)
        labels = validate_labels(_owner(name), image.labels)
        self._store.namespaces.ensure(conn, namespace)
        now = now_ns()
        cur = conn.execute(
            f"INSERT INTO images (namespace, {_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (namespace, name) DO NOTHING",
            (
                namespace,
                name,
                target.media_type,
                target.digest,
                target.size,
                encode_labels(target.annotations),
                encode_labels(labels),
                now,
                now,
            ),
        )
        if cur.rowcount == 0:
            raise AlreadyExists(f"{_owner(name)}: already exists")
        return Image(name, target, labels, to_datetime(now), to_datetime(now))

    def get_tx(self, conn: sqlite3.Connection, namespace: str, name: str) -> Image:
        require_namespace(namespace)
        row = conn.execute(
            f"SELECT {_COLUMNS} FROM images WHERE namespace = ? AND name = ?", (namespace, name)
        ).fetchone()
        if row is None:
            raise NotFound(f"{_owner(name)}: not found")
        return _image(row)

    def list_tx(
        self, conn: sqlite3.Connection, namespace: str, filters_: Sequence[str] = ()
    ) -> builtins.list[Image]:
        require_namespace(namespace)
        matcher = filters.parse(filters_)
        rows = conn.execute(
            f"SELECT {_COLUMNS} FROM images WHERE namespace = ? ORDER BY name", (namespace,)
        ).fetchall()
        return [image for image in map(_image, rows) if matcher.match(adapt_image(image))]

    def update_tx(
        self, conn: sqlite3.Connection, namespace: str, image: Image, fieldpaths: Sequence[str] = ()
    ) -> Image:
        require_namespace(namespace)
        if not image.name:
            raise InvalidArgument("image name is required for update")
        owner = _owner(image.name)
        if isinstance(fieldpaths, str):
            raise InvalidArgument(f"{owner}: update paths must be a list of strings, not a string")
        current = self.get_tx(conn, namespace, image.name)
        labels, target = current.labels, current.target
        annotations = dict(target.annotations)
        if not fieldpaths:
            labels = apply_label_mask(owner, labels, image.labels, ["labels"])
            target = image.target
            annotations = dict(image.target.annotations)
        for path in fieldpaths:
            if path == "labels" or path.startswith("labels."):
                labels = apply_label_mask(owner, labels, image.labels, [path])
            elif path == "target":
                target = image.target
                annotations = dict(image.target.annotations)
            elif path == "annotations" or path.startswith("annotations."):
                annotations = _apply_annotation_mask(owner, annotations, image.target.annotations, path)
            else:
                raise InvalidArgument(f"{owner}: cannot update {quote(path)} field")
        target = validate_target(
            owner, Descriptor(target.media_type, target.digest, target.size, annotations)
        )
        now = now_ns()
        conn.execute(
            "UPDATE images SET target_media_type = ?, target_digest = ?, target_size = ?,"
            " target_annotations = ?, labels = ?, updated_at = ? WHERE namespace = ? AND name = ?",
            (
                target.media_type,
                target.digest,
                target.size,
                encode_labels(target.annotations),
                encode_labels(labels),
                now,
                namespace,
                image.name,
            ),
        )
        return Image(image.name, target, labels, current.created_at, to_datetime(now))

    def delete_tx(self, conn: sqlite3.Connection, namespace: str, name: str, target_digest: str = "") -> None:
        require_namespace(namespace)
        if target_digest:
            current = self.get_tx(conn, namespace, name)
            if current.target.digest != target_digest:
                raise NotFound(f"{_owner(name)}: has target {current.target.digest}, not {target_digest}")
        cur = conn.execute("DELETE FROM images WHERE namespace = ? AND name = ?", (namespace, name))
        if cur.rowcount == 0:
            raise NotFound(f"{_owner(name)}: not found")
