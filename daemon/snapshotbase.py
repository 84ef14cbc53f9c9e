"""The part of a directory-based snapshotter that does not depend on how it mounts.

Built on :mod:`daemon.snapshotstore` (records in :class:`MetaStore`, files in
:class:`SnapshotDirs`): a subclass supplies only what makes it what it is,

* ``_create(kind, key, parent, labels)``: make the record and the directory
  (a copy of the parent for ``native``, an empty upper dir for ``overlayfs``)
  and return its mounts;
* ``_mounts(snap)``: the mounts of an active or view snapshot,

and inherits stat, update, walk, usage, mounts, prepare, view, commit,
remove, cleanup and close with the semantics the conformance suite checks.
Set ``sync_remove = True`` to delete a snapshot's files during ``remove``
rather than at the next ``cleanup``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping, Sequence

import structlog

from daemon.errors import FailedPrecondition
from daemon.protocols import Kind, Mount, SnapshotInfo, Usage
from daemon.snapshotstore import MetaStore, Snapshot, SnapshotDirs, disk_usage

log = structlog.get_logger("berth.snapshots")


class StoredSnapshotter:
    """A :class:`daemon.protocols.Snapshotter` minus ``_create`` and ``_mounts``."""

    sync_remove: bool = False

    def __init__(self, store: MetaStore, dirs: SnapshotDirs) -> None:
        self._ms = store
        self._dirs = dirs

    # -- what a subclass provides ------------------------------------------------

    async def _create(
        self, kind: Kind, key: str, parent: str, labels: Mapping[str, str] | None
    ) -> list[Mount]:
        raise NotImplementedError

    def _mounts(self, snap: Snapshot) -> list[Mount]:
        raise NotImplementedError

    # -- reading ------------------------------------------------------------------

    async def stat(self, key: str) -> SnapshotInfo:
        return await self._ms.stat(key)

    async def update(self, info: SnapshotInfo, fieldpaths: Sequence[str] = ()) -> SnapshotInfo:
        return await self._ms.update(info, fieldpaths)

    async def walk(self, filters: Sequence[str] = ()) -> AsyncIterator[SnapshotInfo]:
        for info in await self._ms.walk(filters):
            yield info

    async def usage(self, key: str) -> Usage:
        """Recorded at commit for committed snapshots; measured now for the others."""
        snap = await self._ms.get(key)
        if snap.kind is Kind.COMMITTED:
            return snap.usage
        return await asyncio.to_thread(disk_usage, self._dirs.fs(snap.id))

    async def mounts(self, key: str) -> list[Mount]:
        return self._mounts(await self._ms.active_or_view(key))

    # -- writing ------------------------------------------------------------------

    async def prepare(
        self, key: str, parent: str = "", labels: Mapping[str, str] | None = None
    ) -> list[Mount]:
        return await self._create(Kind.ACTIVE, key, parent, labels)

    async def view(self, key: str, parent: str = "", labels: Mapping[str, str] | None = None) -> list[Mount]:
        return await self._create(Kind.VIEW, key, parent, labels)

    async def commit(self, name: str, key: str, labels: Mapping[str, str] | None = None) -> None:
        snap = await self._ms.get(key)
        if snap.kind is not Kind.ACTIVE:
            raise FailedPrecondition(
                f"commit {key!r}: snapshot is {snap.kind.name.lower()}; only active snapshots commit"
            )
        usage = await asyncio.to_thread(disk_usage, self._dirs.fs(snap.id))
        await self._ms.write(lambda tx: tx.commit_active(key, name, usage, labels))
        log.debug("snapshot.commit", key=key, name=name, id=snap.id, size=usage.size)

    async def remove(self, key: str) -> None:
        sid, _ = await self._ms.remove(key)
        log.debug("snapshot.remove", key=key, id=sid)
        if self.sync_remove:
            await self._dirs.cleanup(self._ms)

    async def cleanup(self) -> None:
        await self._dirs.cleanup(self._ms)

    async def close(self) -> None:
        await self._ms.close()


__all__ = ["StoredSnapshotter"]
