"""Local content store: on-disk layout, locks across processes, crash recovery, the loop stays free.

The protocol's behaviour is covered by the conformance suite
(tests/conformance/test_content.py); this file covers what only the local
implementation promises: where files are, what a ``kill -9`` leaves, that
another process is locked out, and that big blobs never block the loop.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import os
import random
import signal
import stat
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import pytest

from daemon.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from daemon.protocols import ContentStore
from daemon.registry import Registry
from plugins.content import local as plugin
from plugins.content.local import ingest, labels
from plugins.content.local.layout import Layout, remove_temp_files
from plugins.content.local.store import LocalContentStore

REPO = Path(__file__).resolve().parents[2]
DEADLINE_SECONDS = 30.0
T = TypeVar("T")


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[LocalContentStore]:
    s = await LocalContentStore.open(tmp_path / "content")
    try:
        yield s
    finally:
        await s.close()


def blob_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in (root / "blobs").rglob("*") if p.is_file())


# -- layout -----------------------------------------------------------------------


async def test_commit_publishes_a_read_only_blob_and_removes_the_ingest(store: LocalContentStore) -> None:
    data = b"hello, content"
    layout = Layout(store.root)
    writer = await store.writer("greeting", total=len(data))
    try:
        await writer.write(data)
        folder = layout.ingest_dir("greeting")
        assert (folder / "ref").read_text() == "greeting"
        assert (folder / "data").read_bytes() == data  # on disk as soon as write returned
        assert (folder / "total").read_text() == str(len(data))
        assert blob_files(store.root) == []
        digest = await writer.commit(labels={"gc": "root"})
    finally:
        await writer.close()
    hexpart = digest.removeprefix("sha256:")
    blob = store.root / "blobs" / "sha256" / hexpart
    assert blob.read_bytes() == data
    assert stat.S_IMODE(blob.stat().st_mode) == 0o444
    assert not folder.exists()
    assert (store.root / "labels" / "sha256" / hexpart).is_file()
    assert isinstance(store, ContentStore)


async def test_mismatch_messages_name_expected_and_seen(store: LocalContentStore) -> None:
    writer = await store.writer("m")
    try:
        await writer.write(b"abc")
        with pytest.raises(FailedPrecondition) as size_err:
            await writer.commit(size=4)
        assert str(size_err.value) == "commit failed: unexpected size: expected 4, got 3 (ref m)"
        wrong = "sha256:" + "0" * 64
        with pytest.raises(FailedPrecondition) as digest_err:
            await writer.commit(expected=wrong)
        assert str(digest_err.value) == (
            f"commit failed: unexpected digest: expected {wrong}, got {sha256(b'abc')} (ref m)"
        )
        assert blob_files(store.root) == []
        assert (Layout(store.root).ingest_dir("m") / "data").read_bytes() == b"abc"
    finally:
        await writer.close()


async def test_invalid_digest_names_the_field(store: LocalContentStore) -> None:
    with pytest.raises(InvalidArgument, match=r'^expected "sha256:abc": invalid digest'):
        await store.writer("r", expected="sha256:abc")
    with pytest.raises(InvalidArgument, match=r'^digest "sha1:abc": invalid digest: unsupported algorithm'):
        await store.info("sha1:abc")


async def test_abort_refuses_a_held_ref(store: LocalContentStore) -> None:
    writer = await store.writer("busy")
    try:
        with pytest.raises(Unavailable, match="ref busy locked"):
            await store.abort("busy")
    finally:
        await writer.close()
    await store.abort("busy")
    assert not Layout(store.root).ingest_dir("busy").exists()


async def test_reader_keeps_reading_a_deleted_blob(store: LocalContentStore) -> None:
    writer = await store.writer("r")
    await writer.write(b"0123456789")
    digest = await writer.commit()
    reader = await store.reader(digest)
    try:
        await store.delete(digest)
        assert await reader.read_at(2, 3) == b"234"
    finally:
        await reader.close()
    with pytest.raises(FailedPrecondition, match="closed"):
        await reader.read_at(0, 1)


async def test_walk_ignores_foreign_files(store: LocalContentStore) -> None:
    writer = await store.writer("w")
    await writer.write(b"x")
    digest = await writer.commit()
    (store.root / "blobs" / "sha256" / "not-a-digest").write_text("junk")
    (store.root / "blobs" / "md5").mkdir()
    (store.root / "blobs" / "md5" / ("a" * 32)).write_text("junk")
    assert [i.digest async for i in store.walk()] == [digest]


async def test_stale_label_sidecar_is_not_inherited(store: LocalContentStore) -> None:
    """A crash between deleting a blob and its sidecar must not label the next blob of that digest."""
    data = b"labelled once"
    hexpart = sha256(data).removeprefix("sha256:")
    labels.write(store.root / "labels" / "sha256" / hexpart, {"stale": "yes"}, ingest.now())
    writer = await store.writer("again")
    await writer.write(data)
    await writer.commit()
    assert (await store.info(sha256(data))).labels == {}


async def test_labels_survive_a_new_store(tmp_path: Path) -> None:
    first = await LocalContentStore.open(tmp_path)
    writer = await first.writer("l")
    await writer.write(b"l")
    digest = await writer.commit(labels={"a": "1"})
    info = await first.info(digest)
    info.labels = {"b": "2"}
    await first.update(info, ["labels.b"])
    second = await LocalContentStore.open(tmp_path)
    assert (await second.info(digest)).labels == {"a": "1", "b": "2"}


async def test_old_temp_files_are_removed_at_open(tmp_path: Path) -> None:
    Layout(tmp_path).create()
    old = tmp_path / "labels" / ".tmp-x.1234"
    young = tmp_path / "labels" / ".tmp-y.5678"
    old.write_text("{")
    young.write_text("{")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    assert remove_temp_files(tmp_path / "labels") == 1
    assert not old.exists()
    assert young.exists()


# -- recovery of half-done ingests ---------------------------------------------------


async def test_ingest_whose_data_was_already_published_restarts_empty(store: LocalContentStore) -> None:
    """A crash after the rename into blobs/ but before the ingest was removed."""
    writer = await store.writer("p", total=5)
    await writer.write(b"abcde")
    await writer.close()
    (Layout(store.root).ingest_dir("p") / "data").unlink()
    writer = await store.writer("p", total=5)
    try:
        assert writer.offset == 0
        assert writer.digest() == sha256(b"")
    finally:
        await writer.close()


async def test_unfinished_ingest_folder_is_started_again(store: LocalContentStore) -> None:
    """A crash while the ingest's files were being created (no ``ref`` file yet)."""
    folder = Layout(store.root).ingest_dir("u")
    folder.mkdir()
    (folder / "data").write_bytes(b"left over")
    assert await store.list_statuses() == []
    writer = await store.writer("u")
    try:
        assert writer.offset == 0
        assert (folder / "data").read_bytes() == b""
    finally:
        await writer.close()


async def test_unreadable_bookkeeping_starts_the_ingest_again(store: LocalContentStore) -> None:
    writer = await store.writer("c")
    await writer.write(b"12345")
    await writer.close()
    (Layout(store.root).ingest_dir("c") / "expected").write_text("garbage")
    writer = await store.writer("c")
    try:
        assert writer.offset == 0
        assert writer.expected == ""
    finally:
        await writer.close()


async def test_store_close_releases_open_writers(tmp_path: Path) -> None:
    first = await LocalContentStore.open(tmp_path)
    writer = await first.writer("open")
    await writer.write(b"xyz")
    await first.close()
    with pytest.raises(FailedPrecondition, match="writer is closed"):
        await writer.write(b"more")
    second = await LocalContentStore.open(tmp_path)
    resumed = await second.writer("open")
    try:
        assert resumed.offset == 3
    finally:
        await resumed.close()


async def test_cancelled_open_does_not_leave_the_ref_locked(
    store: LocalContentStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    entered, proceed = threading.Event(), threading.Event()
    real_load = ingest.LocalWriter._load

    def slow_load(self: ingest.LocalWriter, total: int, expected: str) -> None:
        entered.set()
        proceed.wait(timeout=DEADLINE_SECONDS)
        real_load(self, total, expected)

    monkeypatch.setattr(ingest.LocalWriter, "_load", slow_load)
    task = asyncio.create_task(store.writer("slow"))
    await poll(lambda: entered.is_set(), "the open reached its thread")
    with pytest.raises(Unavailable, match="ref slow locked"):
        await store.writer("slow")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    proceed.set()
    monkeypatch.setattr(ingest.LocalWriter, "_load", real_load)

    async def reopen() -> bool:
        try:
            writer = await store.writer("slow")
        except Unavailable:
            return False
        await writer.close()
        return True

    await poll_async(reopen, "the abandoned writer was closed")


async def test_lock_retries_when_the_lock_file_is_replaced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Locking a lock file that a commit removed meanwhile must not count as holding the ref."""
    folder = tmp_path / "ingest-x"
    calls = 0
    real_flock = fcntl.flock

    def flock_then_replace(fd: int, op: int) -> None:
        nonlocal calls
        calls += 1
        real_flock(fd, op)
        if calls == 1:  # what a committer does between our open() and flock()
            (folder / "lock").unlink()
            (folder / "lock").touch()

    monkeypatch.setattr(fcntl, "flock", flock_then_replace)
    fd = ingest.lock_ingest(folder, "x", create=True)
    try:
        assert calls == 2
        assert os.fstat(fd).st_ino == os.stat(folder / "lock").st_ino
    finally:
        os.close(fd)


# -- the plugin -----------------------------------------------------------------------


def test_entry_point_registers_the_plugin() -> None:
    registry = Registry()
    registry.load_entrypoints()
    reg = registry.state("berth.content.v1.local").registration
    assert reg.init is plugin.init
    assert reg.config is None
    assert reg.requires == ()


# -- the event loop stays free ----------------------------------------------------------


class Ticker:
    """Counts event-loop turns; an operation that holds the loop lets none through."""

    def __init__(self) -> None:
        self.ticks = 0
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            self.ticks += 1
            await asyncio.sleep(0.001)

    def __enter__(self) -> Ticker:
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()

    async def during(self, op: Awaitable[T]) -> tuple[T, int]:
        await asyncio.sleep(0.002)  # let the ticker start
        before = self.ticks
        result = await op
        return result, self.ticks - before


async def test_100_mb_never_blocks_the_event_loop(store: LocalContentStore) -> None:
    # Work done on the loop lets no tick through at all; 100 MB takes tens of
    # milliseconds, so a loop left free ticks many times. Two is the margin
    # that stays true on a machine busy with other work.
    size = 100 * 1024 * 1024
    data = bytes(range(256)) * (size // 256)
    digest = sha256(data)
    with Ticker() as ticker:
        writer = await store.writer("big", total=size, expected=digest)
        _, ticks = await ticker.during(writer.write(data))  # one call: write and hash 100 MB
        assert ticks >= 2, "write(100 MB)"
        await writer.close()
        writer, ticks = await ticker.during(store.writer("big", total=size, expected=digest))
        assert ticks >= 2, "resume: re-hashing 100 MB"
        assert writer.offset == size
        got, ticks = await ticker.during(writer.commit(expected="sha512:" + hashlib.sha512(data).hexdigest()))
        assert ticks >= 2, "commit: fsync and hashing again with sha512"
        assert got.startswith("sha512:")
        reader = await store.reader(got)
        try:
            read, ticks = await ticker.during(reader.read_at(0, size))
            assert ticks >= 2, "read_at(0, 100 MB)"
            assert len(read) == size
        finally:
            await reader.close()


# -- other processes ------------------------------------------------------------------------

HOLDER = r"""
import asyncio, pathlib, sys
import structlog
structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
from plugins.content.local.store import LocalContentStore

async def main(root, ref):
    store = await LocalContentStore.open(pathlib.Path(root))
    writer = await store.writer(ref)
    await writer.write(b"abc")
    print("held", flush=True)
    await asyncio.Event().wait()

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""

WRITER = r"""
import asyncio, hashlib, pathlib, random, sys
import structlog
structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
from plugins.content.local.store import LocalContentStore

root, ref, total, seed, chunk = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
data = random.Random(seed).randbytes(total)

async def main():
    store = await LocalContentStore.open(pathlib.Path(root))
    writer = await store.writer(ref, total=total, expected="sha256:" + hashlib.sha256(data).hexdigest())
    print(f"open {writer.offset}", flush=True)
    while writer.offset < total:
        await writer.write(data[writer.offset : writer.offset + chunk])
        print(f"offset {writer.offset}", flush=True)
    await asyncio.Event().wait()  # never commits: the parent kills it first

asyncio.run(main())
"""


async def spawn(script: str, *args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        script,
        *args,
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def reap(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.kill()  # our own child, by its pid
        await proc.wait()


async def read_line(proc: asyncio.subprocess.Process) -> bytes:
    assert proc.stdout is not None and proc.stderr is not None
    line = await proc.stdout.readline()
    if not line:
        err = (await proc.stderr.read()).decode(errors="replace")
        pytest.fail(f"child exited early (rc={await proc.wait()}):\n{err}")
    return line


async def test_writer_in_another_process_locks_the_ref(tmp_path: Path) -> None:
    proc = await spawn(HOLDER, str(tmp_path), "shared")
    try:
        async with asyncio.timeout(DEADLINE_SECONDS):
            assert await read_line(proc) == b"held\n"
        store = await LocalContentStore.open(tmp_path)
        with pytest.raises(Unavailable, match="ref shared locked: another process is writing it"):
            await store.writer("shared")
        with pytest.raises(Unavailable, match="ref shared locked"):
            await store.abort("shared")
        assert (await store.status("shared")).offset == 3
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
        writer = await store.writer("shared")  # the kernel dropped the dead holder's lock
        try:
            assert writer.offset == 3
            assert writer.digest() == sha256(b"abc")
        finally:
            await writer.close()
    finally:
        await reap(proc)


def _kill_after(pid: int, delay: float) -> None:
    time.sleep(delay)
    os.kill(pid, signal.SIGKILL)  # our unreaped child: the pid cannot have been reused


async def _write_until_killed(root: Path, ref: str, total: int, seed: int, reports: int) -> tuple[int, int]:
    """Run a writer child and SIGKILL it mid-write; (offset it opened at, last offset it reported)."""
    proc = await spawn(WRITER, str(root), ref, str(total), str(seed), str(64 * 1024))
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(DEADLINE_SECONDS):
            opened = int((await read_line(proc)).split()[1])
            last, times = opened, list[float]()
            while len(times) < reports:
                last = int((await read_line(proc)).split()[1])
                times.append(loop.time())
                assert blob_files(root) == [], "a partial blob became visible"
            # A random delay of up to two write intervals spreads the kill over the
            # whole write; timed in a thread, the loop's timers are too coarse.
            interval = (times[-1] - times[0]) / (len(times) - 1)
            await asyncio.to_thread(_kill_after, proc.pid, random.uniform(0, 2 * interval))
            await proc.wait()
            assert proc.stdout is not None
            for rest in (await proc.stdout.read()).splitlines():
                last = int(rest.split()[1])
    finally:
        await reap(proc)
    assert proc.returncode == -signal.SIGKILL
    assert last < total, "the child finished before it was killed: make the blob bigger"
    return opened, last


async def test_kill_9_mid_write_resumes_at_the_recorded_offset(tmp_path: Path) -> None:
    total, seed, ref = 16 * 1024 * 1024, 7, "crashy"
    data = random.Random(seed).randbytes(total)
    digest = sha256(data)
    opened, last = await _write_until_killed(tmp_path, ref, total, seed, reports=20)
    assert opened == 0
    # The second child resumes where the first died, then dies too.
    opened, last2 = await _write_until_killed(tmp_path, ref, total, seed, reports=20)
    assert opened >= last
    assert last2 > opened
    assert blob_files(tmp_path) == []

    store = await LocalContentStore.open(tmp_path)
    status = await store.status(ref)
    assert last2 <= status.offset <= total
    assert (status.total, status.expected) == (total, digest)
    on_disk = (Layout(tmp_path).ingest_dir(ref) / "data").read_bytes()
    assert on_disk == data[: status.offset]  # nothing torn, nothing reordered
    writer = await store.writer(ref, total=total, expected=digest)
    try:
        assert writer.offset == status.offset
        assert writer.digest() == sha256(data[: writer.offset])
        await writer.write(data[writer.offset :])
        assert await writer.commit() == digest
    finally:
        await writer.close()
    assert blob_files(tmp_path) == [f"blobs/sha256/{digest.removeprefix('sha256:')}"]
    reader = await store.reader(digest)
    try:
        assert sha256(await reader.read_at(0, total)) == digest
    finally:
        await reader.close()
    with pytest.raises(NotFound):
        await store.status(ref)


# -- helpers ----------------------------------------------------------------------------


async def poll(cond: Callable[[], bool], what: str, timeout: float = DEADLINE_SECONDS) -> None:
    async def check() -> bool:
        return cond()

    await poll_async(check, what, timeout)


async def poll_async(
    cond: Callable[[], Awaitable[bool]], what: str, timeout: float = DEADLINE_SECONDS
) -> None:
    deadline = time.monotonic() + timeout
    while not await cond():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting until {what}")
        await asyncio.sleep(0.01)
