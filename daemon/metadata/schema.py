"""The schema of the metadata database: one linear list of versioned migrations.

How the schema grows (read this before adding a table):

1. Append a :class:`Migration` to :data:`MIGRATIONS` with the next version
   number. Never edit or reorder a migration that has shipped: databases in
   the field are at its version and will never run it again.
2. A namespace-scoped table has a ``namespace TEXT NOT NULL`` column with
   ``REFERENCES namespaces(name) ON DELETE RESTRICT`` and is listed in
   :data:`NAMESPACED_TABLES` with the noun operators see ("images"), so that
   deleting a namespace that still holds rows of it is refused with
   ``namespace "x" must be empty, but it still has images``. The foreign key
   is the second guard: it refuses the delete even if the listing is
   forgotten (and a unit test fails).
3. Code that inserts into such a table calls
   :meth:`daemon.metadata.NamespaceStore.ensure` in the same transaction:
   namespaces are created implicitly, as in containerd.

The version lives in ``PRAGMA user_version``; each migration runs in its own
``BEGIN IMMEDIATE`` transaction together with the bump of that number, so a
crash or an error leaves the database at the previous version, untouched. A
database whose version is higher than :data:`LATEST_VERSION` was written by
a newer berth and is refused rather than misread.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import structlog

from daemon.errors import FailedPrecondition, Internal

log = structlog.get_logger("berth.metadata")

#: ``PRAGMA application_id`` of a berth metadata database (ASCII "brth").
APPLICATION_ID = 0x62727468


@dataclass(frozen=True)
class Migration:
    """One step of the schema: SQL statements, then an optional Python step.

    ``statements`` are executed one by one (not as a script: a script would
    commit the surrounding transaction). ``apply`` is for data migrations
    that need code. Foreign keys are off while a migration runs (so a table
    can be rebuilt, as SQLite's ALTER TABLE procedure requires) and
    ``PRAGMA foreign_key_check`` must come back clean before it commits.
    """

    version: int
    name: str
    statements: tuple[str, ...] = ()
    apply: Callable[[sqlite3.Connection], None] | None = None

    def run(self, conn: sqlite3.Connection) -> None:
        for statement in self.statements:
            conn.execute(statement)
        if self.apply is not None:
            self.apply(conn)


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "namespaces",
        (
            f"PRAGMA application_id = {APPLICATION_ID}",
            """
            CREATE TABLE namespaces (
                name TEXT NOT NULL PRIMARY KEY,
                labels TEXT NOT NULL DEFAULT '{}',
                created_at INTEGER NOT NULL,
                updated_at INTEGER NOT NULL
            ) WITHOUT ROWID
            """,
        ),
    ),
    Migration(
        2,
        "leases",
        (
            """
            CREATE TABLE leases (
                namespace TEXT NOT NULL REFERENCES namespaces (name) ON DELETE RESTRICT,
                id TEXT NOT NULL,
                labels TEXT NOT NULL DEFAULT '{}',
                created_at INTEGER NOT NULL,
                PRIMARY KEY (namespace, id)
            ) WITHOUT ROWID
            """,
            """
            CREATE TABLE lease_resources (
                namespace TEXT NOT NULL,
                lease_id TEXT NOT NULL,
                type TEXT NOT NULL,
                id TEXT NOT NULL,
                PRIMARY KEY (namespace, lease_id, type, id),
                FOREIGN KEY (namespace, lease_id) REFERENCES leases (namespace, id) ON DELETE CASCADE
            ) WITHOUT ROWID
            """,
            # Garbage collection asks "does any lease hold this resource?".
            "CREATE INDEX lease_resources_by_resource ON lease_resources (namespace, type, id)",
        ),
    ),
    Migration(
        3,
        "images, content, ingests, snapshots",
        (
            # An image names a target descriptor; everything else it needs is
            # reached from the target through gc.ref labels on content.
            """
            CREATE TABLE images (
                namespace TEXT NOT NULL REFERENCES namespaces (name) ON DELETE RESTRICT,
                name TEXT NOT NULL,
                target_media_type TEXT NOT NULL,
                target_digest TEXT NOT NULL,
                target_size INTEGER NOT NULL,
                target_annotations TEXT NOT NULL DEFAULT '{}',
                labels TEXT NOT NULL DEFAULT '{}',
                created_at INTEGER NOT NULL,
                updated_at INTEGER NOT NULL,
                PRIMARY KEY (namespace, name)
            ) WITHOUT ROWID
            """,
            # Which namespace holds which blob, with its labels; the blob itself
            # lives once in the (namespace-agnostic) content store.
            """
            CREATE TABLE content (
                namespace TEXT NOT NULL REFERENCES namespaces (name) ON DELETE RESTRICT,
                digest TEXT NOT NULL,
                size INTEGER NOT NULL,
                labels TEXT NOT NULL DEFAULT '{}',
                created_at INTEGER NOT NULL,
                updated_at INTEGER NOT NULL,
                PRIMARY KEY (namespace, digest)
            ) WITHOUT ROWID
            """,
            # Garbage collection asks "does any namespace still hold this blob?".
            "CREATE INDEX content_by_digest ON content (digest)",
            # Writes in progress: the namespace's ref -> the backend's ref.
            # ``expected`` is set when the blob is shared from the backend (no
            # bytes to write); ``expires_at`` (ns) only for ingests without a lease.
            """
            CREATE TABLE ingests (
                namespace TEXT NOT NULL REFERENCES namespaces (name) ON DELETE RESTRICT,
                ref TEXT NOT NULL,
                backend_ref TEXT NOT NULL UNIQUE,
                expected TEXT NOT NULL DEFAULT '',
                size INTEGER NOT NULL DEFAULT 0,
                expires_at INTEGER,
                created_at INTEGER NOT NULL,
                PRIMARY KEY (namespace, ref)
            ) WITHOUT ROWID
            """,
            # Snapshots per (namespace, snapshotter); ``backend_key`` is the key
            # the snapshotter knows. ``parent`` is NULL for a base snapshot; the
            # self reference makes a parent with children undeletable (checked
            # at commit, so one transaction may remove a whole chain in any order).
            """
            CREATE TABLE snapshots (
                namespace TEXT NOT NULL REFERENCES namespaces (name) ON DELETE RESTRICT,
                snapshotter TEXT NOT NULL,
                key TEXT NOT NULL,
                backend_key TEXT NOT NULL,
                parent TEXT,
                kind INTEGER NOT NULL,
                labels TEXT NOT NULL DEFAULT '{}',
                created_at INTEGER NOT NULL,
                updated_at INTEGER NOT NULL,
                PRIMARY KEY (namespace, snapshotter, key),
                UNIQUE (snapshotter, backend_key),
                FOREIGN KEY (namespace, snapshotter, parent)
                    REFERENCES snapshots (namespace, snapshotter, key) DEFERRABLE INITIALLY DEFERRED
            ) WITHOUT ROWID
            """,
            "CREATE INDEX snapshots_by_parent ON snapshots (namespace, snapshotter, parent)",
            # Monotonic counters for backend keys and refs: a number is never
            # reused, so a backend object left by a crash never collides with a new one.
            """
            CREATE TABLE sequences (
                name TEXT NOT NULL PRIMARY KEY,
                value INTEGER NOT NULL
            ) WITHOUT ROWID
            """,
        ),
    ),
    Migration(
        4,
        "containers",
        (
            # A container is metadata only (containerd's containers.Store): the
            # spec, runtime options and extensions are protobuf Any values kept
            # as (type URL, bytes), never decoded here. ``extensions`` is a JSON
            # object of name -> {"type_url", "value" (base64)}.
            """
            CREATE TABLE containers (
                namespace TEXT NOT NULL REFERENCES namespaces (name) ON DELETE RESTRICT,
                id TEXT NOT NULL,
                labels TEXT NOT NULL DEFAULT '{}',
                image TEXT NOT NULL DEFAULT '',
                runtime_name TEXT NOT NULL,
                runtime_options_type TEXT,
                runtime_options_value BLOB,
                spec_type TEXT,
                spec_value BLOB,
                snapshotter TEXT NOT NULL DEFAULT '',
                snapshot_key TEXT NOT NULL DEFAULT '',
                extensions TEXT NOT NULL DEFAULT '{}',
                sandbox TEXT NOT NULL DEFAULT '',
                created_at INTEGER NOT NULL,
                updated_at INTEGER NOT NULL,
                PRIMARY KEY (namespace, id)
            ) WITHOUT ROWID
            """,
        ),
    ),
)

#: Every table whose rows belong to a namespace, with the noun used in the
#: "must be empty, but it still has ..." error. Child tables that hang off
#: one of these (lease_resources) are covered through their parent.
NAMESPACED_TABLES: tuple[tuple[str, str], ...] = (
    ("leases", "leases"),
    ("images", "images"),
    ("content", "content"),
    ("ingests", "ingests"),
    ("snapshots", "snapshots"),
    ("containers", "containers"),
)

LATEST_VERSION = len(MIGRATIONS)


def check_sequence(migrations: Sequence[Migration]) -> None:
    """Versions must be exactly 1..N in order: a gap or a duplicate is a bug."""
    for index, migration in enumerate(migrations, start=1):
        if migration.version != index:
            raise Internal(
                f"metadata migration {migration.name!r}: version {migration.version}, expected {index}"
            )


def user_version(conn: sqlite3.Connection) -> int:
    row = conn.execute("PRAGMA user_version").fetchone()
    return int(row[0])


def _refuse_newer(current: int, latest: int) -> None:
    if current > latest:
        raise FailedPrecondition(
            f"metadata schema version {current} is newer than this berth supports ({latest}): "
            "the database was written by a newer berth; upgrade berth or restore a backup"
        )


def migrate(conn: sqlite3.Connection, migrations: Sequence[Migration] = MIGRATIONS) -> int:
    """Bring the database up to ``len(migrations)`` and return the version reached.

    ``conn`` must be in autocommit mode (``isolation_level=None``) with no
    transaction open. Safe against a concurrent opener: the version is read
    again under the write lock before each step.
    """
    check_sequence(migrations)
    latest = len(migrations)
    app_id = int(conn.execute("PRAGMA application_id").fetchone()[0])
    if app_id not in (0, APPLICATION_ID):
        raise FailedPrecondition(f"not a berth metadata database (application_id {app_id:#x})")
    current = user_version(conn)
    _refuse_newer(current, latest)
    for migration in migrations[current:]:
        conn.execute("PRAGMA foreign_keys = OFF")  # a no-op inside a transaction: set it first
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                found = user_version(conn)
                _refuse_newer(found, latest)
                if found >= migration.version:  # another process got there first
                    conn.execute("ROLLBACK")
                    continue
                migration.run(conn)
                broken = conn.execute("PRAGMA foreign_key_check").fetchall()
                if broken:
                    raise Internal(
                        f"metadata migration {migration.version} ({migration.name}): "
                        f"leaves {len(broken)} foreign key violation(s), first in table {broken[0][0]}"
                    )
                conn.execute(f"PRAGMA user_version = {int(migration.version)}")
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise Internal(
                f"metadata migration {migration.version} ({migration.name}) failed: {exc}"
            ) from exc
        finally:
            conn.execute("PRAGMA foreign_keys = ON")
        log.info("metadata.migrate", version=migration.version, name=migration.name)
    return user_version(conn)
