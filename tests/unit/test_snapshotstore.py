"""daemon.snapshotstore: records, transactions, directory layout, cleanup, disk usage."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from daemon.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, Unavailable
from daemon.protocols import Kind, SnapshotInfo, Usage
from daemon.snapshotstore import MetaStore, Snapshot, SnapshotDirs, Transaction, disk_usage


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[MetaStore]:
    ms = await MetaStore.open(tmp_path / "metadata.db")
    yield ms
    await ms.close()


async def _committed(ms: MetaStore, name: str, parent: str = "", usage: Usage | None = None) -> Snapshot:
    def job(tx: Transaction) -> Snapshot:
        tx.create(Kind.ACTIVE, f"{name}-active", parent)
        tx.commit_active(f"{name}-active", name, usage or Usage())
        return tx.get(name)

    return await ms.write(job)


async def test_chain_records(store: MetaStore) -> None:
    c1 = await _committed(store, "c1")
    c2 = await _committed(store, "c2", "c1", Usage(inodes=3, size=4096))
    a = await store.write(lambda tx: tx.create(Kind.ACTIVE, "a", "c2", {"x": "y"}))
    assert a.parent_ids == (c2.id, c1.id)  # direct parent first
    assert c2.id == (await store.get("c2")).id  # commit keeps the id of the active
    assert (await store.get("c2")).usage == Usage(inodes=3, size=4096)
    info = await store.stat("a")
    assert (info.kind, info.name, info.parent, info.labels) == (Kind.ACTIVE, "a", "c2", {"x": "y"})
    assert info.created_at == info.updated_at and info.created_at is not None
    assert info.created_at.tzinfo is not None
    assert (await store.active_or_view("a")).id == a.id
    with pytest.raises(FailedPrecondition, match="'c2': is committed"):
        await store.active_or_view("c2")
    assert sorted(i.name for i in await store.walk()) == ["a", "c1", "c2"]
    assert [i.name for i in await store.walk(["kind==committed,parent==c1"])] == ["c2"]


async def test_create_refuses_bad_input(store: MetaStore) -> None:
    await store.write(lambda tx: tx.create(Kind.ACTIVE, "active"))
    with pytest.raises(AlreadyExists, match="'active': already exists"):
        await store.write(lambda tx: tx.create(Kind.VIEW, "active"))
    with pytest.raises(NotFound, match="parent 'nope' not found"):
        await store.write(lambda tx: tx.create(Kind.ACTIVE, "x", "nope"))
    with pytest.raises(FailedPrecondition, match="parent 'active' is active, not committed"):
        await store.write(lambda tx: tx.create(Kind.ACTIVE, "x", "active"))
    with pytest.raises(InvalidArgument, match="not COMMITTED"):
        await store.write(lambda tx: tx.create(Kind.COMMITTED, "x"))
    with pytest.raises(InvalidArgument, match="key: must not be empty"):
        await store.write(lambda tx: tx.create(Kind.ACTIVE, ""))
    with pytest.raises(InvalidArgument, match="label 'k': key and value are 5001 bytes"):
        await store.write(lambda tx: tx.create(Kind.ACTIVE, "x", "", {"k": "v" * 5000}))
    assert [i.name for i in await store.walk()] == ["active"]


async def test_commit_rules(store: MetaStore) -> None:
    await store.write(lambda tx: tx.create(Kind.VIEW, "v"))
    await store.write(lambda tx: tx.create(Kind.ACTIVE, "a", "", {"old": "1"}))
    await _committed(store, "taken")
    with pytest.raises(FailedPrecondition, match="commit 'v': snapshot is view"):
        await store.write(lambda tx: tx.commit_active("v", "c", Usage()))
    with pytest.raises(AlreadyExists, match="'taken' already exists"):
        await store.write(lambda tx: tx.commit_active("a", "taken", Usage()))
    await store.write(lambda tx: tx.commit_active("a", "c", Usage(), {"new": "2"}))
    assert (await store.stat("c")).labels == {"new": "2"}  # commit's labels, not the active's
    with pytest.raises(NotFound):
        await store.stat("a")


async def test_remove_refuses_parents_and_ids_are_never_reused(store: MetaStore) -> None:
    base = await _committed(store, "base")
    await store.write(lambda tx: tx.create(Kind.VIEW, "child", "base"))
    with pytest.raises(
        FailedPrecondition, match="cannot remove snapshot 'base': it is the parent of 'child'"
    ):
        await store.remove("base")
    child_id, kind = await store.remove("child")
    assert kind is Kind.VIEW
    assert await store.remove("base") == (base.id, Kind.COMMITTED)
    fresh = await store.write(lambda tx: tx.create(Kind.ACTIVE, "fresh"))
    assert fresh.id > child_id > base.id  # removed ids stay unused: their dirs may await cleanup
    with pytest.raises(NotFound):
        await store.remove("base")


async def test_a_failing_transaction_leaves_nothing(store: MetaStore) -> None:
    def job(tx: Transaction) -> None:
        tx.create(Kind.ACTIVE, "doomed")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        await store.write(job)
    with pytest.raises(NotFound):
        await store.stat("doomed")
    # and a read transaction cannot write
    with pytest.raises(sqlite3.OperationalError):
        await store.read(lambda tx: tx.create(Kind.ACTIVE, "sneaky"))


async def test_update_labels_only(store: MetaStore) -> None:
    await store.write(lambda tx: tx.create(Kind.ACTIVE, "a", "", {"a": "1", "b": "2"}))
    before = await store.stat("a")
    info = SnapshotInfo(kind=Kind.VIEW, name="a", parent="ignored", labels={"a": "9", "c": "3"})
    out = await store.update(info, ["labels.a", "labels.b"])
    assert out.labels == {"a": "9"}  # b removed (absent in info), c not named
    assert (out.kind, out.parent, out.created_at) == (Kind.ACTIVE, "", before.created_at)
    assert out.updated_at is not None and before.updated_at is not None
    assert out.updated_at >= before.updated_at
    assert (await store.update(info)).labels == {"a": "9", "c": "3"}
    assert (await store.update(SnapshotInfo(Kind.ACTIVE, "a"), ["labels"])).labels == {}
    with pytest.raises(InvalidArgument, match="cannot update field 'parent'"):
        await store.update(info, ["parent"])
    with pytest.raises(NotFound):
        await store.update(SnapshotInfo(Kind.ACTIVE, "missing"))


async def test_walk_filters(store: MetaStore) -> None:
    await _committed(store, "p")
    await store.write(lambda tx: tx.create(Kind.ACTIVE, "a", "p", {"l": "2"}))
    await store.write(lambda tx: tx.create(Kind.VIEW, "v", "p", {"l": "3"}))
    assert sorted(i.name for i in await store.walk(["labels.l"])) == ["a", "v"]
    assert [i.name for i in await store.walk(["labels.l==2"])] == ["a"]
    assert sorted(i.name for i in await store.walk(["kind==view", "name==p"])) == ["p", "v"]
    assert sorted(i.name for i in await store.walk(['parent!=""'])) == ["a", "v"]
    with pytest.raises(InvalidArgument):
        await store.walk(["labels.=="])


async def test_persistence_close_and_newer_schema(tmp_path: Path) -> None:
    path = tmp_path / "metadata.db"
    ms = await MetaStore.open(path)
    await _committed(ms, "kept")
    await ms.close()
    await ms.close()  # idempotent
    with pytest.raises(Unavailable, match="closed"):
        await ms.stat("kept")
    ms = await MetaStore.open(path)
    assert (await ms.stat("kept")).kind is Kind.COMMITTED
    await ms.close()
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    with pytest.raises(FailedPrecondition, match="schema version 99 is newer"):
        await MetaStore.open(path)


async def test_sqlite_runs_in_one_thread_off_the_loop(store: MetaStore) -> None:
    threads = await asyncio.gather(*(store.read(lambda tx: threading.get_ident()) for _ in range(5)))
    assert len(set(threads)) == 1 and threads[0] != threading.get_ident()


# -- directories ------------------------------------------------------------------


async def test_install_staged_and_cleanup(tmp_path: Path, store: MetaStore) -> None:
    dirs = SnapshotDirs(tmp_path / "sn")
    dirs.ensure()

    def create(tx: Transaction, key: str) -> Snapshot:
        snap = tx.create(Kind.ACTIVE, key)
        dirs.install(snap.id, work=True)
        return snap

    kept = await store.write(lambda tx: create(tx, "kept"))
    gone = await store.write(lambda tx: create(tx, "gone"))
    assert oct(dirs.fs(kept.id).stat().st_mode & 0o777) == oct(0o755)
    assert dirs.work(kept.id).is_dir()
    (dirs.fs(gone.id) / "data").write_bytes(b"x" * 10000)
    staged = dirs.stage()  # a copy in progress: cleanup must leave it alone
    staged.mkdir()
    abandoned = dirs.staging / "crashed-copy"  # from an earlier process: removed
    abandoned.mkdir()
    await store.remove("gone")
    assert dirs.dir(gone.id).exists()  # remove drops the record only
    assert await dirs.cleanup(store) == 2
    assert not dirs.dir(gone.id).exists() and not abandoned.exists()
    assert dirs.dir(kept.id).exists() and staged.exists()
    assert list(dirs.trash.iterdir()) == []

    # a staged copy is moved into place by install, inside the create transaction
    (staged / "fs").mkdir()
    (staged / "fs" / "f").write_text("copied")

    def from_staged(tx: Transaction) -> Snapshot:
        snap = tx.create(Kind.ACTIVE, "copied")
        dirs.install(snap.id, staged)
        return snap

    snap = await store.write(from_staged)
    dirs.unstage(staged)
    assert (dirs.fs(snap.id) / "f").read_text() == "copied" and not staged.exists()


async def test_install_clears_the_leftover_of_a_rolled_back_create(tmp_path: Path, store: MetaStore) -> None:
    """A crash between the rename and COMMIT leaves a dir whose id will be handed out again."""
    dirs = SnapshotDirs(tmp_path / "sn")
    dirs.ensure()

    def crash(tx: Transaction) -> None:
        snap = tx.create(Kind.ACTIVE, "first")
        dirs.install(snap.id)
        (dirs.fs(snap.id) / "stale").touch()
        raise RuntimeError("crash before commit")

    with pytest.raises(RuntimeError):
        await store.write(crash)

    def again(tx: Transaction) -> Snapshot:
        snap = tx.create(Kind.ACTIVE, "second")
        dirs.install(snap.id)
        return snap

    snap = await store.write(again)
    assert list(dirs.fs(snap.id).iterdir()) == []


def test_disk_usage_counts_blocks_and_each_inode_once(tmp_path: Path) -> None:
    root = tmp_path / "tree"
    (root / "d").mkdir(parents=True)
    (root / "d" / "big").write_bytes(os.urandom(1 << 20))
    os.link(root / "d" / "big", root / "hard")
    (root / "sparse").touch()
    os.truncate(root / "sparse", 1 << 30)  # 1 GiB apparent, no blocks
    os.symlink("d/big", root / "sym")
    usage = disk_usage(root)
    assert usage.inodes == 5  # root, d, big (=hard), sparse, sym
    assert (1 << 20) <= usage.size < (1 << 20) + 64 * 1024
    assert disk_usage(tmp_path / "missing") == Usage()
