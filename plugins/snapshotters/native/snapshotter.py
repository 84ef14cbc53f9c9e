"""The native snapshotter: each active snapshot a full copy of its parent, bind-mounted.

Layout (:class:`daemon.snapshotstore.SnapshotDirs`)::

    <root>/metadata.db          records: key -> id, kind, parent, labels, usage
    <root>/snapshots/<id>/fs    the snapshot's complete tree
    <root>/staging/<random>/fs  a copy being made, renamed to snapshots/<id> once recorded

Copy-on-write correctness is the whole contract: writing in a child, in
place or not, must never change its parent or a sibling. So ``prepare``
copies the parent's tree with ``cp -a`` (owners, modes, times, xattrs,
device nodes, hard links *within* the tree, all kept). With ``reflink``
(the default) ``--reflink=auto`` clones file extents on filesystems that can
(btrfs, XFS): instant, and still copy-on-write because the filesystem
unshares a block on write. Hard links between parent and child are never
used: they share one inode, so a write through the child's name would be a
write to the parent's file; nothing short of never opening a file for
writing makes that safe, and a container rootfs opens files for writing.

Mounts: an active snapshot is a read-write bind mount of its ``fs``. A view
needs no copy at all: it is a read-only bind mount of its parent's ``fs``
(committed snapshots never change, and a parent cannot be removed while a
view of it exists), or of an empty ``fs`` of its own when it has no parent.

Commit keeps the id and records disk usage; remove drops the record only,
cleanup deletes directories that have no record any more.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

import structlog

from daemon.errors import AlreadyExists, FailedPrecondition, NotFound, ResourceExhausted
from daemon.protocols import Kind, Mount
from daemon.snapshotbase import StoredSnapshotter
from daemon.snapshotstore import MetaStore, Snapshot, SnapshotDirs, Transaction
from plugins.snapshotters.native.config import NativeConfig

log = structlog.get_logger("berth.snapshotter.native")

#: ioctl FICLONE: make the destination file share the source's extents.
FICLONE = 0x40049409


def reflink_supported(directory: Path) -> bool:
    """Whether files under ``directory`` can be cloned (FICLONE); blocks, call in a thread."""
    with tempfile.TemporaryDirectory(prefix="reflink-check-", dir=directory) as scratch:
        src, dst = Path(scratch) / "src", Path(scratch) / "dst"
        src.write_bytes(b"x" * 4096)
        with open(src, "rb") as s, open(dst, "wb") as d:
            try:
                fcntl.ioctl(d.fileno(), FICLONE, s.fileno())
            except OSError:
                return False
    return True


class NativeSnapshotter(StoredSnapshotter):
    """:class:`daemon.protocols.Snapshotter` by plain directory copies. Build it with :meth:`open`."""

    def __init__(self, root: Path, store: MetaStore, config: NativeConfig, *, reflink: bool) -> None:
        super().__init__(store, SnapshotDirs(root))
        self.root = root
        self.config = config
        self.sync_remove = config.sync_remove
        #: whether copies are clones (the filesystem supports it and config allows it)
        self.reflink = reflink

    @classmethod
    async def open(cls, root: Path, config: NativeConfig | None = None) -> NativeSnapshotter:
        root = Path(root)
        config = config or NativeConfig()
        if shutil.which("cp") is None:
            raise FailedPrecondition("native snapshotter: cp(1) from coreutils is not installed")
        await asyncio.to_thread(root.mkdir, parents=True, exist_ok=True, mode=0o700)
        reflink = config.reflink and await asyncio.to_thread(reflink_supported, root)
        store = await MetaStore.open(root / "metadata.db")
        sn = cls(root, store, config, reflink=reflink)
        await asyncio.to_thread(sn._dirs.ensure)
        log.debug("native.open", root=str(root), reflink=reflink)
        return sn

    def _mounts(self, snap: Snapshot) -> list[Mount]:
        if snap.kind is Kind.ACTIVE:
            return [Mount("bind", str(self._dirs.fs(snap.id)), options=("rw", "rbind"))]
        source = self._dirs.fs(snap.parent_ids[0] if snap.parent_ids else snap.id)
        return [Mount("bind", str(source), options=("ro", "rbind"))]

    # -- writing ------------------------------------------------------------

    async def _create(
        self, kind: Kind, key: str, parent: str, labels: Mapping[str, str] | None
    ) -> list[Mount]:
        staged: Path | None = None
        parent_id = 0
        if kind is Kind.ACTIVE and parent:
            parent_id = await self._ms.read(lambda tx: _copy_source(tx, key, parent))
            staged = self._dirs.stage()
            try:
                await self._copy(self._dirs.fs(parent_id), staged, key, parent)
            except BaseException:
                await asyncio.to_thread(self._dirs.unstage, staged)
                raise

        def job(tx: Transaction) -> Snapshot:
            snap = tx.create(kind, key, parent, labels)
            if staged is not None and snap.parent_ids[:1] != (parent_id,):
                # removed and re-created under the same key while we copied
                raise FailedPrecondition(f"snapshot {key!r}: parent {parent!r} changed while being copied")
            self._dirs.install(snap.id, staged)
            return snap

        try:
            snap = await self._ms.write(job)
        finally:
            if staged is not None:
                await asyncio.to_thread(self._dirs.unstage, staged)
        log.debug("snapshot.create", key=key, parent=parent, kind=kind.name.lower(), id=snap.id)
        return self._mounts(snap)

    async def _copy(self, source: Path, staged: Path, key: str, parent: str) -> None:
        await asyncio.to_thread(staged.mkdir, mode=0o700)
        reflink = "--reflink=auto" if self.reflink else "--reflink=never"
        proc = await asyncio.create_subprocess_exec(
            "cp",
            "-a",
            reflink,
            "--no-target-directory",
            "--",
            str(source),
            str(staged / "fs"),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            _, err = await proc.communicate()
        except asyncio.CancelledError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            raise
        if proc.returncode != 0:
            text = err.decode(errors="replace").strip()
            cls = ResourceExhausted if "No space left" in text else FailedPrecondition
            raise cls(f"snapshot {key!r}: copying parent {parent!r}: {text}")


def _copy_source(tx: Transaction, key: str, parent: str) -> int:
    """The id to copy from, after the checks create will repeat (fail before a long copy)."""
    if tx.exists(key):
        raise AlreadyExists(f"snapshot {key!r}: already exists")
    try:
        snap = tx.get(parent)
    except NotFound:
        raise NotFound(f"snapshot {key!r}: parent {parent!r} not found") from None
    if snap.kind is not Kind.COMMITTED:
        raise FailedPrecondition(
            f"snapshot {key!r}: parent {parent!r} is {snap.kind.name.lower()}, not committed"
        )
    return snap.id


__all__ = ["NativeConfig", "NativeSnapshotter", "reflink_supported"]
