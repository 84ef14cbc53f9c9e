"""The overlayfs snapshotter: each snapshot one directory, stacked by the kernel's overlay.

Layout (:class:`daemon.snapshotstore.SnapshotDirs`)::

    <root>/metadata.db            records: key -> id, kind, parent, labels, usage
    <root>/snapshots/<id>/fs      the snapshot's own files (its "upper" while active)
    <root>/snapshots/<id>/work    overlay's work dir (active snapshots)

Mounts, as containerd's overlayfs snapshotter returns them:

* active, no parent: a read-write bind mount of its ``fs``;
* active on a parent: ``overlay`` with ``lowerdir`` the parent chain's ``fs``
  directories (direct parent first), ``upperdir`` its ``fs``, ``workdir``;
* view of a single layer: a read-only bind mount of that layer's ``fs``;
* view of a chain: ``overlay`` with ``lowerdir`` only (read-only by nature);
* view with no parent: a read-only bind mount of its own, empty, ``fs``.

Whiteouts and opaque directories are the kernel's: a character device 0/0
in an upper dir hides the name below, ``trusted.overlay.opaque=y`` on a
directory hides what is below it. The diff applier writes them so when
unpacking a layer; committing freezes the upper dir as it is.

Commit keeps the id (the upper dir becomes the layer) and records the disk
usage measured by walking it in a thread. Remove drops the record only;
cleanup deletes directories that have no record any more.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path

import structlog

from daemon.mount import mount_all, unmount_all
from daemon.protocols import Kind, Mount, SnapshotInfo
from daemon.snapshotbase import StoredSnapshotter
from daemon.snapshotstore import MetaStore, Snapshot, SnapshotDirs, Transaction
from plugins.snapshotters.overlayfs.config import OverlayConfig

log = structlog.get_logger("berth.snapshotter.overlayfs")

UPPERDIR_LABEL = "containerd.io/snapshot/overlay.upperdir"
_INDEX_PARAM = Path("/sys/module/overlay/parameters/index")


async def check_supported(root: Path) -> str:
    """Why overlay cannot be used with upper dirs under ``root``, or "" if it can.

    Mounts a two-layer overlay with an upper dir in a scratch directory under
    ``root``: the only reliable answer (kernel without overlay, ``root`` on a
    filesystem that cannot be an upper, such as another overlay or NFS).
    """
    scratch = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix="overlay-check-", dir=root))
    try:
        for name in ("lower1", "lower2", "upper", "work", "merged"):
            (scratch / name).mkdir()
        mount = Mount(
            "overlay",
            "overlay",
            options=(
                f"lowerdir={scratch / 'lower2'}:{scratch / 'lower1'}",
                f"upperdir={scratch / 'upper'}",
                f"workdir={scratch / 'work'}",
            ),
        )
        try:
            await mount_all([mount], scratch / "merged")
        except Exception as exc:  # noqa: BLE001 - any failure means "not supported here"
            return f"overlay cannot be mounted on {root}: {exc}"
        await unmount_all(scratch / "merged", detach=True)
        return ""
    finally:
        await asyncio.to_thread(_remove_scratch, scratch)


def _remove_scratch(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


class OverlaySnapshotter(StoredSnapshotter):
    """:class:`daemon.protocols.Snapshotter` on overlayfs. Build it with :meth:`open`."""

    def __init__(self, root: Path, store: MetaStore, config: OverlayConfig) -> None:
        super().__init__(store, SnapshotDirs(root))
        self.root = root
        self.config = config
        self.sync_remove = config.sync_remove
        options = list(config.mount_options)
        if _INDEX_PARAM.exists() and not any(o.startswith("index=") for o in options):
            # containerd does the same: with index=on a layer shared by two
            # overlays with different uppers can refuse to mount.
            options.insert(0, "index=off")
        self._options = tuple(options)

    @classmethod
    async def open(cls, root: Path, config: OverlayConfig | None = None) -> OverlaySnapshotter:
        root = Path(root)
        await asyncio.to_thread(root.mkdir, parents=True, exist_ok=True, mode=0o700)
        store = await MetaStore.open(root / "metadata.db")
        sn = cls(root, store, config or OverlayConfig())
        await asyncio.to_thread(sn._dirs.ensure)
        return sn

    # -- reading ------------------------------------------------------------

    def _decorate(self, info: SnapshotInfo, sid: int | None = None) -> SnapshotInfo:
        if self.config.upperdir_label and sid is not None:
            info.labels = {**info.labels, UPPERDIR_LABEL: str(self._dirs.fs(sid))}
        return info

    async def stat(self, key: str) -> SnapshotInfo:
        if not self.config.upperdir_label:
            return await self._ms.stat(key)
        info, snap = await self._ms.read(lambda tx: (tx.info(key), tx.get(key)))
        return self._decorate(info, snap.id)

    async def update(self, info: SnapshotInfo, fieldpaths: Sequence[str] = ()) -> SnapshotInfo:
        if not self.config.upperdir_label:
            return await self._ms.update(info, fieldpaths)

        def job(tx: Transaction) -> tuple[SnapshotInfo, int]:
            return tx.update(info, fieldpaths), tx.get(info.name).id

        updated, sid = await self._ms.write(job)
        return self._decorate(updated, sid)

    async def walk(self, filters: Sequence[str] = ()) -> AsyncIterator[SnapshotInfo]:
        infos = await self._ms.walk(filters)
        ids = await self._ms.read(lambda tx: tx.id_map()) if self.config.upperdir_label else {}
        by_key = {key: sid for sid, key in ids.items()}
        for info in infos:
            yield self._decorate(info, by_key.get(info.name))

    def _mounts(self, snap: Snapshot) -> list[Mount]:
        fs = str(self._dirs.fs(snap.id))
        if not snap.parent_ids:
            return [Mount("bind", fs, options=("ro" if snap.kind is Kind.VIEW else "rw", "rbind"))]
        lower = "lowerdir=" + ":".join([self._dirs.fs_str(p) for p in snap.parent_ids])
        if snap.kind is Kind.ACTIVE:
            work = str(self._dirs.work(snap.id))
            options = (*self._options, f"workdir={work}", f"upperdir={fs}", lower)
            return [Mount("overlay", "overlay", options=options)]
        if len(snap.parent_ids) == 1:  # overlay needs two lowers without an upper
            return [Mount("bind", str(self._dirs.fs(snap.parent_ids[0])), options=("ro", "rbind"))]
        return [Mount("overlay", "overlay", options=(*self._options, lower))]

    # -- writing ------------------------------------------------------------

    async def _create(
        self, kind: Kind, key: str, parent: str, labels: Mapping[str, str] | None
    ) -> list[Mount]:
        def job(tx: Transaction) -> Snapshot:
            snap = tx.create(kind, key, parent, labels)
            self._dirs.install(snap.id, work=kind is Kind.ACTIVE)
            return snap

        snap = await self._ms.write(job)
        log.debug("snapshot.create", key=key, parent=parent, kind=kind.name.lower(), id=snap.id)
        return self._mounts(snap)


__all__ = ["OverlayConfig", "OverlaySnapshotter", "check_supported"]
