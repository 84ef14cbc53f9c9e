"""Containers: metadata records of what a task will run (containerd's containers.Store).

A container is only a record: an id in a namespace, the runtime to use,
the OCI spec, the image it came from and the snapshot that will be its
root filesystem. Nothing runs and nothing is mounted here. The spec,
runtime options and extensions are protobuf ``Any`` values that berth
stores as :class:`TypedValue` (type URL and bytes) without decoding them,
so a client may put any message there and read back exactly what it wrote.

A container keeps its snapshot (``snapshotter`` + ``snapshot_key``) and
whatever its ``containerd.io/gc.ref.*`` labels name alive through
:func:`container_roots`, a garbage-collection root provider that
:class:`~daemon.metadata.MetadataDB` installs.

Validation follows containerd's ``validateContainer``: the id is an
identifier, ``runtime.name`` and ``spec`` are required, a snapshot key needs
a snapshotter, extension names are non-empty. The image is free-form and
optional (sandbox containers have none). Like the other stores, each method
exists as a coroutine running its own transaction and as a synchronous
``*_tx`` method for use inside :meth:`MetadataStore.write`.
"""

from __future__ import annotations

import base64
import builtins
import json
import sqlite3
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import TYPE_CHECKING, Any

import structlog

from daemon import filters
from daemon.errors import AlreadyExists, InvalidArgument, NotFound
from daemon.metadata.encoding import decode_labels, encode_labels, now_ns, to_datetime
from daemon.metadata.gc import SNAPSHOT, Node, label_refs
from daemon.metadata.namespaces import apply_label_mask
from daemon.metadata.validate import quote, require_namespace, validate_identifier, validate_labels

if TYPE_CHECKING:
    from daemon.metadata.store import MetadataStore

log = structlog.get_logger("berth.metadata")

EPOCH = to_datetime(0)

#: The paths an update without a field mask replaces (containerd's list).
FULL_UPDATE_PATHS = ("labels", "spec", "extensions", "image", "snapshotkey")

_COLUMNS = (
    "id, labels, image, runtime_name, runtime_options_type, runtime_options_value, spec_type, spec_value,"
    " snapshotter, snapshot_key, extensions, sandbox, created_at, updated_at"
)


@dataclass(frozen=True)
class TypedValue:
    """A protobuf ``Any`` as stored: the type URL and the serialized message, opaque to berth."""

    type_url: str
    value: bytes = b""


@dataclass(frozen=True)
class Runtime:
    """The runtime that will run the container's tasks (``io.containerd.runc.v2``) and its options."""

    name: str
    options: TypedValue | None = None


@dataclass
class Container:
    """A container record. ``created_at``/``updated_at`` are set by the store (ignored on create)."""

    id: str
    runtime: Runtime
    spec: TypedValue | None = None
    image: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    snapshotter: str = ""
    snapshot_key: str = ""
    extensions: dict[str, TypedValue] = field(default_factory=dict)
    sandbox: str = ""
    created_at: datetime = EPOCH
    updated_at: datetime = EPOCH


def _owner(id_: str) -> str:
    return f"container {quote(id_)}"


def _check_str(owner: str, name: str, value: object) -> str:
    if not isinstance(value, str):
        raise InvalidArgument(f"{owner}: {name}: must be a string, not {type(value).__name__}")
    if "\x00" in value:
        raise InvalidArgument(f"{owner}: {name}: must not contain NUL characters")
    return value


def _check_typed(owner: str, name: str, value: object) -> TypedValue:
    if not isinstance(value, TypedValue):
        raise InvalidArgument(f"{owner}: {name}: must be a TypedValue, not {type(value).__name__}")
    _check_str(owner, f"{name}.type_url", value.type_url)
    if not isinstance(value.value, bytes):
        raise InvalidArgument(f"{owner}: {name}.value: must be bytes, not {type(value.value).__name__}")
    return value


def validate_container(container: Container) -> Container:
    """containerd's ``validateContainer``; returns a copy with normalized labels and extensions."""
    if not isinstance(container, Container):
        raise InvalidArgument(f"container: must be a Container, not {type(container).__name__}")
    id_ = validate_identifier("container.id", container.id)
    owner = _owner(id_)
    labels = validate_labels(owner, container.labels)
    extensions: dict[str, TypedValue] = {}
    for key, value in dict(container.extensions).items():
        if not isinstance(key, str) or not key:
            raise InvalidArgument(f"{owner}: extension names must not be empty")
        extensions[key] = _check_typed(owner, f"extensions[{quote(key)}]", value)
    runtime = container.runtime
    if not isinstance(runtime, Runtime) or not _check_str(owner, "runtime.name", runtime.name):
        raise InvalidArgument(f"{owner}: must specify a runtime name")
    if runtime.options is not None:
        _check_typed(owner, "runtime.options", runtime.options)
    if container.spec is None:
        raise InvalidArgument(f"{owner}: spec must be set")
    _check_typed(owner, "spec", container.spec)
    _check_str(owner, "image", container.image)
    _check_str(owner, "snapshotter", container.snapshotter)
    _check_str(owner, "snapshot_key", container.snapshot_key)
    _check_str(owner, "sandbox", container.sandbox)
    if container.snapshot_key and not container.snapshotter:
        raise InvalidArgument(f"{owner}: snapshotter must be set if snapshot_key is set")
    return replace(container, labels=labels, extensions=extensions)


def _encode_extensions(extensions: Mapping[str, TypedValue]) -> str:
    return json.dumps(
        {
            k: {"type_url": v.type_url, "value": base64.b64encode(v.value).decode()}
            for k, v in extensions.items()
        },
        sort_keys=True,
        separators=(",", ":"),
    )


def _decode_extensions(text: str) -> dict[str, TypedValue]:
    raw = json.loads(text) if text else {}
    return {str(k): TypedValue(str(v["type_url"]), base64.b64decode(v["value"])) for k, v in raw.items()}


def _typed(type_url: str | None, value: bytes | None) -> TypedValue | None:
    return None if type_url is None else TypedValue(type_url, bytes(value or b""))


def _row(namespace: str, c: Container, created: int, updated: int) -> tuple[Any, ...]:
    options = c.runtime.options
    spec = c.spec
    return (
        namespace,
        c.id,
        encode_labels(c.labels),
        c.image,
        c.runtime.name,
        None if options is None else options.type_url,
        None if options is None else options.value,
        None if spec is None else spec.type_url,
        None if spec is None else spec.value,
        c.snapshotter,
        c.snapshot_key,
        _encode_extensions(c.extensions),
        c.sandbox,
        created,
        updated,
    )


def _container(row: tuple[Any, ...]) -> Container:
    (id_, labels, image, rt_name, rt_type, rt_value, spec_type, spec_value) = row[:8]
    snapshotter, snapshot_key, extensions, sandbox, created, updated = row[8:]
    return Container(
        id=id_,
        runtime=Runtime(rt_name, _typed(rt_type, rt_value)),
        spec=_typed(spec_type, spec_value),
        image=image,
        labels=decode_labels(labels),
        snapshotter=snapshotter,
        snapshot_key=snapshot_key,
        extensions=_decode_extensions(extensions),
        sandbox=sandbox,
        created_at=to_datetime(created),
        updated_at=to_datetime(updated),
    )


def adapt_container(container: Container) -> filters.Adaptor:
    """Filter fields: containerd's ``id``, ``image``, ``runtime.name``, ``labels.*``, plus ``snapshotter``."""
    return filters.adapt_mapping(
        {
            "id": container.id,
            "image": container.image,
            "runtime": {"name": container.runtime.name},
            "labels": container.labels,
            "snapshotter": container.snapshotter,
        }
    )


def container_roots(conn: sqlite3.Connection, now: int) -> Iterable[Node]:
    """GC roots: each container's snapshot and the objects its ``gc.ref`` labels name."""
    for namespace, labels, snapshotter, key in conn.execute(
        "SELECT namespace, labels, snapshotter, snapshot_key FROM containers"
    ):
        if snapshotter and key:
            yield Node(SNAPSHOT, namespace, f"{snapshotter}/{key}")
        yield from label_refs(namespace, decode_labels(labels))


class ContainerStore:
    """Create, read, update, delete and list the containers of a namespace.

    ``on_delete`` (settable) is called after every successful delete: wire
    it to the GC scheduler so that a snapshot only the container kept goes.
    """

    def __init__(self, store: MetadataStore, *, on_delete: Callable[[], None] | None = None) -> None:
        self._store = store
        self.on_delete = on_delete

    # -- async API --------------------------------------------------------------

    async def create(self, namespace: str, container: Container) -> Container:
        """Record ``container`` (creating the namespace if needed); AlreadyExists if the id is taken."""
        created = await self._store.write(lambda conn: self.create_tx(conn, namespace, container))
        log.info("container.create", namespace=namespace, id=created.id, image=created.image)
        return created

    async def get(self, namespace: str, id_: str) -> Container:
        """NotFound if ``id_`` is not a container of ``namespace``."""
        return await self._store.read(lambda conn: self.get_tx(conn, namespace, id_))

    async def list(self, namespace: str, filters: Sequence[str] = ()) -> builtins.list[Container]:
        """The containers of ``namespace`` matching ``filters`` (containerd syntax), sorted by id."""
        return await self._store.read(lambda conn: self.list_tx(conn, namespace, filters))

    async def update(self, namespace: str, container: Container, fieldpaths: Sequence[str] = ()) -> Container:
        """Change a container under a field mask, as containerd does.

        Paths: ``labels``, ``labels.<key>``, ``spec``, ``extensions``,
        ``extensions.<key>``, ``image``, ``snapshotkey``; anything else is
        InvalidArgument. No paths: all of these are replaced, and a
        different ``runtime.name`` or ``snapshotter`` is InvalidArgument
        (both are immutable). A missing container is NotFound.
        """
        updated = await self._store.write(lambda conn: self.update_tx(conn, namespace, container, fieldpaths))
        log.info("container.update", namespace=namespace, id=updated.id, paths=builtins.list(fieldpaths))
        return updated

    async def delete(self, namespace: str, id_: str) -> None:
        """Drop the record; NotFound if missing. What only it kept goes with the next GC."""
        await self._store.write(lambda conn: self.delete_tx(conn, namespace, id_))
        log.info("container.delete", namespace=namespace, id=id_)
        if self.on_delete is not None:
            self.on_delete()

    # -- synchronous API ------------------------------------------------------

    def create_tx(self, conn: sqlite3.Connection, namespace: str, container: Container) -> Container:
        require_namespace(namespace)
        checked = validate_container(container)
        self._store.namespaces.ensure(conn, namespace)
        now = now_ns()
        cur = conn.execute(
            f"INSERT INTO containers (namespace, {_COLUMNS}) VALUES ({', '.join('?' * 15)})"
            " ON CONFLICT (namespace, id) DO NOTHING",
            _row(namespace, checked, now, now),
        )
        if cur.rowcount == 0:
            raise AlreadyExists(f"{_owner(checked.id)}: already exists")
        return replace(checked, created_at=to_datetime(now), updated_at=to_datetime(now))

    def get_tx(self, conn: sqlite3.Connection, namespace: str, id_: str) -> Container:
        require_namespace(namespace)
        row = conn.execute(
            f"SELECT {_COLUMNS} FROM containers WHERE namespace = ? AND id = ?", (namespace, id_)
        ).fetchone()
        if row is None:
            raise NotFound(f"{_owner(id_)} in namespace {quote(namespace)}: not found")
        return _container(row)

    def list_tx(
        self, conn: sqlite3.Connection, namespace: str, filters_: Sequence[str] = ()
    ) -> builtins.list[Container]:
        require_namespace(namespace)
        matcher = filters.parse(filters_)
        rows = conn.execute(
            f"SELECT {_COLUMNS} FROM containers WHERE namespace = ? ORDER BY id", (namespace,)
        ).fetchall()
        return [c for c in map(_container, rows) if matcher.match(adapt_container(c))]

    def update_tx(
        self, conn: sqlite3.Connection, namespace: str, container: Container, fieldpaths: Sequence[str] = ()
    ) -> Container:
        require_namespace(namespace)
        if not container.id:
            raise InvalidArgument("container.id: must be set for update")
        owner = _owner(container.id)
        if isinstance(fieldpaths, str):
            raise InvalidArgument(f"{owner}: update paths must be a list of strings, not a string")
        current = self.get_tx(conn, namespace, container.id)
        paths = builtins.list(fieldpaths)
        if not paths:
            paths = builtins.list(FULL_UPDATE_PATHS)
            if container.runtime.name != current.runtime.name:
                raise InvalidArgument(f"{owner}: runtime.name field is immutable")
            if container.snapshotter != current.snapshotter:
                raise InvalidArgument(f"{owner}: snapshotter field is immutable")
        updated = replace(current, labels=dict(current.labels), extensions=dict(current.extensions))
        for path in paths:
            if path == "labels" or path.startswith("labels."):
                updated.labels = apply_label_mask(owner, updated.labels, container.labels, [path])
            elif path == "extensions":
                updated.extensions = dict(container.extensions)
            elif path.startswith("extensions."):
                key = path[len("extensions.") :]
                if not key:
                    raise InvalidArgument(f"{owner}: update path {quote(path)}: empty extension name")
                if key in container.extensions:
                    updated.extensions[key] = container.extensions[key]
                else:
                    updated.extensions.pop(key, None)
            elif path == "spec":
                updated.spec = container.spec
            elif path == "image":
                updated.image = container.image
            elif path == "snapshotkey":
                updated.snapshot_key = container.snapshot_key
            else:
                raise InvalidArgument(f"{owner}: cannot update {quote(path)} field")
        checked = validate_container(updated)
        now = now_ns()
        conn.execute(
            "UPDATE containers SET labels = ?, image = ?, spec_type = ?, spec_value = ?, snapshot_key = ?,"
            " extensions = ?, updated_at = ? WHERE namespace = ? AND id = ?",
            (
                encode_labels(checked.labels),
                checked.image,
                None if checked.spec is None else checked.spec.type_url,
                None if checked.spec is None else checked.spec.value,
                checked.snapshot_key,
                _encode_extensions(checked.extensions),
                now,
                namespace,
                checked.id,
            ),
        )
        return replace(checked, updated_at=to_datetime(now))

    def delete_tx(self, conn: sqlite3.Connection, namespace: str, id_: str) -> None:
        require_namespace(namespace)
        cur = conn.execute("DELETE FROM containers WHERE namespace = ? AND id = ?", (namespace, id_))
        if cur.rowcount == 0:
            raise NotFound(f"{_owner(id_)} in namespace {quote(namespace)}: not found")
