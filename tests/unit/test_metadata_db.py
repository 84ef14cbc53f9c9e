"""MetadataDB: the wiring of store, namespaced content and snapshotters, and the collector; its plugin."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any, cast

import pytest

from daemon.errors import InvalidArgument, NotFound, Unavailable
from daemon.hookspecs import hookimpl
from daemon.metadata import Image, LeaseResource, MetadataDB, Node
from daemon.metadata.gc import SNAPSHOT
from daemon.protocols import Descriptor
from daemon.registry import DaemonPaths, InitContext, Registry, Status
from plugins.metadata import sqlite as sqlite_plugin
from tests.unit.fakes import FakeContentStore, FakeSnapshotter, sha256

MANIFEST = "application/vnd.oci.image.manifest.v1+json"


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[MetadataDB]:
    opened = await MetadataDB.open(
        tmp_path / "meta.db",
        FakeContentStore(),
        {"snapA": FakeSnapshotter(), "snapB": FakeSnapshotter()},
        gc_delay=0,
    )
    try:
        yield opened
    finally:
        await opened.close()


def _content(db: MetadataDB) -> FakeContentStore:
    return cast(FakeContentStore, db.content.backend)


def _backend(db: MetadataDB, name: str) -> FakeSnapshotter:
    return cast(FakeSnapshotter, db.snapshotter(name).backend)


async def _put(db: MetadataDB, ns: str, data: bytes, lease: str = "") -> str:
    digest = sha256(data)
    w = await db.content.writer(ns, f"ref-{digest}", len(data), digest, lease=lease)
    await w.write(data)
    await w.commit(len(data), digest)
    await w.close()
    return digest


async def test_exposes_the_stores_and_wraps_every_snapshotter(db: MetadataDB, tmp_path: Path) -> None:
    assert db.path == tmp_path / "meta.db"
    assert db.namespaces is db.store.namespaces and db.leases is db.store.leases
    assert sorted(db.snapshotters) == ["snapA", "snapB"]
    assert db.snapshotter("snapB").name == "snapB"
    with pytest.raises(NotFound, match=r'snapshotter "nope": not loaded \(loaded: snapA, snapB\)'):
        db.snapshotter("nope")
    with pytest.raises(InvalidArgument, match="snapshotter: must not be empty"):
        db.snapshotter("")
    # the namespace-bound views are the protocols' implementations
    await db.namespaces.create("ns1")
    assert [n.name for n in await db.namespaces.list()] == ["ns1"]


async def test_image_delete_collects_what_only_the_image_kept(db: MetadataDB) -> None:
    blob = await _put(db, "ns", b"manifest")
    await db.images.create("ns", Image("example.com/a:1", Descriptor(MANIFEST, blob, 8)))
    await db.gc.run_now()
    assert blob in _content(db).blobs  # the image keeps it
    await db.images.delete("ns", "example.com/a:1")
    assert db.gc.pending  # the delete asked for a collection
    await db.gc.wait_idle()
    assert blob not in _content(db).blobs
    with pytest.raises(NotFound):
        await db.content.info("ns", blob)


async def test_content_delete_and_snapshot_remove_request_a_collection(db: MetadataDB) -> None:
    await db.leases.create("ns", "hold")
    blob = await _put(db, "ns", b"data", lease="hold")
    await db.snapshotter("snapA").prepare("ns", "k1", lease="hold")
    await db.snapshotter("snapB").prepare("ns", "k1", lease="hold")
    await db.gc.run_now()
    runs = db.gc.runs
    await db.content.delete("ns", blob)
    await db.gc.wait_idle()
    assert db.gc.runs == runs + 1 and blob not in _content(db).blobs
    await db.snapshotter("snapB").remove("ns", "k1")
    await db.gc.wait_idle()
    assert db.gc.runs == runs + 2
    # the collection swept every snapshotter: only snapB's snapshot had no record any more
    assert list(_backend(db, "snapB").snapshots) == []
    assert len(_backend(db, "snapA").snapshots) == 1


async def test_start_requests_one_collection_of_leftovers(tmp_path: Path) -> None:
    content, snaps = FakeContentStore(), FakeSnapshotter()
    orphan = content.put(b"left by a crash")
    await snaps.prepare("ns/1/orphan")
    db = await MetadataDB.open(tmp_path / "meta.db", content, {"s": snaps}, gc_delay=0)
    try:
        assert db.gc.runs == 0 and not db.gc.pending
        db.start()
        await db.gc.wait_idle()
        assert db.gc.runs == 1
        assert orphan not in content.blobs and snaps.snapshots == {}
    finally:
        await db.close()


async def test_added_roots_keep_objects(db: MetadataDB) -> None:
    await db.snapshotter("snapA").prepare("ns", "container-rootfs")

    def containers(conn: sqlite3.Connection, now: int) -> Iterable[Node]:
        yield Node(SNAPSHOT, "ns", "snapA/container-rootfs")

    db.add_roots(containers)
    summary = await db.gc.run_now()
    assert summary.snapshot_records == 0
    assert (await db.snapshotter("snapA").stat("ns", "container-rootfs")).name == "container-rootfs"


async def test_lease_resources_keep_content_until_the_lease_goes(db: MetadataDB) -> None:
    await db.leases.create("ns", "pull")
    blob = await _put(db, "ns", b"layer", lease="pull")
    assert LeaseResource(id=blob, type="content") in await db.leases.list_resources("ns", "pull")
    await db.gc.run_now()
    assert blob in _content(db).blobs
    await db.leases.delete("ns", "pull")
    await db.gc.run_now()
    assert blob not in _content(db).blobs


async def test_close_stops_the_collector_then_the_store(tmp_path: Path) -> None:
    db = await MetadataDB.open(
        tmp_path / "meta.db", FakeContentStore(), {"s": FakeSnapshotter()}, gc_delay=60
    )
    db.start()
    assert db.gc.pending
    await db.close()
    assert not db.gc.pending and db.gc.runs == 0
    with pytest.raises(Unavailable):
        await db.namespaces.list()
    await db.close()  # idempotent


async def test_negative_gc_delay_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="gc_delay"):
        await MetadataDB.open(tmp_path / "meta.db", FakeContentStore(), {}, gc_delay=-1)
    assert not (tmp_path / "meta.db").exists()


# -- the plugin --------------------------------------------------------------------------------


class _Backends:
    """Fake content and snapshotter plugins, registered like the real ones."""

    def __init__(self, snapshotters: Iterable[str] = ("fake",), *, snapshotter_fails: bool = False) -> None:
        self.content = FakeContentStore()
        self.snapshotters = {name: FakeSnapshotter() for name in snapshotters}
        self.snapshotter_fails = snapshotter_fails

    @hookimpl
    def berth_register(self, registry: Registry) -> None:
        async def content(ic: InitContext) -> FakeContentStore:
            return self.content

        registry.add(type="berth.content.v1", id="fake", init=content)
        for name, sn in self.snapshotters.items():

            async def snapshotter(ic: InitContext, sn: FakeSnapshotter = sn) -> FakeSnapshotter:
                if self.snapshotter_fails:
                    raise RuntimeError("no snapshots here")
                return sn

            registry.add(type="berth.snapshotter.v1", id=name, init=snapshotter)


def _paths(tmp_path: Path) -> DaemonPaths:
    return DaemonPaths(root=tmp_path / "root", state=tmp_path / "state", address=str(tmp_path / "sock"))


async def _init(tmp_path: Path, backends: _Backends, configs: dict[str, Any] | None = None) -> Registry:
    reg = Registry()
    reg.register_module(sqlite_plugin, name="plugins.metadata.sqlite")
    reg.register_module(backends, name="fakes")
    assert reg.load_errors == {}
    await reg.init_all(
        paths=_paths(tmp_path), configs=configs or {}, bus=cast(Any, None), metrics=cast(Any, None)
    )
    return reg


async def test_plugin_wraps_every_loaded_snapshotter_and_closes(tmp_path: Path) -> None:
    backends = _Backends(("one", "two"))
    reg = await _init(
        tmp_path, backends, {"berth.metadata.v1.sqlite": sqlite_plugin.SqliteConfig(gc_delay=0)}
    )
    state = reg.state("berth.metadata.v1.sqlite")
    assert state.status is Status.OK, state.error
    assert state.registration.requires == ("berth.content.v1", "berth.snapshotter.v1")
    db = reg.instance("berth.metadata.v1")
    assert isinstance(db, MetadataDB)
    assert db.content.backend is backends.content
    assert {n: s.backend for n, s in db.snapshotters.items()} == backends.snapshotters
    expected = tmp_path / "root" / "berth.metadata.v1.sqlite" / "meta.db"
    assert state.exports["path"] == str(expected) and expected.is_file()
    assert state.exports["snapshotters"] == "one,two"
    assert db.gc.pending  # the startup collection
    await db.gc.wait_idle()
    assert db.gc.runs == 1
    assert await reg.close_all() == []
    with pytest.raises(Unavailable):
        await db.namespaces.list()


async def test_plugin_skipped_without_a_loaded_snapshotter(tmp_path: Path) -> None:
    reg = await _init(tmp_path, _Backends(snapshotter_fails=True))
    state = reg.state("berth.metadata.v1.sqlite")
    assert state.status is Status.SKIP
    assert "berth.snapshotter.v1" in state.error


async def test_plugin_config_is_validated(tmp_path: Path) -> None:
    reg = await _init(
        tmp_path, _Backends(), {"berth.metadata.v1.sqlite": sqlite_plugin.SqliteConfig(gc_delay=-2)}
    )
    state = reg.state("berth.metadata.v1.sqlite")
    assert state.status is Status.ERROR
    assert 'plugins."berth.metadata.v1.sqlite".gc_delay' in state.error
    reg = await _init(
        tmp_path / "b", _Backends(), {"berth.metadata.v1.sqlite": sqlite_plugin.SqliteConfig(synchronous="x")}
    )
    assert 'plugins."berth.metadata.v1.sqlite".synchronous' in reg.state("berth.metadata.v1.sqlite").error
    with pytest.raises(ValueError, match="gc_delay"):
        sqlite_plugin.SqliteConfig(gc_delay=-1).validate()
    with pytest.raises(ValueError, match="synchronous"):
        sqlite_plugin.SqliteConfig(synchronous="sometimes").validate()
