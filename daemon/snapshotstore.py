"""Storage for snapshotters: the metadata of snapshots, and where their directories live.

This is containerd's ``snapshots/storage`` for berth: what every
directory-based snapshotter needs besides its own mount logic, reusable by
third-party snapshotters too. It holds

* :class:`MetaStore`: one SQLite file per snapshotter root. Each record maps
  a key to a numeric id, kind, parent, labels, created/updated times and,
  once committed, the disk usage measured at commit. All SQLite work runs in
  one worker thread that owns the connection (as :mod:`daemon.metadata.store`
  does); the event loop only awaits. WAL journal, ``synchronous=FULL``: a
  returned commit is on disk.
* :class:`SnapshotDirs`: the on-disk layout keyed by those ids,
  ``<root>/snapshots/<id>/fs`` (the files) and ``/work`` (overlay's work
  dir). Numeric ids keep paths short, which is what lets 128 overlay layers
  fit in one mount option page.
* :func:`disk_usage`: inodes and bytes used under a directory.

How a snapshotter uses it (every call of a :class:`Transaction` runs in the
store's thread, inside one SQLite transaction, so the filesystem work done in
the same function is all-or-nothing with the record)::

    ms = await MetaStore.open(root / "metadata.db")
    dirs = SnapshotDirs(root)

    def create(tx: Transaction) -> Snapshot:
        snap = tx.create(Kind.ACTIVE, key, parent, labels)  # AlreadyExists, NotFound...
        dirs.install(snap.id)                              # <root>/snapshots/<id>/fs
        return snap                                        # a raise rolls the record back

    snap = await ms.write(create)
    # mounts from dirs.fs(snap.id) and [dirs.fs(p) for p in snap.parent_ids]

``stat``/``update``/``walk`` are one call each (:meth:`MetaStore.stat` ...).
``remove`` drops the record only; ``cleanup`` moves directories whose id has
no record to ``<root>/trash`` (in the store's thread, so it never races a
create) and then deletes them (:meth:`SnapshotDirs.cleanup`).

Errors: NotFound (no such key or parent), AlreadyExists (key taken),
FailedPrecondition (parent not committed, removing a parent, committing a
view, mounting a committed snapshot), InvalidArgument (empty key, bad label,
immutable field); Unavailable after :meth:`MetaStore.close`.

Crash safety: a record and its directory appear together (the directory is
renamed into place inside the transaction). A crash after the rename but
before COMMIT leaves a directory without a record; its id may be handed out
again, so :meth:`SnapshotDirs.install` clears such a leftover first, and
cleanup removes the others. Committed snapshots are never touched by either.
"""

from __future__ import annotations

import asyncio
import functools
import os
import shutil
import sqlite3
import stat
import uuid
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TypeVar

import structlog

from daemon import filters
from daemon.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from daemon.protocols import Kind, SnapshotInfo, Usage
from daemon.sqlitethread import SqliteThread

log = structlog.get_logger("berth.snapshotstore")

T = TypeVar("T")

SCHEMA_VERSION = 1
#: containerd's limit on one label: key and value together.
MAX_LABEL_BYTES = 4096
BUSY_TIMEOUT_SECONDS = 5.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS snapshots (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT NOT NULL UNIQUE,
    kind INTEGER NOT NULL CHECK (kind IN (1, 2, 3)),
    parent INTEGER REFERENCES snapshots(id),
    created_ns INTEGER NOT NULL,
    updated_ns INTEGER NOT NULL,
    inodes INTEGER NOT NULL DEFAULT 0,
    size INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS snapshots_by_parent ON snapshots(parent);
CREATE TABLE IF NOT EXISTS labels (
    snapshot INTEGER NOT NULL REFERENCES snapshots(id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (snapshot, name)
) WITHOUT ROWID;
"""

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _now_ns() -> int:
    # Microsecond-exact so that times read back compare equal to what
    # datetime.now() callers saw before and after the call.
    return ((datetime.now(UTC) - _EPOCH) // timedelta(microseconds=1)) * 1000


def _time(ns: int) -> datetime:
    return _EPOCH + timedelta(microseconds=ns // 1000)


def validate_labels(labels: Mapping[str, str] | None, what: str) -> dict[str, str]:
    """Labels as a plain dict, or InvalidArgument naming the label at fault."""
    out: dict[str, str] = {}
    for k, v in (labels or {}).items():
        if not isinstance(k, str) or not isinstance(v, str) or not k:
            raise InvalidArgument(f"{what}: label {k!r}: keys and values must be strings, keys non-empty")
        size = len(k.encode()) + len(v.encode())
        if size > MAX_LABEL_BYTES:
            raise InvalidArgument(
                f"{what}: label {k!r}: key and value are {size} bytes, more than {MAX_LABEL_BYTES}"
            )
        out[k] = v
    return out


@dataclass(frozen=True)
class Snapshot:
    """A snapshot as its snapshotter needs it: where it lives and what is under it."""

    id: int
    key: str
    kind: Kind
    #: ids of the parent chain, the direct parent first
    parent_ids: tuple[int, ...] = ()
    #: measured at commit; zero for active and view snapshots
    usage: Usage = field(default_factory=Usage)


# -- transactions --------------------------------------------------------------


class Transaction:
    """The store's operations on one open SQLite transaction (store thread only).

    Obtained through :meth:`MetaStore.read` / :meth:`MetaStore.write`; never
    keep it beyond the function it was passed to.
    """

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    # reading

    def _row(self, key: str) -> tuple[int, int, int | None, int, int, int, int]:
        if not key:
            raise InvalidArgument("snapshot key: must not be empty")
        row = self.conn.execute(
            "SELECT id, kind, parent, created_ns, updated_ns, inodes, size FROM snapshots WHERE key = ?",
            (key,),
        ).fetchone()
        if row is None:
            raise NotFound(f"snapshot {key!r}: not found")
        return row  # type: ignore[no-any-return]

    def _labels(self, sid: int) -> dict[str, str]:
        return dict(self.conn.execute("SELECT name, value FROM labels WHERE snapshot = ?", (sid,)).fetchall())

    def _key_of(self, sid: int | None) -> str:
        if sid is None:
            return ""
        row = self.conn.execute("SELECT key FROM snapshots WHERE id = ?", (sid,)).fetchone()
        return str(row[0]) if row else ""

    def _parents(self, sid: int) -> tuple[int, ...]:
        rows = self.conn.execute(
            """WITH RECURSIVE chain(id, parent, depth) AS (
                   SELECT id, parent, 0 FROM snapshots WHERE id = ?
                   UNION ALL
                   SELECT s.id, s.parent, c.depth + 1 FROM snapshots s JOIN chain c ON s.id = c.parent)
               SELECT id FROM chain WHERE depth > 0 ORDER BY depth""",
            (sid,),
        ).fetchall()
        return tuple(r[0] for r in rows)

    def exists(self, key: str) -> bool:
        return self.conn.execute("SELECT 1 FROM snapshots WHERE key = ?", (key,)).fetchone() is not None

    def info(self, key: str) -> SnapshotInfo:
        """NotFound if ``key`` has no record."""
        sid, kind, parent, created, updated, _, _ = self._row(key)
        return SnapshotInfo(
            kind=Kind(kind),
            name=key,
            parent=self._key_of(parent),
            labels=self._labels(sid),
            created_at=_time(created),
            updated_at=_time(updated),
        )

    def get(self, key: str) -> Snapshot:
        """Any snapshot by key, with its parent chain and recorded usage."""
        sid, kind, _, _, _, inodes, size = self._row(key)
        return Snapshot(sid, key, Kind(kind), self._parents(sid), Usage(inodes=inodes, size=size))

    def active_or_view(self, key: str) -> Snapshot:
        """Like :meth:`get`, but FailedPrecondition for a committed snapshot (it has no mounts)."""
        snap = self.get(key)
        if snap.kind is Kind.COMMITTED:
            raise FailedPrecondition(f"snapshot {key!r}: is committed; only active and view snapshots mount")
        return snap

    def walk(self, flt: filters.Filter = filters.ALWAYS) -> list[SnapshotInfo]:
        """Every snapshot matching ``flt`` (fields ``name``, ``parent``, ``kind``, ``labels``)."""
        keys = dict(self.conn.execute("SELECT id, key FROM snapshots").fetchall())
        labels: dict[int, dict[str, str]] = {}
        for sid, name, value in self.conn.execute("SELECT snapshot, name, value FROM labels"):
            labels.setdefault(sid, {})[name] = value
        out: list[SnapshotInfo] = []
        rows = self.conn.execute(
            "SELECT id, key, kind, parent, created_ns, updated_ns FROM snapshots ORDER BY id"
        )
        for sid, key, kind, parent, created, updated in rows.fetchall():
            info = SnapshotInfo(
                kind=Kind(kind),
                name=key,
                parent=keys.get(parent, "") if parent is not None else "",
                labels=labels.get(sid, {}),
                created_at=_time(created),
                updated_at=_time(updated),
            )
            if flt.match(filters.adapt_mapping(_filter_fields(info))):
                out.append(info)
        return out

    def id_map(self) -> dict[int, str]:
        """id -> key of every record: the directories that must be kept."""
        return dict(self.conn.execute("SELECT id, key FROM snapshots").fetchall())

    # writing

    def create(
        self, kind: Kind, key: str, parent: str = "", labels: Mapping[str, str] | None = None
    ) -> Snapshot:
        """A new ACTIVE or VIEW record on top of the committed ``parent`` ("" for none)."""
        if kind not in (Kind.ACTIVE, Kind.VIEW):
            raise InvalidArgument(
                f"snapshot {key!r}: can only create active or view snapshots, not {kind.name}"
            )
        if not key:
            raise InvalidArgument("snapshot key: must not be empty")
        clean = validate_labels(labels, f"snapshot {key!r}")
        if self.exists(key):
            raise AlreadyExists(f"snapshot {key!r}: already exists")
        parent_id: int | None = None
        parents: tuple[int, ...] = ()
        if parent:
            try:
                pid, pkind, *_ = self._row(parent)
            except NotFound:
                raise NotFound(f"snapshot {key!r}: parent {parent!r} not found") from None
            if pkind != Kind.COMMITTED:
                raise FailedPrecondition(
                    f"snapshot {key!r}: parent {parent!r} is {Kind(pkind).name.lower()}, not committed"
                )
            parent_id = pid
            parents = (pid, *self._parents(pid))
        now = _now_ns()
        cur = self.conn.execute(
            "INSERT INTO snapshots (key, kind, parent, created_ns, updated_ns) VALUES (?, ?, ?, ?, ?)",
            (key, int(kind), parent_id, now, now),
        )
        sid = int(cur.lastrowid or 0)
        self._set_labels(sid, clean)
        return Snapshot(sid, key, kind, parents)

    def commit_active(
        self, key: str, name: str, usage: Usage, labels: Mapping[str, str] | None = None
    ) -> int:
        """Turn the ACTIVE ``key`` into COMMITTED ``name`` (same id, so same directory).

        The committed snapshot's labels are ``labels`` (not the active's),
        its times now, as in containerd. Returns the id.
        """
        if not name:
            raise InvalidArgument(f"commit {key!r}: name must not be empty")
        clean = validate_labels(labels, f"snapshot {name!r}")
        sid, kind, *_ = self._row(key)
        if kind != Kind.ACTIVE:
            raise FailedPrecondition(
                f"commit {key!r}: snapshot is {Kind(kind).name.lower()}; only active snapshots commit"
            )
        if self.exists(name):
            raise AlreadyExists(f"commit {key!r}: snapshot {name!r} already exists")
        now = _now_ns()
        self.conn.execute(
            "UPDATE snapshots SET key = ?, kind = ?, created_ns = ?, updated_ns = ?, inodes = ?, size = ?"
            " WHERE id = ?",
            (name, int(Kind.COMMITTED), now, now, usage.inodes, usage.size, sid),
        )
        self.conn.execute("DELETE FROM labels WHERE snapshot = ?", (sid,))
        self._set_labels(sid, clean)
        return int(sid)

    def remove(self, key: str) -> tuple[int, Kind]:
        """Drop the record (and labels) of ``key``; FailedPrecondition while it has children."""
        sid, kind, *_ = self._row(key)
        child = self.conn.execute("SELECT key FROM snapshots WHERE parent = ? LIMIT 1", (sid,)).fetchone()
        if child is not None:
            raise FailedPrecondition(f"cannot remove snapshot {key!r}: it is the parent of {child[0]!r}")
        self.conn.execute("DELETE FROM snapshots WHERE id = ?", (sid,))
        return int(sid), Kind(kind)

    def update(self, info: SnapshotInfo, fieldpaths: Sequence[str] = ()) -> SnapshotInfo:
        """Change labels only, containerd's way.

        No field paths: the labels become ``info.labels``. ``labels``: the
        same. ``labels.<k>``: label ``k`` is set from ``info.labels`` or
        removed if absent there. Any other path is InvalidArgument (the
        rest of a snapshot is immutable). Other fields of ``info`` are ignored.
        """
        sid, *_ = self._row(info.name)
        current = self._labels(sid)
        given = validate_labels(info.labels, f"snapshot {info.name!r}")
        if not fieldpaths:
            current = given
        for path in fieldpaths:
            if path == "labels":
                current = dict(given)
            elif path.startswith("labels."):
                label = path[len("labels.") :]
                if label in given:
                    current[label] = given[label]
                else:
                    current.pop(label, None)
            else:
                raise InvalidArgument(f"snapshot {info.name!r}: cannot update field {path!r} (only labels)")
        self.conn.execute("UPDATE snapshots SET updated_ns = ? WHERE id = ?", (_now_ns(), sid))
        self.conn.execute("DELETE FROM labels WHERE snapshot = ?", (sid,))
        self._set_labels(sid, current)
        return self.info(info.name)

    def _set_labels(self, sid: int, labels: Mapping[str, str]) -> None:
        self.conn.executemany(
            "INSERT INTO labels (snapshot, name, value) VALUES (?, ?, ?)",
            [(sid, k, v) for k, v in labels.items()],
        )


def _filter_fields(info: SnapshotInfo) -> dict[str, object]:
    """The fields a walk filter sees, named as containerd's snapshot adaptor names them."""
    return {"name": info.name, "parent": info.parent, "kind": info.kind.name.lower(), "labels": info.labels}


# -- the store ----------------------------------------------------------------


def _connect(path: Path) -> tuple[sqlite3.Connection, int]:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    conn = sqlite3.connect(str(path), timeout=BUSY_TIMEOUT_SECONDS, isolation_level=None)
    try:
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise FailedPrecondition(f"snapshot database {path}: cannot use WAL journal mode (got {mode!r})")
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("PRAGMA foreign_keys = ON")
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version == 0:  # new (or being created by another process: IF NOT EXISTS)
            conn.executescript(f"BEGIN IMMEDIATE;{_SCHEMA}PRAGMA user_version = {SCHEMA_VERSION};COMMIT;")
        elif version > SCHEMA_VERSION:
            raise FailedPrecondition(
                f"snapshot database {path}: schema version {version} is newer than this berth's "
                f"({SCHEMA_VERSION})"
            )
    except sqlite3.Error as exc:
        conn.close()
        raise FailedPrecondition(f"snapshot database {path}: {exc}") from exc
    except BaseException:
        conn.close()
        raise
    return conn, version or SCHEMA_VERSION


def _job(conn: sqlite3.Connection, fn: Callable[[Transaction], T], writable: bool) -> T:
    if not writable:  # a write slipped into a read function fails loudly instead of vanishing
        conn.execute("PRAGMA query_only = ON")
    try:
        conn.execute("BEGIN IMMEDIATE" if writable else "BEGIN")
        try:
            result = fn(Transaction(conn))
            conn.execute("COMMIT" if writable else "ROLLBACK")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return result
    finally:
        if not writable:
            conn.execute("PRAGMA query_only = OFF")


class MetaStore:
    """The snapshot records of one snapshotter root (see the module docstring).

    :meth:`read` / :meth:`write` run a function on a :class:`Transaction`
    in the store's thread; the async helpers below are one transaction each.
    A read function may do filesystem work too (cleanup lists directories in
    one); it sees a consistent snapshot of the records and is serialised with
    every write.
    """

    def __init__(self, path: Path, thread: SqliteThread):
        self.path = path
        self._thread = thread
        self._closed = False

    @classmethod
    async def open(cls, path: Path) -> MetaStore:
        """Open (creating it and its directory) the database at ``path``."""
        path = Path(path)
        thread, version = await SqliteThread.start("berth-snapdb", functools.partial(_connect, path))
        log.debug("snapshotstore.open", path=str(path), schema_version=version)
        return cls(path, thread)

    async def close(self) -> None:
        """Finish queued work and close; idempotent. Later calls raise Unavailable."""
        if self._closed:
            return
        self._closed = True
        await self._thread.close()

    async def read(self, fn: Callable[[Transaction], T]) -> T:
        """``fn(tx)`` in a read-only transaction (a write in it raises ``sqlite3.OperationalError``)."""
        return await self._submit(fn, writable=False)

    async def write(self, fn: Callable[[Transaction], T]) -> T:
        """``fn(tx)`` in a write transaction: committed if it returns, rolled back if it raises."""
        return await self._submit(fn, writable=True)

    async def _submit(self, fn: Callable[[Transaction], T], *, writable: bool) -> T:
        if self._closed:
            raise Unavailable(f"snapshot database {self.path}: store is closed")
        try:
            return await self._thread.run(lambda conn: _job(conn, fn, writable))
        except sqlite3.OperationalError as exc:
            code = getattr(exc, "sqlite_errorcode", 0) & 0xFF
            if code in (5, 6):  # SQLITE_BUSY, SQLITE_LOCKED
                raise Unavailable(f"snapshot database {self.path}: busy: {exc}") from exc
            if code == 13:  # SQLITE_FULL
                raise ResourceExhausted(f"snapshot database {self.path}: {exc}") from exc
            raise

    # one-transaction helpers

    async def stat(self, key: str) -> SnapshotInfo:
        return await self.read(lambda tx: tx.info(key))

    async def get(self, key: str) -> Snapshot:
        return await self.read(lambda tx: tx.get(key))

    async def active_or_view(self, key: str) -> Snapshot:
        return await self.read(lambda tx: tx.active_or_view(key))

    async def update(self, info: SnapshotInfo, fieldpaths: Sequence[str] = ()) -> SnapshotInfo:
        return await self.write(lambda tx: tx.update(info, fieldpaths))

    async def walk(self, filter_strings: Sequence[str] = ()) -> list[SnapshotInfo]:
        """Matching snapshots (InvalidArgument for a malformed filter, before any I/O)."""
        flt = filters.parse(list(filter_strings))
        return await self.read(lambda tx: tx.walk(flt))

    async def remove(self, key: str) -> tuple[int, Kind]:
        return await self.write(lambda tx: tx.remove(key))


# -- directories -----------------------------------------------------------------


class SnapshotDirs:
    """``<root>/snapshots/<id>/{fs,work}``, plus ``staging`` and ``trash`` beside it.

    * ``staging/<name>``: a directory being filled outside the store's thread
      (a copy of the parent, say) before :meth:`install` renames it into
      place inside the create transaction. Names handed out by
      :meth:`stage` are remembered, so a concurrent cleanup keeps them.
    * ``trash/``: what cleanup is deleting; emptied by :meth:`cleanup`.

    All methods block (they touch the filesystem): call them in the store's
    thread (inside a transaction function) or via ``asyncio.to_thread``.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.snapshots = self.root / "snapshots"
        self._snapshots_str = str(self.snapshots)
        self.staging = self.root / "staging"
        self.trash = self.root / "trash"
        self._staged: set[str] = set()

    def ensure(self) -> None:
        for d in (self.snapshots, self.staging, self.trash):
            d.mkdir(parents=True, exist_ok=True, mode=0o700)

    def dir(self, sid: int) -> Path:
        return self.snapshots / str(sid)

    def fs(self, sid: int) -> Path:
        return self.snapshots / str(sid) / "fs"

    def fs_str(self, sid: int) -> str:
        """``str(fs(sid))`` without pathlib: mount options of deep chains build hundreds of these."""
        return f"{self._snapshots_str}/{sid}/fs"

    def work(self, sid: int) -> Path:
        return self.snapshots / str(sid) / "work"

    def stage(self) -> Path:
        """A new, not yet existing path under ``staging`` that cleanup leaves alone."""
        name = uuid.uuid4().hex
        self._staged.add(name)
        return self.staging / name

    def unstage(self, path: Path) -> None:
        """Forget a staged path (after :meth:`install` moved it, or to abandon it: it is deleted)."""
        self._staged.discard(path.name)
        if path.exists():
            _rmtree(path)

    def install(self, sid: int, staged: Path | None = None, *, work: bool = False, mode: int = 0o755) -> Path:
        """Create ``snapshots/<sid>`` (from ``staged`` if given, else with an empty ``fs``).

        Called inside the transaction that created ``sid``: a directory
        already there can only be the leftover of a crashed create whose id
        was rolled back, and is deleted first. ``work`` adds ``work/``.
        If this raises, nothing of ``snapshots/<sid>`` is left.
        """
        target = self.dir(sid)
        if target.exists() or target.is_symlink():
            log.warning("snapshotstore.leftover", path=str(target))
            _rmtree(target)
        try:
            if staged is not None:
                os.rename(staged, target)
            else:
                target.mkdir(mode=0o700)
                fs = target / "fs"
                fs.mkdir()
                fs.chmod(mode)
            if work:
                (target / "work").mkdir(mode=0o700, exist_ok=True)
        except BaseException:
            if target.exists():
                _rmtree(target)
            raise
        return target

    def orphans_to_trash(self, keep: Collection[int]) -> int:
        """Move ``snapshots/*`` whose id is not in ``keep``, and abandoned staging, to trash.

        Call it in the store's thread with ``keep = tx.id_map()``, so no create
        can slip in between the listing and the moves. Returns how many moved.
        """
        self.ensure()
        keep_names = {str(i) for i in keep}
        moved = 0
        for parent, keep_set in ((self.snapshots, keep_names), (self.staging, set(self._staged))):
            for entry in os.scandir(parent):
                if entry.name in keep_set:
                    continue
                os.rename(entry.path, self.trash / f"{parent.name}-{entry.name}-{uuid.uuid4().hex[:8]}")
                moved += 1
        return moved

    def empty_trash(self) -> int:
        """Delete everything in trash (slow for big snapshots: run it in a thread)."""
        count = 0
        for entry in os.scandir(self.trash):
            _rmtree(Path(entry.path))
            count += 1
        return count

    async def cleanup(self, store: MetaStore) -> int:
        """The whole of a snapshotter's ``cleanup``: orphans to trash, then trash emptied."""
        moved = await store.read(lambda tx: self.orphans_to_trash(tx.id_map()))
        removed = await asyncio.to_thread(self.empty_trash)
        if moved or removed:
            log.info("snapshotstore.cleanup", root=str(self.root), removed=removed)
        return removed


def _rmtree(path: Path) -> None:
    """Delete a tree; entries vanishing meanwhile are fine, anything else raises."""

    def onerror(
        func: Callable[..., object], p: str, info: tuple[type[BaseException], BaseException, object]
    ) -> None:
        if not isinstance(info[1], FileNotFoundError):
            raise info[1]

    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
        return
    shutil.rmtree(path, onerror=onerror)


def disk_usage(path: Path) -> Usage:
    """Inodes and bytes (allocated blocks) under ``path``, each inode counted once.

    What containerd's ``fs.DiskUsage`` measures. Blocks, not file sizes:
    a sparse or reflinked file costs what it really takes. Blocks: call it
    in a thread.
    """
    seen: set[tuple[int, int]] = set()
    size = 0

    def visit(st: os.stat_result) -> None:
        nonlocal size
        ident = (st.st_dev, st.st_ino)
        if ident in seen:
            return
        seen.add(ident)
        size += st.st_blocks * 512

    try:
        visit(os.lstat(path))
    except FileNotFoundError:
        return Usage()
    stack = [os.fspath(path)]
    while stack:
        current = stack.pop()
        try:
            entries = list(os.scandir(current))
        except (FileNotFoundError, NotADirectoryError):
            continue
        for entry in entries:
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            visit(st)
            if stat.S_ISDIR(st.st_mode):
                stack.append(entry.path)
    return Usage(inodes=len(seen), size=size)


__all__ = [
    "MetaStore",
    "Snapshot",
    "SnapshotDirs",
    "Transaction",
    "disk_usage",
    "validate_labels",
]
