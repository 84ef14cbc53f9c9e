"""Ingests: writes in progress, held exclusively, resumable, published atomically.

Locking, in two layers:

* In this process, :class:`RefLocks` records who holds each ref (a writer,
  or an abort), so a second writer is refused at once with a message saying
  since when the ref is held, and the store can close leftover writers.
* Across processes, the holder ``flock(2)``\\ s ``ingest/<h>/lock``. The kernel
  drops the lock when the holder dies, so a ``kill -9``\\ ed writer never
  leaves a ref locked. Committing or aborting removes the folder with its
  lock file; whoever opened the old file meanwhile notices (the inode at the
  path is no longer the one it locked) and locks the new one instead.

Both refusals raise :class:`daemon.errors.Unavailable` with ``ref <ref>
locked`` in the message, as containerd's ``ErrUnavailable`` does.

Resuming costs a re-read: hash states cannot be saved, so opening a writer
on an existing ingest hashes its ``data`` again (in a worker thread) to
rebuild the digest, and :meth:`LocalWriter.truncate` re-hashes what it keeps.

Threads: every method that touches files runs its blocking part in a worker
thread, under the writer's own mutex, and updates the writer's state there.
A caller cancelled while a write or commit runs therefore leaves a writer
whose ``offset`` and digest still match the file, and a commit that
completes or fails as a whole.
"""

from __future__ import annotations

import asyncio
import enum
import errno
import fcntl
import os
import shutil
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import structlog

from daemon.errors import (
    AlreadyExists,
    BerthError,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from daemon.metadata.encoding import to_datetime
from daemon.metadata.validate import quote, validate_labels
from daemon.protocols import IngestStatus
from plugins.content.local import digests, labels
from plugins.content.local.layout import (
    BLOB_MODE,
    DATA,
    DIR_MODE,
    EXPECTED,
    LOCK,
    REF,
    STARTED_AT,
    TOTAL,
    UPDATED_AT,
    Layout,
    format_time,
    fsync_dir,
    parse_time,
    to_ns,
    write_atomic,
)

log = structlog.get_logger("berth.content")

#: how often to retry when the lock file is replaced under us (commit/abort racing)
_LOCK_ATTEMPTS = 20


def now() -> datetime:
    """Timestamps are taken exactly as callers take theirs, so before/after comparisons hold."""
    return datetime.now(UTC)


def os_error(what: str, exc: OSError) -> BerthError:
    """An OSError as a berth error an operator can act on."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return ResourceExhausted(f"{what}: {exc.strerror or exc}")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return FailedPrecondition(f"{what}: {exc.strerror or exc}")
    return Internal(f"{what}: {exc}")


# -- in-process ref locks -------------------------------------------------------


@dataclass(eq=False)
class Claim:
    ref: str
    what: str
    since: datetime
    writer: LocalWriter | None = None


class RefLocks:
    """Which refs this process holds, and by whom; thread-safe (released from workers)."""

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._held: dict[str, Claim] = {}

    def claim(self, ref: str, what: str, writer: LocalWriter | None = None) -> Claim:
        with self._mutex:
            held = self._held.get(ref)
            if held is not None:
                raise Unavailable(f"ref {ref} locked: held by {held.what} since {held.since.isoformat()}")
            claim = Claim(ref, what, now(), writer)
            self._held[ref] = claim
            return claim

    def release(self, claim: Claim) -> None:
        with self._mutex:
            if self._held.get(claim.ref) is claim:
                del self._held[claim.ref]

    def get(self, ref: str) -> Claim | None:
        with self._mutex:
            return self._held.get(ref)

    def writers(self) -> list[LocalWriter]:
        with self._mutex:
            return [c.writer for c in self._held.values() if c.writer is not None]


def lock_ingest(folder: Path, ref: str, *, create: bool) -> int:
    """``flock`` the lock file of an ingest folder; the descriptor that holds the lock.

    ``create`` makes the folder if needed (a writer); without it a missing
    folder is NotFound (an abort). Blocks only on file system calls, never
    waits for the lock: a held lock is Unavailable at once.
    """
    for _ in range(_LOCK_ATTEMPTS):
        if create:
            folder.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
        try:
            fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except FileNotFoundError:
            if create:
                continue  # removed between mkdir and open: make it again
            raise NotFound(f"ingest ref {quote(ref)}: not found") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            mine = os.fstat(fd)
            try:
                current = os.stat(folder / LOCK)
            except FileNotFoundError:
                current = None
        except BlockingIOError:
            os.close(fd)
            raise Unavailable(f"ref {ref} locked: another process is writing it") from None
        except BaseException:
            os.close(fd)
            raise
        if current is not None and (current.st_dev, current.st_ino) == (mine.st_dev, mine.st_ino):
            return fd
        os.close(fd)  # we locked a file that a commit or abort just removed
        if not create:
            raise NotFound(f"ingest ref {quote(ref)}: not found")
    raise Unavailable(f"ref {ref} locked: its lock file keeps being replaced")


# -- reading ingests from disk ---------------------------------------------------


def read_status(folder: Path) -> IngestStatus | None:
    """The status of an ingest from its files; None if the folder is not a (finished) ingest.

    Bookkeeping files that a crash left unreadable read as their defaults;
    the offset is the size of ``data`` and ``updated_at`` is at least its
    modification time (a writer killed mid-write never recorded its last
    writes in ``updatedat``).
    """
    try:
        ref = (folder / REF).read_bytes().decode("utf-8", "surrogateescape")
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        data = os.stat(folder / DATA)
        offset, modified = data.st_size, to_datetime(data.st_mtime_ns)
    except FileNotFoundError:
        offset, modified = 0, None
    started = _read_time(folder / STARTED_AT) or modified or to_datetime(0)
    updated = max(t for t in (_read_time(folder / UPDATED_AT), modified, started) if t is not None)
    return IngestStatus(
        ref=ref,
        offset=offset,
        total=_read_int(folder / TOTAL),
        expected=_read_text(folder / EXPECTED),
        started_at=started,
        updated_at=updated,
    )


def _read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode()
    except (OSError, UnicodeDecodeError):
        return ""


def _read_int(path: Path) -> int:
    try:
        return max(0, int(_read_text(path) or "0"))
    except ValueError:
        return 0


def _read_time(path: Path) -> datetime | None:
    try:
        return parse_time(path.read_bytes())
    except (OSError, ValueError):
        return None


# -- the writer -------------------------------------------------------------------


class _State(enum.Enum):
    NEW = "new"
    OPEN = "open"
    COMMITTED = "committed"
    CLOSED = "closed"


class LocalWriter:
    """One ingest of the local store (see :class:`daemon.protocols.ContentWriter`).

    Obtain it from :meth:`LocalContentStore.writer`. It hashes with the
    algorithm of the expected digest announced when it was opened (sha256
    when none was). ``write`` survives a crash of the process once it
    returned (the bytes are in the kernel); ``close`` and ``commit`` fsync.
    Until closed or committed the writer holds an open file and the ref's
    lock: always close it (closing after a commit is a no-op).
    """

    def __init__(self, layout: Layout, locks: RefLocks, ref: str) -> None:
        self.ref = ref
        self.offset = 0
        self.total = 0
        self.expected = ""
        self.started_at = now()
        self.updated_at = self.started_at
        self._layout = layout
        self._locks = locks
        self._claim: Claim | None = None
        self._dir = layout.ingest_dir(ref)
        self._mutex = threading.Lock()
        self._state = _State.NEW
        self._lock_fd = -1
        self._data_fd = -1
        self._algorithm = digests.CANONICAL
        self._hasher = digests.new_hasher(self._algorithm)
        self._digest = f"{self._algorithm}:{self._hasher.hexdigest()}"

    def __repr__(self) -> str:
        return f"<LocalWriter ref={self.ref!r} offset={self.offset} {self._state.value}>"

    @property
    def is_open(self) -> bool:
        return self._state is _State.OPEN

    def digest(self) -> str:
        """Digest of the bytes written so far; never waits for a write in flight."""
        return self._digest

    def status(self) -> IngestStatus:
        return IngestStatus(
            ref=self.ref,
            offset=self.offset,
            total=self.total,
            expected=self.expected,
            started_at=self.started_at,
            updated_at=self.updated_at,
        )

    async def write(self, data: bytes) -> None:
        """Append ``data`` at :attr:`offset` (hashing it on the way, in a worker thread)."""
        await asyncio.to_thread(self._write_sync, data)

    async def truncate(self, size: int) -> None:
        """Keep the first ``size`` bytes (0 <= size <= offset) and re-hash them."""
        await asyncio.to_thread(self._truncate_sync, size)

    async def commit(self, size: int = 0, expected: str = "", labels: Mapping[str, str] | None = None) -> str:
        """Verify and publish the blob; see :meth:`daemon.protocols.ContentWriter.commit`.

        ``size`` 0 and ``expected`` "" fall back to the total and expected
        digest announced when the writer was opened, so an ingest is never
        published unverified when its caller knew what it should be.
        ``expected`` may use another algorithm than the writer's (the data
        is then hashed again with it). ``labels`` become the blob's labels.
        """
        if size < 0:
            raise InvalidArgument(f"size {size}: must not be negative (ref {quote(self.ref)})")
        if expected:
            digests.parse("expected", expected)
        clean = validate_labels(f"content ref {quote(self.ref)}", labels or {})
        return await asyncio.to_thread(self._commit_sync, size, expected, clean)

    async def close(self) -> None:
        """Fsync, record ``updatedat``, release the ref; the ingest stays for resumption.

        Shielded: a caller cancelled while closing (a failing pull's task group
        cancels its siblings, sometimes twice) must not leave the ref locked
        for ever; the close finishes in its thread whatever happens to the caller.
        """
        if self._state is _State.OPEN:
            await asyncio.shield(asyncio.to_thread(self._close_sync))

    # -- blocking parts, each under the mutex ------------------------------------

    def _check_open(self, action: str) -> None:
        if self._state is not _State.OPEN:
            raise FailedPrecondition(f"ref {self.ref}: cannot {action}: writer is {self._state.value}")

    def _open_sync(self, claim: Claim, total: int, expected: str) -> None:
        with self._mutex:
            self._claim = claim
            try:
                self._lock_fd = lock_ingest(self._dir, self.ref, create=True)
                self._load(total, expected)
            except BaseException:
                self._release()
                raise
            self._state = _State.OPEN

    def _load(self, total: int, expected: str) -> None:
        stored = read_status(self._dir)
        if stored is not None and stored.ref != self.ref:
            raise Internal(f"ingest {self._dir}: holds ref {quote(stored.ref)}, not {quote(self.ref)}")
        if stored is not None and stored.expected:
            try:
                digests.parse("expected", stored.expected)
            except InvalidArgument as exc:
                log.warning("content.ingest_unreadable", ref=self.ref, error=exc.message)
                stored = None
        if stored is None:
            self._init_fresh(total, expected)
            return
        if total and stored.total and total != stored.total:
            raise FailedPrecondition(
                f"ref {self.ref}: total {total} does not match the total "
                f"of the existing ingest ({stored.total})"
            )
        if expected and stored.expected and expected != stored.expected:
            raise FailedPrecondition(
                f"ref {self.ref}: expected {expected} does not match the expected digest "
                f"of the existing ingest ({stored.expected})"
            )
        if total and not stored.total:
            write_atomic(self._dir / TOTAL, str(total).encode(), durable=False)
        if expected and not stored.expected:
            write_atomic(self._dir / EXPECTED, expected.encode(), durable=False)
        self.total = total or stored.total
        self.expected = expected or stored.expected
        self.started_at, self.updated_at = stored.started_at, stored.updated_at
        self._algorithm = digests.algorithm_of(self.expected)
        self._data_fd = os.open(
            self._dir / DATA, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644
        )
        self._rehash(os.fstat(self._data_fd).st_size)
        if self.offset:
            log.info("content.ingest_resume", ref=self.ref, offset=self.offset, total=self.total)

    def _init_fresh(self, total: int, expected: str) -> None:
        self._data_fd = os.open(
            self._dir / DATA, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644
        )
        started = now()
        for name, value in (
            (TOTAL, str(total).encode()),
            (EXPECTED, expected.encode()),
            (STARTED_AT, format_time(started)),
            (UPDATED_AT, format_time(started)),
            (REF, self.ref.encode("utf-8", "surrogateescape")),  # last: it marks the ingest complete
        ):
            write_atomic(self._dir / name, value, durable=False)
        self.total, self.expected = total, expected
        self.started_at = self.updated_at = started
        self._algorithm = digests.algorithm_of(expected)
        self._rehash(0)

    def _rehash(self, size: int) -> None:
        """Rebuild the digest state from the first ``size`` bytes of ``data`` (a re-read)."""
        if size == 0:
            hasher, done = digests.new_hasher(self._algorithm), 0
        else:
            fd = os.open(self._dir / DATA, os.O_RDONLY | os.O_CLOEXEC)
            try:
                hasher, done = digests.hash_fd(fd, self._algorithm, size)
            finally:
                os.close(fd)
        self._hasher, self.offset = hasher, done
        self._digest = f"{self._algorithm}:{hasher.hexdigest()}"

    def _write_sync(self, data: bytes) -> None:
        with self._mutex:
            self._check_open("write")
            view = memoryview(data).cast("B")
            try:
                while view:
                    n = os.write(self._data_fd, view)
                    self._hasher.update(view[:n])
                    self.offset += n
                    view = view[n:]
            except OSError as exc:
                raise os_error(f"ref {self.ref}: write at offset {self.offset}", exc) from exc
            finally:
                self._digest = f"{self._algorithm}:{self._hasher.hexdigest()}"
                self.updated_at = now()

    def _truncate_sync(self, size: int) -> None:
        with self._mutex:
            self._check_open("truncate")
            if not 0 <= size <= self.offset:
                raise InvalidArgument(
                    f"ref {self.ref}: truncate size {size}: must be between 0 and the offset {self.offset}"
                )
            try:
                os.ftruncate(self._data_fd, size)
                self._rehash(size)
                self.updated_at = now()
                write_atomic(self._dir / UPDATED_AT, format_time(self.updated_at), durable=False)
            except OSError as exc:
                raise os_error(f"ref {self.ref}: truncate to {size}", exc) from exc

    def _commit_sync(self, size: int, expected: str, blob_labels: dict[str, str]) -> str:
        with self._mutex:
            self._check_open("commit")
            try:
                return self._publish(size, expected, blob_labels)
            except OSError as exc:
                raise os_error(f"ref {self.ref}: commit", exc) from exc

    def _publish(self, size: int, expected: str, blob_labels: dict[str, str]) -> str:
        actual_size = os.fstat(self._data_fd).st_size
        want_size = size or self.total
        if want_size and actual_size != want_size:
            raise FailedPrecondition(
                f"commit failed: unexpected size: expected {want_size}, got {actual_size} (ref {self.ref})"
            )
        want = expected or self.expected
        algorithm = digests.algorithm_of(want) if want else self._algorithm
        if algorithm == self._algorithm:
            actual = self._digest
        else:
            fd = os.open(self._dir / DATA, os.O_RDONLY | os.O_CLOEXEC)
            try:
                hasher, _ = digests.hash_fd(fd, algorithm, actual_size)
            finally:
                os.close(fd)
            actual = f"{algorithm}:{hasher.hexdigest()}"
        if want and actual != want:
            raise FailedPrecondition(
                f"commit failed: unexpected digest: expected {want}, got {actual} (ref {self.ref})"
            )
        encoded = actual.partition(":")[2]
        target = self._layout.blob_path(algorithm, encoded)
        if target.exists():
            self._remove_ingest()
            raise AlreadyExists(f"content {actual}: already exists")
        committed = now()
        # Labels first: a stale sidecar of an earlier blob of this digest must
        # never be read as the new blob's labels.
        sidecar = self._layout.labels_path(algorithm, encoded)
        if blob_labels:
            labels.write(sidecar, blob_labels, committed)
        else:
            labels.remove(sidecar)
        ns = to_ns(committed)
        os.utime(self._data_fd, ns=(ns, ns))  # the blob's mtime is its created_at
        os.fchmod(self._data_fd, BLOB_MODE)
        os.fsync(self._data_fd)
        target.parent.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
        # rename, not link: the ingest must never share an inode with a blob,
        # or resuming a half-removed ingest would write into published content.
        os.rename(self._dir / DATA, target)
        fsync_dir(target.parent)
        self._remove_ingest()
        log.info("content.commit", ref=self.ref, digest=actual, size=actual_size, labels=len(blob_labels))
        return actual

    def _remove_ingest(self) -> None:
        os.close(self._data_fd)
        self._data_fd = -1
        shutil.rmtree(self._dir, ignore_errors=True)
        self._state = _State.COMMITTED
        self._release()

    def _close_sync(self) -> None:
        with self._mutex:
            if self._state is not _State.OPEN:
                return
            try:
                os.fsync(self._data_fd)
                write_atomic(self._dir / UPDATED_AT, format_time(self.updated_at), durable=False)
            except OSError as exc:
                log.warning("content.ingest_close_failed", ref=self.ref, error=str(exc))
            finally:
                self._state = _State.CLOSED
                self._release()

    def _release(self) -> None:
        """Close the files and drop both locks; the flock goes last."""
        if self._data_fd >= 0:
            os.close(self._data_fd)
            self._data_fd = -1
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1
        if self._claim is not None:
            self._locks.release(self._claim)
            self._claim = None
        if self._state is _State.NEW:
            self._state = _State.CLOSED
