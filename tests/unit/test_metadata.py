"""Metadata store: namespaces, leases, validation, migrations, threading, persistence."""

from __future__ import annotations

import asyncio
import re
import sqlite3
import threading
from collections.abc import AsyncIterator
from datetime import UTC
from pathlib import Path
from typing import Any

import pytest

from daemon.errors import (
    AlreadyExists,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    Unavailable,
    Unimplemented,
)
from daemon.metadata import (
    LATEST_VERSION,
    MIGRATIONS,
    NAMESPACED_TABLES,
    LeaseResource,
    MetadataStore,
    Migration,
)
from daemon.metadata.encoding import from_datetime, to_datetime
from daemon.metadata.schema import APPLICATION_ID, check_sequence, migrate, user_version

DIGEST = "sha256:" + "a" * 64
DIGEST2 = "sha256:" + "b" * 64


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[MetadataStore]:
    s = await MetadataStore.open(tmp_path / "meta" / "meta.db")
    try:
        yield s
    finally:
        await s.close()


# -- opening --------------------------------------------------------------------


async def test_open_creates_wal_database_at_latest_version(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "meta.db"
    s = await MetadataStore.open(path)
    try:
        assert path.is_file()
        assert s.schema_version == LATEST_VERSION == len(MIGRATIONS)

        def pragmas(conn: sqlite3.Connection) -> tuple[Any, ...]:
            return tuple(
                conn.execute(f"PRAGMA {p}").fetchone()[0]
                for p in ("journal_mode", "synchronous", "foreign_keys", "user_version", "application_id")
            )

        assert await s.read(pragmas) == ("wal", 2, 1, LATEST_VERSION, APPLICATION_ID)
    finally:
        await s.close()


async def test_synchronous_normal_is_selectable_and_junk_refused(tmp_path: Path) -> None:
    s = await MetadataStore.open(tmp_path / "meta.db", synchronous="normal")
    try:
        assert await s.read(lambda c: c.execute("PRAGMA synchronous").fetchone()[0]) == 1
    finally:
        await s.close()
    with pytest.raises(InvalidArgument, match="synchronous 'off'"):
        await MetadataStore.open(tmp_path / "other.db", synchronous="off")


async def test_garbage_file_is_refused_naming_the_path(tmp_path: Path) -> None:
    path = tmp_path / "meta.db"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(FailedPrecondition, match=r"meta\.db.*not a database"):
        await MetadataStore.open(path)


async def test_foreign_sqlite_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "meta.db"
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA application_id = 1234")
    conn.commit()
    conn.close()
    with pytest.raises(FailedPrecondition, match="not a berth metadata database"):
        await MetadataStore.open(path)


# -- namespaces -----------------------------------------------------------------


async def test_namespace_crud(store: MetadataStore) -> None:
    created = await store.namespaces.create("k8s.io", {"owner": "kubelet"})
    assert created.name == "k8s.io"
    assert created.labels == {"owner": "kubelet"}
    assert created.created_at.tzinfo == UTC
    assert created.updated_at == created.created_at
    await store.namespaces.create("default")

    got = await store.namespaces.get("k8s.io")
    assert got == created
    assert [n.name for n in await store.namespaces.list()] == ["default", "k8s.io"]

    with pytest.raises(AlreadyExists, match=re.escape('namespace "k8s.io": already exists')):
        await store.namespaces.create("k8s.io")

    await store.namespaces.delete("k8s.io")
    with pytest.raises(NotFound, match=re.escape('namespace "k8s.io": not found')):
        await store.namespaces.get("k8s.io")
    with pytest.raises(NotFound, match=re.escape('namespace "k8s.io": not found')):
        await store.namespaces.delete("k8s.io")
    assert [n.name for n in await store.namespaces.list()] == ["default"]


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("Bad Name", 'namespace "Bad Name": invalid: must match [A-Za-z0-9]+([._-][A-Za-z0-9]+)*'),
        ("-lead", "must match"),
        ("trail.", "must match"),
        ("a..b", "must match"),
        ("caf\u00e9", "must match"),
        ("ok\n", "must match"),
        ("", "namespace: invalid: must not be empty"),
        ("a" * 77, "greater than maximum length (76 characters)"),
    ],
)
async def test_namespace_name_validation(store: MetadataStore, name: str, message: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        await store.namespaces.create(name)
    assert message in str(info.value)
    assert await store.namespaces.list() == []


async def test_longest_and_punctuated_names_are_valid(store: MetadataStore) -> None:
    for name in ("a" * 76, "A.b-c_d", "0"):
        await store.namespaces.create(name)
    assert len(await store.namespaces.list()) == 3


async def test_label_size_limit_names_the_key(store: MetadataStore) -> None:
    key = "big.key"
    fits = {key: "v" * (4096 - len(key))}
    await store.namespaces.create("fits", fits)
    assert (await store.namespaces.get("fits")).labels == fits

    with pytest.raises(InvalidArgument) as info:
        await store.namespaces.create("toobig", {key: "v" * (4097 - len(key))})
    assert 'label "big.key"' in str(info.value)
    assert "(4097 bytes) greater than maximum size (4096 bytes)" in str(info.value)
    # multi-byte characters count as bytes, as in Go
    with pytest.raises(InvalidArgument, match='label "k"'):
        await store.namespaces.create("utf8", {"k": "\u00e9" * 2048})
    with pytest.raises(InvalidArgument, match=re.escape('label "big.key"')):
        await store.namespaces.update("fits", {key: "v" * 5000}, ["labels.big.key"])


async def test_field_mask_update(store: MetadataStore) -> None:
    created = await store.namespaces.create("ns", {"a": "1", "b": "2"})

    ns = await store.namespaces.update("ns", {"a": "x", "c": "ignored"}, ["labels.a"])
    assert ns.labels == {"a": "x", "b": "2"}
    assert ns.created_at == created.created_at
    assert ns.updated_at >= created.updated_at

    ns = await store.namespaces.update("ns", {}, ["labels.b"])  # absent in labels: cleared
    assert ns.labels == {"a": "x"}
    ns = await store.namespaces.update("ns", {"a": ""}, ["labels.a", "labels.dotted.key"])
    assert ns.labels == {}
    ns = await store.namespaces.update("ns", {"dotted.key": "d", "z": "9"}, ["labels.dotted.key"])
    assert ns.labels == {"dotted.key": "d"}

    ns = await store.namespaces.update("ns", {"z": "9", "empty": ""}, ["labels"])
    assert ns.labels == {"z": "9"}
    ns = await store.namespaces.update("ns", {"q": "1"})  # no mask: replace
    assert ns.labels == {"q": "1"}
    assert (await store.namespaces.get("ns")).labels == {"q": "1"}

    with pytest.raises(InvalidArgument, match='cannot update "name" field'):
        await store.namespaces.update("ns", {}, ["name"])
    with pytest.raises(InvalidArgument, match="empty label key"):
        await store.namespaces.update("ns", {}, ["labels."])
    with pytest.raises(NotFound, match='namespace "missing": not found'):
        await store.namespaces.update("missing", {"a": "b"})
    assert (await store.namespaces.get("ns")).labels == {"q": "1"}


# -- leases -----------------------------------------------------------------------


async def test_lease_creates_namespace_implicitly(store: MetadataStore) -> None:
    lease = await store.leases.create("implicit", "pull-1", {"gc": "later"})
    assert lease.id == "pull-1"
    assert lease.labels == {"gc": "later"}
    assert lease.created_at.tzinfo == UTC
    ns = await store.namespaces.get("implicit")
    assert ns.labels == {}
    # ensure does not disturb an existing namespace
    await store.namespaces.update("implicit", {"keep": "me"})
    await store.leases.create("implicit", "pull-2")
    assert (await store.namespaces.get("implicit")).labels == {"keep": "me"}


async def test_lease_crud_and_resources(store: MetadataStore) -> None:
    await store.leases.create("ns1", "l1")
    await store.leases.create("ns1", "l0")
    await store.leases.create("ns2", "l1")  # same id, other namespace: independent
    with pytest.raises(AlreadyExists, match='lease "l1": already exists'):
        await store.leases.create("ns1", "l1")
    assert [le.id for le in await store.leases.list("ns1")] == ["l0", "l1"]
    assert await store.leases.list("nowhere") == []

    snap = LeaseResource(id="sha256:layer-key", type="snapshots/overlayfs")
    blob = LeaseResource(id=DIGEST, type="content")
    ingest = LeaseResource(id="ref-1", type="ingests")
    for res in (snap, blob, ingest, blob):  # adding twice is not an error
        await store.leases.add_resource("ns1", "l1", res)
    assert await store.leases.list_resources("ns1", "l1") == [blob, ingest, snap]
    assert await store.leases.list_resources("ns2", "l1") == []

    await store.leases.delete_resource("ns1", "l1", ingest)
    await store.leases.delete_resource("ns1", "l1", LeaseResource(id=DIGEST2, type="content"))  # not held
    assert await store.leases.list_resources("ns1", "l1") == [blob, snap]

    await store.leases.delete("ns1", "l1")
    with pytest.raises(NotFound, match='lease "l1": not found'):
        await store.leases.delete("ns1", "l1")
    with pytest.raises(NotFound, match='lease "l1": not found'):
        await store.leases.list_resources("ns1", "l1")
    with pytest.raises(NotFound, match='lease "l1": not found'):
        await store.leases.add_resource("ns1", "l1", blob)
    # resources went with the lease (cascade), those of ns2 stayed
    count = await store.read(lambda c: c.execute("SELECT count(*) FROM lease_resources").fetchone()[0])
    assert count == 0
    assert [le.id for le in await store.leases.list("ns2")] == ["l1"]


@pytest.mark.parametrize(
    ("resource", "error", "message"),
    [
        (LeaseResource(id="not-a-digest", type="content"), InvalidArgument, "invalid digest"),
        (LeaseResource(id="sha256:ABC", type="content"), InvalidArgument, "64 lowercase hex"),
        (LeaseResource(id="md5:" + "a" * 32, type="content"), InvalidArgument, "unsupported algorithm"),
        (LeaseResource(id=DIGEST, type="content/x"), InvalidArgument, "invalid resource type"),
        (LeaseResource(id="k", type="snapshots"), InvalidArgument, "snapshots/<snapshotter>"),
        (LeaseResource(id="", type="ingests"), InvalidArgument, "id must not be empty"),
        (LeaseResource(id="x", type="images"), Unimplemented, '"images": data type not supported'),
    ],
)
async def test_lease_resource_validation(
    store: MetadataStore, resource: LeaseResource, error: type[Exception], message: str
) -> None:
    await store.leases.create("ns", "l")
    with pytest.raises(error) as info:
        await store.leases.add_resource("ns", "l", resource)
    assert message in str(info.value)
    assert await store.leases.list_resources("ns", "l") == []


async def test_lease_validation(store: MetadataStore) -> None:
    with pytest.raises(InvalidArgument, match='lease "bad id": invalid: whitespace'):
        await store.leases.create("ns", "bad id")
    with pytest.raises(InvalidArgument, match='namespace "bad ns": invalid'):
        await store.leases.create("bad ns", "l")
    with pytest.raises(FailedPrecondition, match="namespace is required"):
        await store.leases.list("")
    with pytest.raises(InvalidArgument, match='lease "l": label "k"'):
        await store.leases.create("ns", "l", {"k": "v" * 4096})
    # nothing was created by the failed calls, not even the namespace
    assert await store.namespaces.list() == []


# -- namespace deletion guard -------------------------------------------------------


async def test_delete_namespace_with_leases_is_refused(store: MetadataStore) -> None:
    await store.leases.create("busy", "l1")
    with pytest.raises(FailedPrecondition) as info:
        await store.namespaces.delete("busy")
    assert str(info.value) == 'namespace "busy" must be empty, but it still has leases'
    await store.namespaces.get("busy")
    await store.leases.delete("busy", "l1")
    await store.namespaces.delete("busy")
    assert await store.namespaces.list() == []


async def test_foreign_key_is_the_second_guard(store: MetadataStore) -> None:
    await store.leases.create("busy", "l1")
    with pytest.raises(sqlite3.IntegrityError, match="FOREIGN KEY"):
        await store.write(lambda c: c.execute("DELETE FROM namespaces WHERE name = 'busy'"))
    await store.namespaces.get("busy")


async def test_every_table_referencing_namespaces_is_listed(store: MetadataStore) -> None:
    """A later table with a namespace foreign key must join the emptiness check."""

    def referencing(conn: sqlite3.Connection) -> set[str]:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        return {
            t
            for t in tables
            for fk in conn.execute(f"PRAGMA foreign_key_list({t})")
            if fk[2] == "namespaces"  # fk: (id, seq, table, from, to, on_update, on_delete, match)
        }

    listed = {table for table, _ in NAMESPACED_TABLES}
    assert await store.read(referencing) == listed

    def restrict(conn: sqlite3.Connection) -> set[str]:
        return {
            fk[6]
            for t in listed
            for fk in conn.execute(f"PRAGMA foreign_key_list({t})")
            if fk[2] == "namespaces"
        }

    assert await store.read(restrict) == {"RESTRICT"}


# -- transactions and threading -------------------------------------------------------


async def test_write_rolls_back_and_reraises(store: MetadataStore) -> None:
    class Boom(Exception):
        pass

    def tx(conn: sqlite3.Connection) -> None:
        store.namespaces.create_tx(conn, "half")
        store.leases.create_tx(conn, "half", "l1")
        raise Boom("after two inserts")

    with pytest.raises(Boom, match="after two inserts"):
        await store.write(tx)
    assert await store.namespaces.list() == []
    assert await store.leases.list("half") == []
    # the connection is usable afterwards
    await store.namespaces.create("after")


async def test_read_is_read_only(store: MetadataStore) -> None:
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        await store.read(lambda c: store.namespaces.create_tx(c, "sneaky"))
    await store.namespaces.create("fine")  # query_only was reset
    assert [n.name for n in await store.namespaces.list()] == ["fine"]


async def test_all_sqlite_work_runs_in_one_dedicated_thread(store: MetadataStore) -> None:
    loop_thread = threading.get_ident()
    seen = {
        await store.read(lambda _: threading.get_ident()),
        await store.write(lambda _: threading.get_ident()),
        await store.read(lambda _: threading.get_ident()),
    }
    assert len(seen) == 1
    assert loop_thread not in seen


async def test_event_loop_keeps_running_during_a_long_write(store: MetadataStore) -> None:
    """The write waits, inside its transaction, for the loop to tick: that only
    completes if the loop is free while the transaction runs."""
    started = threading.Event()
    ticked = threading.Event()
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            if started.is_set():
                ticks += 1
                if ticks >= 5:
                    ticked.set()
            await asyncio.sleep(0.001)

    def bulk(conn: sqlite3.Connection) -> bool:
        started.set()
        for i in range(3000):
            store.leases.create_tx(conn, "bulk", f"lease-{i}", {"i": str(i)})
        return ticked.wait(timeout=10)

    task = asyncio.create_task(ticker())
    try:
        assert await store.write(bulk) is True
    finally:
        task.cancel()
    assert ticks >= 5
    assert len(await store.leases.list("bulk")) == 3000


async def test_concurrent_writers_are_serialised(store: MetadataStore) -> None:
    await asyncio.gather(*(store.leases.create("ns", f"l{i}") for i in range(50)))
    assert len(await store.leases.list("ns")) == 50


# -- migrations -------------------------------------------------------------------------


def _connect(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(path, isolation_level=None)


async def test_old_version_database_is_upgraded(tmp_path: Path) -> None:
    path = tmp_path / "meta.db"
    conn = _connect(path)
    assert migrate(conn, MIGRATIONS[:1]) == 1
    conn.execute(
        "INSERT INTO namespaces (name, labels, created_at, updated_at) VALUES ('old', '{\"v\":\"1\"}', 5, 5)"
    )
    assert "leases" not in {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
    conn.close()

    s = await MetadataStore.open(path)
    try:
        assert s.schema_version == LATEST_VERSION
        old = await s.namespaces.get("old")
        assert old.labels == {"v": "1"}
        assert old.created_at == to_datetime(5)
        await s.leases.create("old", "works-now")
        assert [le.id for le in await s.leases.list("old")] == ["works-now"]
    finally:
        await s.close()
    conn = _connect(path)
    assert user_version(conn) == LATEST_VERSION
    conn.close()


async def test_newer_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "meta.db"
    s = await MetadataStore.open(path)
    await s.namespaces.create("keep")
    await s.close()
    conn = _connect(path)
    conn.execute(f"PRAGMA user_version = {LATEST_VERSION + 1}")
    conn.close()

    with pytest.raises(FailedPrecondition) as info:
        await MetadataStore.open(path)
    text = str(info.value)
    assert str(path) in text
    assert f"schema version {LATEST_VERSION + 1} is newer than this berth supports ({LATEST_VERSION})" in text
    conn = _connect(path)
    assert user_version(conn) == LATEST_VERSION + 1  # untouched
    assert conn.execute("SELECT name FROM namespaces").fetchall() == [("keep",)]
    conn.close()


async def test_failed_migration_leaves_previous_version_untouched(tmp_path: Path) -> None:
    conn = _connect(tmp_path / "meta.db")
    broken = Migration(
        LATEST_VERSION + 1,
        "broken",
        ("CREATE TABLE half_done (x INTEGER)", "INSERT INTO no_such_table VALUES (1)"),
    )
    with pytest.raises(Internal, match=rf"migration {LATEST_VERSION + 1} \(broken\) failed: no such table"):
        migrate(conn, (*MIGRATIONS, broken))
    assert user_version(conn) == LATEST_VERSION  # the good ones committed, each on its own
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert "half_done" not in tables
    assert "leases" in tables
    assert not conn.in_transaction
    assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    conn.close()


async def test_migration_leaving_dangling_foreign_keys_is_rolled_back(tmp_path: Path) -> None:
    conn = _connect(tmp_path / "meta.db")
    migrate(conn)
    dangling = Migration(
        LATEST_VERSION + 1,
        "dangling",
        ("INSERT INTO leases (namespace, id, labels, created_at) VALUES ('ghost', 'l', '{}', 0)",),
    )
    with pytest.raises(Internal, match="foreign key violation"):
        migrate(conn, (*MIGRATIONS, dangling))
    assert user_version(conn) == LATEST_VERSION
    assert conn.execute("SELECT count(*) FROM leases").fetchone()[0] == 0
    conn.close()


def test_migration_versions_are_contiguous() -> None:
    check_sequence(MIGRATIONS)
    with pytest.raises(Internal, match="version 3, expected 2"):
        check_sequence((MIGRATIONS[0], Migration(3, "gap")))


# -- persistence and lifecycle -------------------------------------------------------------


async def test_reopen_keeps_everything(tmp_path: Path) -> None:
    path = tmp_path / "meta.db"
    s = await MetadataStore.open(path)
    await s.namespaces.create("ns", {"a": "b"})
    await s.leases.create("ns", "l1", {"x": "y"})
    await s.leases.add_resource("ns", "l1", LeaseResource(id=DIGEST, type="content"))
    before_ns = await s.namespaces.list()
    before_leases = await s.leases.list("ns")
    await s.close()
    await s.close()  # idempotent
    with pytest.raises(Unavailable, match="store is closed"):
        await s.namespaces.list()

    s = await MetadataStore.open(path)
    try:
        assert await s.namespaces.list() == before_ns
        assert await s.leases.list("ns") == before_leases
        assert await s.leases.list_resources("ns", "l1") == [LeaseResource(id=DIGEST, type="content")]
    finally:
        await s.close()


def test_timestamps_round_trip_in_utc() -> None:
    ns = 1_700_000_000_123_456_789
    dt = to_datetime(ns)
    assert dt.tzinfo == UTC
    assert from_datetime(dt) == ns - 789  # microsecond precision in Python
