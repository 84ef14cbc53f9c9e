"""Snapshots scoped by namespace: containerd's metadata snapshotter.

A snapshotter backend (``berth.snapshotter.v1``: overlayfs, native, a
third-party one) keeps one flat key space and knows nothing of namespaces.
This layer gives every namespace its own keys, keeps the labels, and maps
each (namespace, key) to a backend key ``<ns>/<n>/<key>`` that is unique
forever (``n`` comes from a counter that never repeats)::

    sn = NamespacedSnapshotter(store, "overlayfs", backend)
    mounts = await sn.prepare("k8s.io", "extract-1 sha256:...", parent="", lease="pull-1")
    await sn.commit("k8s.io", "sha256:<chainid>", "extract-1 sha256:...")
    view = sn.namespace("k8s.io", lease="pull-1")   # a daemon.protocols.Snapshotter

Rules, as containerd's:

* Keys are per namespace; the same key in two namespaces is two snapshots.
  A parent is resolved in the caller's namespace only (a parent that lives
  in another namespace is NotFound) and must be committed.
* ``commit`` renames the record: the active key disappears, the committed
  name appears with the same parent; leases holding the key now hold the
  name (and ``lease``, if given, holds it too).
* ``remove`` refuses a snapshot that still has children (FailedPrecondition)
  and drops the *record* only: the backend snapshot is removed by the next
  garbage collection, which removes every backend snapshot no record names
  (children first) and then calls the backend's ``cleanup``. ``on_remove``
  is called after each remove so a :class:`~daemon.metadata.gc.GCScheduler`
  can run one soon.
* ``stat``, ``walk`` and ``update`` answer from the metadata records;
  ``mounts`` and ``usage`` ask the backend. Labels live here; those under
  ``containerd.io/snapshot/`` are also passed to the backend on
  prepare/view/commit (remote snapshotters read them).

Consistency with GC: from reserving a backend key to committing the record
that names it, :attr:`NamespacedSnapshotter.sweep_lock` is held shared, so
the backend sweep never sees a snapshot between the two. A crash in that
window leaves an unrecorded backend snapshot: garbage for GC.
"""

from __future__ import annotations

import asyncio
import builtins
import sqlite3
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog

from daemon import filters
from daemon.errors import AlreadyExists, BerthError, FailedPrecondition, InvalidArgument, NotFound
from daemon.metadata.encoding import decode_labels, encode_labels, now_ns, to_datetime
from daemon.metadata.gc import SweepLock, hold_tx, move_holds_tx, next_sequence, release_tx
from daemon.metadata.images import validate_name
from daemon.metadata.namespaces import apply_label_mask
from daemon.metadata.validate import quote, require_namespace, validate_identifier, validate_labels
from daemon.protocols import Kind, Mount, SnapshotInfo, Snapshotter, Usage

if TYPE_CHECKING:
    from daemon.metadata.store import MetadataStore

log = structlog.get_logger("berth.metadata")

#: Labels under this prefix are handed to the backend too (containerd's inherited labels).
INHERITED_LABEL_PREFIX = "containerd.io/snapshot/"

_KIND_NAMES = {Kind.ACTIVE: "active", Kind.VIEW: "view", Kind.COMMITTED: "committed"}
_COLUMNS = "key, backend_key, parent, kind, labels, created_at, updated_at"
_INSERT = f"INSERT INTO snapshots (namespace, snapshotter, {_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"


@dataclass(frozen=True)
class _Record:
    info: SnapshotInfo
    backend_key: str


def _owner(key: str) -> str:
    return f"snapshot {quote(key)}"


def _record(row: tuple[Any, ...]) -> _Record:
    key, backend_key, parent, kind, labels, created, updated = row
    info = SnapshotInfo(
        Kind(kind), key, parent or "", decode_labels(labels), to_datetime(created), to_datetime(updated)
    )
    return _Record(info, backend_key)


def _inherited(labels: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in labels.items() if k.startswith(INHERITED_LABEL_PREFIX)}


def adapt_snapshot(info: SnapshotInfo) -> filters.Adaptor:
    """containerd's snapshot filter fields: kind (active/view/committed), name, parent, labels.<key>."""

    def adaptor(fieldpath: Sequence[str]) -> tuple[str, bool]:
        if not fieldpath:
            return "", False
        head = fieldpath[0]
        if head == "kind":
            name = _KIND_NAMES.get(info.kind)
            return (name, True) if name else ("", False)
        if head == "name":
            return info.name, True
        if head == "parent":
            return info.parent, True
        if head == "labels":
            key = ".".join(fieldpath[1:])
            return (info.labels[key], True) if key in info.labels else ("", False)
        return "", False

    return adaptor


class NamespacedSnapshotter:
    """One snapshotter backend, scoped by namespace; every method takes the namespace first.

    :meth:`namespace` returns a :class:`SnapshotterView` bound to one
    namespace (and lease), implementing :class:`daemon.protocols.Snapshotter`.
    """

    def __init__(
        self,
        store: MetadataStore,
        name: str,
        backend: Snapshotter,
        *,
        on_remove: Callable[[], None] | None = None,
    ) -> None:
        self.store = store
        self.name = validate_identifier("snapshotter", name)
        self.backend = backend
        self.sweep_lock = SweepLock()
        self.on_remove = on_remove
        self._lease_type = f"snapshots/{name}"
        self._commits = asyncio.Lock()  # commit checks, then renames: one at a time

    def namespace(self, namespace: str, lease: str = "") -> SnapshotterView:
        require_namespace(namespace)
        return SnapshotterView(self, namespace, lease)

    # -- reading ----------------------------------------------------------------

    async def stat(self, namespace: str, key: str) -> SnapshotInfo:
        """NotFound unless ``namespace`` has snapshot ``key`` in this snapshotter."""
        require_namespace(namespace)
        return (await self.store.read(lambda conn: self._get_tx(conn, namespace, key))).info

    async def walk(self, namespace: str, filters_: Sequence[str] = ()) -> AsyncIterator[SnapshotInfo]:
        """The namespace's snapshots matching ``filters_`` (containerd syntax), sorted by key."""
        require_namespace(namespace)
        matcher = filters.parse(filters_)
        rows = await self.store.read(
            lambda conn: conn.execute(
                f"SELECT {_COLUMNS} FROM snapshots WHERE namespace = ? AND snapshotter = ? ORDER BY key",
                (namespace, self.name),
            ).fetchall()
        )
        for row in rows:
            info = _record(row).info
            if matcher.match(adapt_snapshot(info)):
                yield info

    async def mounts(self, namespace: str, key: str) -> list[Mount]:
        return await self.backend.mounts(await self._backend_key(namespace, key))

    async def usage(self, namespace: str, key: str) -> Usage:
        return await self.backend.usage(await self._backend_key(namespace, key))

    # -- changing ----------------------------------------------------------------

    async def update(
        self, namespace: str, info: SnapshotInfo, fieldpaths: Sequence[str] = ()
    ) -> SnapshotInfo:
        """Change labels only (``labels``, ``labels.<key>``; none = all labels)."""
        require_namespace(namespace)
        if not info.name:
            raise InvalidArgument("snapshot name is required for update")

        def tx(conn: sqlite3.Connection) -> SnapshotInfo:
            current = self._get_tx(conn, namespace, info.name).info
            labels = apply_label_mask(_owner(info.name), current.labels, info.labels, fieldpaths)
            now = now_ns()
            conn.execute(
                "UPDATE snapshots SET labels = ?, updated_at = ?"
                " WHERE namespace = ? AND snapshotter = ? AND key = ?",
                (encode_labels(labels), now, namespace, self.name, info.name),
            )
            current.labels = labels
            current.updated_at = to_datetime(now)
            return current

        return await self.store.write(tx)

    async def prepare(
        self,
        namespace: str,
        key: str,
        parent: str = "",
        labels: Mapping[str, str] | None = None,
        *,
        lease: str = "",
    ) -> list[Mount]:
        """An ACTIVE snapshot ``key`` on top of committed ``parent`` (or empty); its mounts.

        AlreadyExists if the namespace has ``key`` (the existing one is then
        added to ``lease``, as containerd does); NotFound for a missing parent.
        """
        return await self._create(namespace, key, parent, labels, lease, Kind.ACTIVE)

    async def view(
        self,
        namespace: str,
        key: str,
        parent: str = "",
        labels: Mapping[str, str] | None = None,
        *,
        lease: str = "",
    ) -> list[Mount]:
        """A read-only VIEW of ``parent``; errors as :meth:`prepare`."""
        return await self._create(namespace, key, parent, labels, lease, Kind.VIEW)

    async def commit(
        self,
        namespace: str,
        name: str,
        key: str,
        labels: Mapping[str, str] | None = None,
        *,
        lease: str = "",
    ) -> None:
        """Freeze ACTIVE ``key`` as COMMITTED ``name`` (same parent); ``key`` is gone after.

        AlreadyExists if ``name`` exists (it is then added to ``lease``),
        NotFound for a missing ``key``, FailedPrecondition if ``key`` is a VIEW
        or committed.
        """
        require_namespace(namespace)
        validate_name("snapshot name", name, spaces=True)
        validate_name("snapshot key", key, spaces=True)
        clean = validate_labels(_owner(name), labels or {})

        def reserve(conn: sqlite3.Connection) -> tuple[_Record, str] | None:
            if self._find_tx(conn, namespace, name) is not None:
                hold_tx(conn, namespace, lease, self._lease_type, name)
                return None
            active = self._get_tx(conn, namespace, key)
            if active.info.kind is not Kind.ACTIVE:
                kind = _KIND_NAMES.get(active.info.kind, "unknown")
                raise FailedPrecondition(
                    f"{_owner(key)}: is a {kind} snapshot; only active snapshots can be committed"
                )
            return active, self._new_backend_key(conn, namespace, name)

        def record(conn: sqlite3.Connection, active: _Record, backend_name: str) -> None:
            current = self._find_tx(conn, namespace, key)
            if current is None or current.backend_key != active.backend_key:
                raise NotFound(f"{_owner(key)}: removed while being committed")
            now = now_ns()
            conn.execute(
                _INSERT,
                (
                    namespace,
                    self.name,
                    name,
                    backend_name,
                    active.info.parent or None,
                    int(Kind.COMMITTED),
                    encode_labels(clean),
                    now,
                    now,
                ),
            )
            conn.execute(
                "DELETE FROM snapshots WHERE namespace = ? AND snapshotter = ? AND key = ?",
                (namespace, self.name, key),
            )
            move_holds_tx(conn, namespace, (self._lease_type, key), (self._lease_type, name))
            hold_tx(conn, namespace, lease, self._lease_type, name)

        async with self.sweep_lock.shared(), self._commits:
            reserved = await self.store.write(reserve)
            if reserved is None:
                raise AlreadyExists(f"{_owner(name)}: already exists")
            active, backend_name = reserved
            await self.backend.commit(backend_name, active.backend_key, _inherited(clean))
            try:
                await self.store.write(lambda conn: record(conn, active, backend_name))
            except Exception as exc:
                # the backend committed, the record did not: GC removes the orphan
                log.error(
                    "snapshot.commit.unrecorded", snapshotter=self.name, key=key, name=name, error=str(exc)
                )
                raise
        log.info("snapshot.commit", namespace=namespace, snapshotter=self.name, key=key, name=name)

    async def remove(self, namespace: str, key: str) -> None:
        """Drop the record (FailedPrecondition while it has children); the backend goes with GC."""
        require_namespace(namespace)

        def tx(conn: sqlite3.Connection) -> None:
            self._get_tx(conn, namespace, key)
            child = conn.execute(
                "SELECT key FROM snapshots WHERE namespace = ? AND snapshotter = ? AND parent = ? LIMIT 1",
                (namespace, self.name, key),
            ).fetchone()
            if child is not None:
                raise FailedPrecondition(
                    f"{_owner(key)}: cannot remove a snapshot with children (child {quote(child[0])})"
                )
            conn.execute(
                "DELETE FROM snapshots WHERE namespace = ? AND snapshotter = ? AND key = ?",
                (namespace, self.name, key),
            )
            release_tx(conn, namespace, self._lease_type, key)

        await self.store.write(tx)
        log.info("snapshot.remove", namespace=namespace, snapshotter=self.name, key=key)
        if self.on_remove is not None:
            self.on_remove()

    async def cleanup(self) -> None:
        """The backend's cleanup (on-disk leftovers of removed snapshots)."""
        await self.backend.cleanup()

    # -- internals ----------------------------------------------------------------

    async def _create(
        self,
        namespace: str,
        key: str,
        parent: str,
        labels: Mapping[str, str] | None,
        lease: str,
        kind: Kind,
    ) -> list[Mount]:
        require_namespace(namespace)
        validate_name("snapshot key", key, spaces=True)
        if parent:
            validate_name("parent", parent, spaces=True)
        clean = validate_labels(_owner(key), labels or {})

        def reserve(conn: sqlite3.Connection) -> tuple[str, str] | None:
            if self._find_tx(conn, namespace, key) is not None:
                hold_tx(conn, namespace, lease, self._lease_type, key)
                return None
            backend_parent = self._parent_tx(conn, namespace, parent)
            return self._new_backend_key(conn, namespace, key), backend_parent

        def record(conn: sqlite3.Connection, backend_key: str, backend_parent: str) -> None:
            self.store.namespaces.ensure(conn, namespace)
            if self._parent_tx(conn, namespace, parent) != backend_parent:
                raise NotFound(f"parent snapshot {quote(parent)}: replaced while preparing {quote(key)}")
            now = now_ns()
            cur = conn.execute(
                _INSERT + " ON CONFLICT DO NOTHING",
                (
                    namespace,
                    self.name,
                    key,
                    backend_key,
                    parent or None,
                    int(kind),
                    encode_labels(clean),
                    now,
                    now,
                ),
            )
            if cur.rowcount == 0:
                raise AlreadyExists(f"{_owner(key)}: already exists")
            hold_tx(conn, namespace, lease, self._lease_type, key)

        async with self.sweep_lock.shared():
            reserved = await self.store.write(reserve)
            if reserved is None:
                raise AlreadyExists(f"{_owner(key)}: already exists")
            backend_key, backend_parent = reserved
            create = self.backend.view if kind is Kind.VIEW else self.backend.prepare
            mounts = await create(backend_key, backend_parent, _inherited(clean))
            try:
                await self.store.write(lambda conn: record(conn, backend_key, backend_parent))
            except asyncio.CancelledError:
                raise  # the record may still commit in the store's thread: leave any orphan to GC
            except Exception:
                await self._discard(backend_key)
                raise
        log.info(
            "snapshot.create",
            namespace=namespace,
            snapshotter=self.name,
            key=key,
            parent=parent,
            kind=_KIND_NAMES[kind],
        )
        return mounts

    async def _discard(self, backend_key: str) -> None:
        try:
            await self.backend.remove(backend_key)
        except BerthError as exc:
            log.warning(
                "snapshot.discard_failed", snapshotter=self.name, backend_key=backend_key, error=str(exc)
            )

    def _new_backend_key(self, conn: sqlite3.Connection, namespace: str, key: str) -> str:
        return f"{namespace}/{next_sequence(conn, self._lease_type)}/{key}"

    def _find_tx(self, conn: sqlite3.Connection, namespace: str, key: str) -> _Record | None:
        row = conn.execute(
            f"SELECT {_COLUMNS} FROM snapshots WHERE namespace = ? AND snapshotter = ? AND key = ?",
            (namespace, self.name, key),
        ).fetchone()
        return None if row is None else _record(row)

    def _get_tx(self, conn: sqlite3.Connection, namespace: str, key: str) -> _Record:
        found = self._find_tx(conn, namespace, key)
        if found is None:
            raise NotFound(f"{_owner(key)}: not found")
        return found

    def _parent_tx(self, conn: sqlite3.Connection, namespace: str, parent: str) -> str:
        """The backend key of committed ``parent`` in ``namespace`` ("" for none)."""
        if not parent:
            return ""
        found = self._find_tx(conn, namespace, parent)
        if found is None:
            raise NotFound(f"parent snapshot {quote(parent)}: not found")
        if found.info.kind is not Kind.COMMITTED:
            raise FailedPrecondition(f"parent snapshot {quote(parent)}: is not committed")
        return found.backend_key

    async def _backend_key(self, namespace: str, key: str) -> str:
        require_namespace(namespace)
        record = await self.store.read(lambda conn: self._get_tx(conn, namespace, key))
        return record.backend_key


class SnapshotterView:
    """:class:`NamespacedSnapshotter` bound to one namespace (and lease): a ``Snapshotter``.

    ``close`` does nothing: the backend belongs to its plugin.
    """

    def __init__(self, snapshotter: NamespacedSnapshotter, namespace: str, lease: str = "") -> None:
        self.snapshotter = snapshotter
        self.namespace = namespace
        self.lease = lease

    async def stat(self, key: str) -> SnapshotInfo:
        return await self.snapshotter.stat(self.namespace, key)

    async def update(self, info: SnapshotInfo, fieldpaths: Sequence[str] = ()) -> SnapshotInfo:
        return await self.snapshotter.update(self.namespace, info, fieldpaths)

    async def usage(self, key: str) -> Usage:
        return await self.snapshotter.usage(self.namespace, key)

    async def mounts(self, key: str) -> builtins.list[Mount]:
        return await self.snapshotter.mounts(self.namespace, key)

    async def prepare(
        self, key: str, parent: str = "", labels: Mapping[str, str] | None = None
    ) -> builtins.list[Mount]:
        return await self.snapshotter.prepare(self.namespace, key, parent, labels, lease=self.lease)

    async def view(
        self, key: str, parent: str = "", labels: Mapping[str, str] | None = None
    ) -> builtins.list[Mount]:
        return await self.snapshotter.view(self.namespace, key, parent, labels, lease=self.lease)

    async def commit(self, name: str, key: str, labels: Mapping[str, str] | None = None) -> None:
        await self.snapshotter.commit(self.namespace, name, key, labels, lease=self.lease)

    async def remove(self, key: str) -> None:
        await self.snapshotter.remove(self.namespace, key)

    def walk(self, filters: Sequence[str] = ()) -> AsyncIterator[SnapshotInfo]:
        return self.snapshotter.walk(self.namespace, filters)

    async def cleanup(self) -> None:
        await self.snapshotter.cleanup()

    async def close(self) -> None:
        return None
