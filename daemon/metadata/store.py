"""The metadata database: one SQLite file, one thread, one connection.

Threading: sqlite3 calls block, so every one of them runs in a single
dedicated worker thread that owns the connection (``check_same_thread``
stays on, so a stray call from another thread fails loudly). The event loop
only submits closures and awaits their results. One writer thread also
serialises writes without any lock of ours; readers queue behind writers,
which is fine at the rate a node's metadata changes.

Durability: the journal is WAL. ``synchronous`` is FULL by default: every
commit is fsynced before :meth:`MetadataStore.write` returns, so a committed
write survives even a power loss or kernel crash, as containerd's bolt
database (fsync per commit) does. ``NORMAL`` is available for slow disks: in
WAL mode it still loses no committed write when the *process* dies (a
``kill -9`` included: the commit is in the WAL file, in the kernel's page
cache, before ``COMMIT`` returns), and the database is never corrupted; only
the last transactions before a power loss may roll back. In both modes a
transaction is all-or-nothing after any crash; tests/unit/test_metadata_crash.py
checks that with real ``kill -9``.
"""

from __future__ import annotations

import functools
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import structlog

from daemon.errors import BerthError, FailedPrecondition, InvalidArgument, ResourceExhausted, Unavailable
from daemon.metadata.leases import LeaseStore
from daemon.metadata.namespaces import NamespaceStore
from daemon.metadata.schema import migrate
from daemon.sqlitethread import SqliteThread

log = structlog.get_logger("berth.metadata")

T = TypeVar("T")

#: How long a statement waits for another process holding the write lock
#: (``berth`` tooling opening the same file) before failing with Unavailable.
BUSY_TIMEOUT_SECONDS = 5.0

SYNCHRONOUS_MODES = ("full", "normal")

_SQLITE_BUSY, _SQLITE_LOCKED, _SQLITE_FULL = 5, 6, 13


def _translate(exc: sqlite3.Error) -> BerthError | None:
    """Operational conditions an operator can act on, as berth errors; bugs stay as they are."""
    code = getattr(exc, "sqlite_errorcode", None)
    if code is None:
        return None
    primary = code & 0xFF
    if primary in (_SQLITE_BUSY, _SQLITE_LOCKED):
        return Unavailable(f"metadata database busy: {exc}")
    if primary == _SQLITE_FULL:
        return ResourceExhausted(f"metadata database: {exc}")
    return None


def _connect(path: Path, synchronous: str) -> tuple[sqlite3.Connection, int]:
    """Open, configure and migrate; runs in the store's thread."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    conn = sqlite3.connect(
        str(path), timeout=BUSY_TIMEOUT_SECONDS, isolation_level=None, check_same_thread=True
    )
    try:
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise FailedPrecondition(f"cannot use WAL journal mode (got {mode!r})")
        conn.execute(f"PRAGMA synchronous = {synchronous.upper()}")
        conn.execute("PRAGMA foreign_keys = ON")
        if conn.execute("PRAGMA foreign_keys").fetchone()[0] != 1:
            raise FailedPrecondition("this SQLite build does not enforce foreign keys")
        version = migrate(conn)
    except BerthError as exc:
        conn.close()
        raise type(exc)(f"metadata database {path}: {exc.message}") from exc
    except sqlite3.Error as exc:
        conn.close()
        raise FailedPrecondition(f"metadata database {path}: {exc}") from exc
    except BaseException:
        conn.close()
        raise
    return conn, version


def _read_job(conn: sqlite3.Connection, fn: Callable[[sqlite3.Connection], T]) -> T:
    # One deferred transaction: every SELECT of fn sees the same snapshot.
    # query_only turns an accidental write into an error instead of a silent rollback.
    conn.execute("PRAGMA query_only = ON")
    try:
        conn.execute("BEGIN")
        try:
            return fn(conn)
        finally:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
    finally:
        conn.execute("PRAGMA query_only = OFF")


def _write_job(conn: sqlite3.Connection, fn: Callable[[sqlite3.Connection], T]) -> T:
    conn.execute("BEGIN IMMEDIATE")
    try:
        result = fn(conn)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return result


class MetadataStore:
    """berth's metadata: namespaces, leases, and (in later schema versions) images,
    containers, content labels and snapshots, all in one SQLite database.

    Open with :meth:`open`, close with :meth:`close`. Typed sub-stores
    (:attr:`namespaces`, :attr:`leases`) cover the common operations; code
    that must change several objects atomically passes a function to
    :meth:`write`, and calls the sub-stores' synchronous ``*_tx`` methods
    (and :meth:`NamespaceStore.ensure`) on the connection it receives.

    Cancelling a caller of :meth:`write` does not stop a transaction that has
    started in the store's thread: it still commits or rolls back as a whole.
    """

    def __init__(
        self,
        path: Path,
        thread: SqliteThread,
        schema_version: int,
    ) -> None:
        self.path = path
        self.schema_version = schema_version
        self._thread = thread
        self._closed = False
        self.namespaces = NamespaceStore(self)
        self.leases = LeaseStore(self, self.namespaces)

    @classmethod
    async def open(cls, path: Path, *, synchronous: str = "full") -> MetadataStore:
        """Open (creating directories and file as needed) and migrate to the latest schema.

        Raises FailedPrecondition when the file is not a usable berth
        database or was written by a newer berth (schema version too high).
        """
        path = Path(path)
        sync = synchronous.lower()
        if sync not in SYNCHRONOUS_MODES:
            raise InvalidArgument(
                f"synchronous {synchronous!r}: must be one of {', '.join(SYNCHRONOUS_MODES)}"
            )
        thread, version = await SqliteThread.start("berth-metadata", functools.partial(_connect, path, sync))
        log.info("metadata.open", path=str(path), schema_version=version, synchronous=sync)
        return cls(path, thread, version)

    async def close(self) -> None:
        """Wait for queued work, close the connection (checkpointing the WAL), stop the thread.

        Idempotent; later calls of read/write raise Unavailable.
        """
        if self._closed:
            return
        self._closed = True
        await self._thread.close()
        log.info("metadata.close", path=str(self.path))

    async def read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn(conn)`` in the store's thread inside one read-only snapshot.

        ``fn`` must return plain values (materialise cursors inside it).
        Writing from ``fn`` raises ``sqlite3.OperationalError``.
        """
        return await self._submit(_read_job, fn)

    async def write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn(conn)`` in the store's thread inside ``BEGIN IMMEDIATE .. COMMIT``.

        If ``fn`` raises, the transaction is rolled back and the exception
        re-raised unchanged; nothing of it is visible. When this returns, the
        transaction is committed (and durable per ``synchronous``).
        """
        return await self._submit(_write_job, fn)

    async def _submit(
        self,
        job: Callable[[sqlite3.Connection, Callable[[sqlite3.Connection], T]], T],
        fn: Callable[[sqlite3.Connection], T],
    ) -> T:
        if self._closed:
            raise Unavailable(f"metadata database {self.path}: store is closed")
        try:
            return await self._thread.run(lambda conn: job(conn, fn))
        except sqlite3.Error as exc:
            translated = _translate(exc)
            if translated is None:
                raise
            raise translated from exc
