"""Garbage collection: reachability, leases, sharing, races with pulls, ordering, scheduling."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from daemon.errors import Internal, NotFound, Unavailable
from daemon.metadata import (
    DEFAULT_ROOTS,
    GCScheduler,
    GCSummary,
    Image,
    ImageStore,
    LeaseResource,
    MetadataStore,
    NamespacedContent,
    NamespacedSnapshotter,
    Node,
    RootProvider,
    SweepLock,
    collect,
)
from daemon.metadata.gc import CONTENT, IMAGE, SNAPSHOT, label_refs
from daemon.protocols import ContentInfo, Descriptor
from tests.unit.fakes import FakeContentStore, FakeSnapshotter, Gate, sha256

MANIFEST = "application/vnd.oci.image.manifest.v1+json"
REF_SNAPSHOT = "containerd.io/gc.ref.snapshot.fake"


@dataclass
class World:
    store: MetadataStore
    images: ImageStore
    content: NamespacedContent
    blobs: FakeContentStore
    sn: NamespacedSnapshotter
    snaps: FakeSnapshotter

    async def collect(
        self, roots: Sequence[RootProvider] = DEFAULT_ROOTS, now: datetime | None = None
    ) -> GCSummary:
        return await collect(self.store, content=self.content, snapshotters=[self.sn], roots=roots, now=now)

    async def put(self, ns: str, data: bytes, labels: dict[str, str] | None = None, lease: str = "") -> str:
        digest = sha256(data)
        w = await self.content.writer(ns, f"ref-{digest}", len(data), digest, lease=lease)
        if w.offset == 0:
            await w.write(data)
        await w.commit(len(data), digest, labels)
        await w.close()
        return digest

    async def layer(self, ns: str, name: str, parent: str = "", lease: str = "") -> None:
        await self.sn.prepare(ns, f"extract {name}", parent, lease=lease)
        await self.sn.commit(ns, name, f"extract {name}", lease=lease)

    async def pull(self, ns: str, name: str, lease: str = "") -> list[str]:
        """An image the way a pull leaves it: manifest -> config + layers, config -> snapshot chain."""
        await self.layer(ns, "chain1", lease=lease)
        await self.layer(ns, "chain2", "chain1", lease=lease)
        l1 = await self.put(ns, b"layer one", lease=lease)
        l2 = await self.put(ns, b"layer two", lease=lease)
        config = await self.put(ns, b"config of " + name.encode(), {REF_SNAPSHOT: "chain2"}, lease=lease)
        manifest = await self.put(
            ns,
            b"manifest of " + name.encode(),
            {
                "containerd.io/gc.ref.content.config": config,
                "containerd.io/gc.ref.content.l.0": l1,
                "containerd.io/gc.ref.content.l.1": l2,
            },
            lease=lease,
        )
        await self.images.create(ns, Image(name, Descriptor(MANIFEST, manifest, 10)))
        return [manifest, config, l1, l2]

    async def recorded(self, ns: str) -> set[str]:
        return {i.digest async for i in self.content.walk(ns)}

    async def snapshot_keys(self, ns: str) -> set[str]:
        return {i.name async for i in self.sn.walk(ns)}


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    store = await MetadataStore.open(tmp_path / "meta.db")
    blobs, snaps = FakeContentStore(), FakeSnapshotter()
    try:
        yield World(
            store,
            ImageStore(store),
            NamespacedContent(store, blobs),
            blobs,
            NamespacedSnapshotter(store, "fake", snaps),
            snaps,
        )
    finally:
        await store.close()


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Let the loop run until ``condition`` holds (a poll with a deadline, not a sleep)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.001)


async def assert_records_have_backends(world: World) -> None:
    """The invariant GC must keep: every record names an object the backend has."""

    def rows(conn: sqlite3.Connection) -> tuple[list[str], list[str]]:
        return (
            [r[0] for r in conn.execute("SELECT digest FROM content")],
            [r[0] for r in conn.execute("SELECT backend_key FROM snapshots")],
        )

    digests, keys = await world.store.read(rows)
    assert set(digests) <= set(world.blobs.blobs)
    assert set(keys) <= set(world.snaps.snapshots)


# -- reachability -----------------------------------------------------------------------


async def test_image_keeps_its_tree_and_garbage_is_swept(world: World) -> None:
    tree = await world.pull("default", "docker.io/library/app:1")
    garbage = await world.put("default", b"unreferenced blob")
    await world.layer("default", "g1")
    await world.layer("default", "g2", "g1")
    await world.sn.prepare("default", "g3", "g2")

    summary = await world.collect()
    assert (summary.content_records, summary.snapshot_records) == (1, 3)
    assert (summary.blobs_removed, summary.bytes_freed) == (1, len(b"unreferenced blob"))
    assert summary.snapshots_removed == 3
    assert summary.errors == []
    assert summary.duration >= 0
    assert await world.recorded("default") == set(tree)
    assert set(tree) <= set(world.blobs.blobs)
    assert garbage not in world.blobs.blobs
    assert await world.snapshot_keys("default") == {"chain1", "chain2"}
    # children before parents (the fake backend refuses a parent with children)
    assert [k.rsplit("/", 1)[1] for k in world.snaps.removed] == ["g3", "g2", "g1"]
    assert world.snaps.cleanups == 1
    await assert_records_have_backends(world)

    again = await world.collect()
    assert (again.content_records, again.blobs_removed, again.snapshots_removed) == (0, 0, 0)

    await world.images.delete("default", "docker.io/library/app:1")
    gone = await world.collect()
    assert (gone.content_records, gone.snapshot_records, gone.blobs_removed) == (4, 2, 4)
    assert world.blobs.blobs == {}
    assert world.snaps.snapshots == {}
    await world.store.namespaces.delete("default")  # nothing left in it


def test_label_refs_follow_containerd_naming() -> None:
    d = "sha256:" + "d" * 64
    refs = label_refs(
        "ns",
        {
            "containerd.io/gc.ref.content": d,
            "containerd.io/gc.ref.content.m.0": d + "0",
            "containerd.io/gc.ref.content/x": d + "1",
            "containerd.io/gc.ref.contentious": d + "2",  # not a reference
            "containerd.io/gc.ref.snapshot.overlayfs": "chain",
            "containerd.io/gc.ref.snapshot.native/extra": "other",
            "containerd.io/gc.ref.snapshot.": "no snapshotter",
            "containerd.io/gc.ref.image": "img",
            "containerd.io/gc.ref.content.empty": "",
            "unrelated": d,
        },
    )
    assert sorted(refs, key=str) == sorted(
        [
            Node(CONTENT, "ns", d),
            Node(CONTENT, "ns", d + "0"),
            Node(CONTENT, "ns", d + "1"),
            Node(SNAPSHOT, "ns", "overlayfs/chain"),
            Node(SNAPSHOT, "ns", "native/other"),
            Node(IMAGE, "ns", "img"),
        ],
        key=str,
    )


async def test_lease_keeps_unreferenced_objects_until_deleted(world: World) -> None:
    await world.store.leases.create("default", "pull")
    blob = await world.put("default", b"only the lease holds me", lease="pull")
    await world.layer("default", "leased", lease="pull")
    summary = await world.collect()
    assert (summary.content_records, summary.snapshot_records) == (0, 0)
    assert blob in world.blobs.blobs
    assert await world.snapshot_keys("default") == {"leased"}

    await world.store.leases.delete("default", "pull")
    summary = await world.collect()
    assert (summary.content_records, summary.snapshot_records, summary.blobs_removed) == (1, 1, 1)
    assert blob not in world.blobs.blobs
    assert world.snaps.snapshots == {}


async def test_expired_lease_is_deleted_and_stops_holding(world: World) -> None:
    now = datetime.now(UTC)
    past = (now - timedelta(minutes=1)).isoformat().replace("+00:00", "Z")
    future = (now + timedelta(hours=1)).isoformat()
    await world.store.leases.create("default", "old", {"containerd.io/gc.expire": past})
    await world.store.leases.create("default", "young", {"containerd.io/gc.expire": future})
    await world.store.leases.create("default", "junk", {"containerd.io/gc.expire": "tomorrow-ish"})
    a = await world.put("default", b"held by old", lease="old")
    b = await world.put("default", b"held by young", lease="young")
    c = await world.put("default", b"held by junk", lease="junk")

    summary = await world.collect()
    assert summary.leases_expired == 1
    assert [lease.id for lease in await world.store.leases.list("default")] == ["junk", "young"]
    assert await world.recorded("default") == {b, c}
    assert a not in world.blobs.blobs

    summary = await world.collect(now=now + timedelta(hours=2))
    assert summary.leases_expired == 1
    assert [lease.id for lease in await world.store.leases.list("default")] == ["junk"]
    assert await world.recorded("default") == {c}


async def test_gc_root_label_keeps_objects(world: World) -> None:
    kept = await world.put("default", b"pinned", {"containerd.io/gc.root": "true"})
    child = await world.put("default", b"pinned's child")
    await world.content.update(
        "default",
        ContentInfo(kept, 0, datetime.now(UTC), datetime.now(UTC), {"containerd.io/gc.ref.content": child}),
        ["labels.containerd.io/gc.ref.content"],
    )
    await world.layer("default", "base")
    await world.sn.prepare("default", "pinned", "base", {"containerd.io/gc.root": "x"})
    await world.collect()
    assert await world.recorded("default") == {kept, child}
    assert await world.snapshot_keys("default") == {"base", "pinned"}


async def test_shared_blob_survives_until_the_last_namespace_lets_go(world: World) -> None:
    pin = {"containerd.io/gc.root": "1"}
    digest = await world.put("ns1", b"common base layer", pin)
    written = world.blobs.bytes_written
    assert await world.put("ns2", b"common base layer", pin) == digest
    assert world.blobs.bytes_written == written  # shared, not written again

    await world.content.delete("ns1", digest)
    summary = await world.collect()
    assert summary.blobs_removed == 0
    assert digest in world.blobs.blobs
    assert await world.recorded("ns2") == {digest}

    await world.content.delete("ns2", digest)
    summary = await world.collect()
    assert summary.blobs_removed == 1
    assert digest not in world.blobs.blobs


async def test_images_keep_content_per_namespace(world: World) -> None:
    tree = await world.pull("ns1", "img")
    await world.pull("ns2", "img")
    await world.images.delete("ns1", "img")
    await world.collect()
    assert await world.recorded("ns1") == set()
    assert await world.recorded("ns2") == set(tree)
    assert set(tree) <= set(world.blobs.blobs)  # ns2 still references every blob
    assert await world.snapshot_keys("ns1") == set()
    assert await world.snapshot_keys("ns2") == {"chain1", "chain2"}
    await assert_records_have_backends(world)


async def test_ingests_expire_unless_leased(world: World) -> None:
    await world.store.leases.create("default", "pull")
    free = await world.content.writer("default", "free")
    await free.write(b"partial")
    await free.close()
    leased = await world.content.writer("default", "leased", lease="pull")
    await leased.close()
    orphan = await world.blobs.writer("no-record")  # a backend ingest no namespace knows
    await orphan.close()

    summary = await world.collect()
    assert (summary.ingest_records, summary.ingests_aborted) == (0, 1)
    assert {s.ref for s in await world.content.list_statuses("default")} == {"free", "leased"}

    summary = await world.collect(now=datetime.now(UTC) + timedelta(days=2))
    assert (summary.ingest_records, summary.ingests_aborted) == (1, 1)
    assert {s.ref for s in await world.content.list_statuses("default")} == {"leased"}
    assert len(world.blobs.ingests) == 1


async def test_shared_ingest_keeps_the_blob_it_claims(world: World) -> None:
    digest = await world.put("ns1", b"being shared")
    w = await world.content.writer("ns2", "claim", 0, digest)  # shared: nothing to write
    await world.content.delete("ns1", digest)
    await world.collect()
    assert digest in world.blobs.blobs
    assert await w.commit() == digest
    assert (await world.content.info("ns2", digest)).size == len(b"being shared")


async def test_backend_orphans_are_swept(world: World) -> None:
    orphan = world.blobs.put(b"left by a crash")
    await world.snaps.prepare("crashed/1/x")
    summary = await world.collect()
    assert (summary.blobs_removed, summary.snapshots_removed) == (1, 1)
    assert orphan not in world.blobs.blobs
    assert world.snaps.snapshots == {}


async def test_extra_root_providers_extend_the_roots(world: World) -> None:
    await world.layer("default", "base")
    await world.sn.prepare("default", "ctr-rootfs", "base")

    def containers(conn: sqlite3.Connection, now: int) -> Iterable[Node]:
        yield Node(SNAPSHOT, "default", "fake/ctr-rootfs")
        yield Node("container", "default", "ctr")  # unknown types are fine: they reference nothing

    await world.collect(roots=(*DEFAULT_ROOTS, containers))
    assert await world.snapshot_keys("default") == {"base", "ctr-rootfs"}
    await world.collect()
    assert await world.snapshot_keys("default") == set()


# -- concurrency and ordering ------------------------------------------------------


async def test_pull_racing_gc_under_a_lease_is_never_swept(world: World) -> None:
    await world.store.leases.create("default", "pull")
    data = b"a layer arriving while GC runs"
    digest = sha256(data)
    w = await world.content.writer("default", "layer", len(data), digest, lease="pull")
    await w.write(data)
    gate = world.blobs.commit_gate = Gate()
    committing = asyncio.create_task(w.commit(len(data), digest))
    await gate.reached.wait()  # blob in the backend, record not yet written
    collecting = asyncio.create_task(world.collect())
    await until(lambda: world.content.sweep_lock.waiting == 1)  # GC marked, waits to sweep the backend
    assert not collecting.done()
    gate.release.set()
    assert await committing == digest
    summary = await collecting
    assert summary.blobs_removed == 0
    assert digest in world.blobs.blobs
    assert await world.recorded("default") == {digest}
    assert await world.store.leases.list_resources("default", "pull") == [LeaseResource(digest, "content")]


async def test_prepare_racing_gc_is_never_swept(world: World) -> None:
    await world.store.leases.create("default", "unpack")
    gate = world.snaps.prepare_gate = Gate()
    preparing = asyncio.create_task(world.sn.prepare("default", "extract", lease="unpack"))
    await gate.reached.wait()  # backend snapshot exists, record not yet written
    collecting = asyncio.create_task(world.collect())
    await until(lambda: world.sn.sweep_lock.waiting == 1)
    gate.release.set()
    await preparing
    summary = await collecting
    assert summary.snapshots_removed == 0
    assert await world.snapshot_keys("default") == {"extract"}
    await assert_records_have_backends(world)


async def test_records_go_before_backends_and_a_failed_sweep_is_finished_later(world: World) -> None:
    digest = await world.put("default", b"doomed")

    async def broken_walk(filters: Sequence[str] = ()) -> AsyncIterator[ContentInfo]:
        raise Internal("backend died mid-collection")
        yield  # pragma: no cover - makes this an async generator

    world.blobs.walk = broken_walk  # type: ignore[method-assign]
    with pytest.raises(Internal, match="backend died"):
        await world.collect()
    assert await world.recorded("default") == set()  # the record sweep committed first
    assert digest in world.blobs.blobs  # the blob is garbage without a record, never the reverse
    await assert_records_have_backends(world)

    del world.blobs.walk  # back to the class's walk
    summary = await world.collect()
    assert summary.blobs_removed == 1
    assert digest not in world.blobs.blobs


async def test_backend_delete_failures_are_reported_and_retried(world: World) -> None:
    a = world.blobs.put(b"stuck")
    b = world.blobs.put(b"fine")
    real_delete = world.blobs.delete

    async def flaky_delete(digest: str) -> None:
        if digest == a:
            raise Unavailable("busy")
        await real_delete(digest)

    world.blobs.delete = flaky_delete  # type: ignore[method-assign]
    summary = await world.collect()
    assert summary.blobs_removed == 1
    assert summary.errors == [f"content {a}: busy"]
    assert b not in world.blobs.blobs
    world.blobs.delete = real_delete  # type: ignore[method-assign]
    assert (await world.collect()).blobs_removed == 1


# -- the sweep lock --------------------------------------------------------------------


async def test_sweep_lock_orders_sweeps_and_mutators() -> None:
    lock = SweepLock()
    order: list[str] = []
    first = asyncio.Event()

    async def mutate(name: str, hold: asyncio.Event | None = None) -> None:
        async with lock.shared():
            order.append(f"{name}+")
            if hold is not None:
                await hold.wait()
            order.append(f"{name}-")

    async def sweep() -> None:
        async with lock.exclusive():
            order.append("sweep")

    m1 = asyncio.create_task(mutate("m1", first))
    await until(lambda: order == ["m1+"])
    s = asyncio.create_task(sweep())
    await until(lambda: lock.waiting == 1)
    m2 = asyncio.create_task(mutate("m2"))  # queued behind the waiting sweep
    await until(lambda: lock.waiting == 2)
    first.set()
    await asyncio.gather(m1, s, m2)
    assert order == ["m1+", "m1-", "sweep", "m2+", "m2-"]


async def test_sweep_lock_survives_cancelled_waiters() -> None:
    lock = SweepLock()
    async with lock.shared():
        s = asyncio.create_task(lock.exclusive().__aenter__())
        await until(lambda: lock.waiting == 1)
        s.cancel()
        with pytest.raises(asyncio.CancelledError):
            await s
        assert lock.waiting == 0
        async with lock.shared():  # not blocked by the cancelled sweep
            pass
    async with lock.exclusive():
        pass


# -- scheduling -------------------------------------------------------------------------


class CountingRun:
    def __init__(self) -> None:
        self.calls = 0
        self.started = asyncio.Event()
        self.proceed: asyncio.Event | None = None
        self.fail = False

    async def __call__(self) -> GCSummary:
        self.calls += 1
        self.started.set()
        if self.proceed is not None:
            await self.proceed.wait()
        if self.fail:
            raise Internal("collection failed")
        return GCSummary(blobs_removed=self.calls)


async def test_scheduler_coalesces_requests() -> None:
    run = CountingRun()
    scheduler = GCScheduler(run, delay=0.01)
    for _ in range(5):
        scheduler.request()
    assert scheduler.pending
    await scheduler.wait_idle()
    assert run.calls == 1
    assert scheduler.last is not None and scheduler.last.blobs_removed == 1
    assert not scheduler.pending


async def test_scheduler_runs_once_more_for_requests_during_a_run() -> None:
    run = CountingRun()
    run.proceed = asyncio.Event()
    scheduler = GCScheduler(run, delay=0)
    scheduler.request()
    await run.started.wait()
    scheduler.request()
    scheduler.request()
    run.proceed.set()
    await scheduler.wait_idle()
    assert run.calls == 2


async def test_scheduler_run_now_close_and_failures() -> None:
    run = CountingRun()
    scheduler = GCScheduler(run, delay=3600)
    scheduler.request()
    summary = await scheduler.run_now()  # covers the pending request
    assert summary.blobs_removed == 1
    await scheduler.close()
    assert run.calls == 1
    assert not scheduler.pending

    run.fail = True
    scheduler.delay = 0
    scheduler.request()
    await scheduler.wait_idle()  # the failure is logged, not raised
    assert run.calls == 2
    run.fail = False
    scheduler.request()
    await scheduler.wait_idle()
    assert run.calls == 3
    assert scheduler.runs == 2


async def test_scheduler_drives_real_collections(world: World) -> None:
    scheduler = GCScheduler(
        lambda: collect(world.store, content=world.content, snapshotters=[world.sn]), delay=0
    )
    world.images.on_delete = world.content.on_delete = world.sn.on_remove = scheduler.request
    await world.pull("default", "img")
    await world.images.delete("default", "img")
    await scheduler.wait_idle()
    assert world.blobs.blobs == {}
    assert world.snaps.snapshots == {}
    with pytest.raises(NotFound):
        await world.sn.stat("default", "chain1")
