"""Unpacking while downloading: the tee, the two routes of a layer, verification, reuse, labels.

The unpacker runs against the real pieces (metadata database, local content
store, native snapshotter, tar applier) on a temporary root; the download
side of a :class:`LayerFeed` is driven by hand so that each route (live
tee, buffered, resumed) is taken on purpose, not by timing.

:func:`images_world` is shared with the integration tests of the images
plugin (pull, import, export).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from daemon.errors import FailedPrecondition, InvalidArgument, NotFound
from daemon.events import EventBus
from daemon.metadata.db import MetadataDB
from daemon.metadata.gc import LABEL_GC_REF_SNAPSHOT
from daemon.mount import mount_points_under, mounted
from daemon.protocols import ByteStream, Descriptor, Kind, Mount, Snapshotter
from plugins.content.local.store import LocalContentStore
from plugins.diff import TarApplier
from plugins.images.blobs import chain_ids, store_blob
from plugins.images.config import ImagesConfig
from plugins.images.progress import TOPIC, ProgressTracker, PullProgressEvent, State, transfer_status
from plugins.images.service import ImageService
from plugins.images.unpack import LayerFeed, TeeStream, Unpacker
from plugins.snapshotters.native.snapshotter import NativeSnapshotter
from plugins.snapshotters.overlayfs.snapshotter import OverlaySnapshotter, check_supported
from tests.support import oci

NS = "default"


# -- the world -------------------------------------------------------------------


@dataclass
class World:
    """Everything the images plugin runs on, in one temporary root."""

    root: Path
    db: MetadataDB
    content: LocalContentStore
    backends: dict[str, Snapshotter]
    applier: TarApplier
    bus: EventBus

    def service(self, config: ImagesConfig | None = None, **kw: object) -> ImageService:
        return ImageService(self.db, self.applier, config=config, bus=self.bus, **kw)  # type: ignore[arg-type]

    async def committed(self, snapshotter: str, namespace: str = NS) -> dict[str, str]:
        """Committed snapshots of ``namespace``: name -> parent."""
        sn = self.db.snapshotter(snapshotter)
        return {info.name: info.parent async for info in sn.walk(namespace) if info.kind is Kind.COMMITTED}

    async def keys(self, snapshotter: str, namespace: str = NS) -> list[str]:
        return [info.name async for info in self.db.snapshotter(snapshotter).walk(namespace)]

    async def digests(self, namespace: str = NS) -> set[str]:
        return {info.digest async for info in self.db.content.walk(namespace)}

    async def labels(self, digest: str, namespace: str = NS) -> dict[str, str]:
        return (await self.db.content.info(namespace, digest)).labels


@contextlib.asynccontextmanager
async def images_world(root: Path, snapshotters: Sequence[str] = ("native",)) -> AsyncIterator[World]:
    """A metadata database over a local content store and the named snapshotters.

    ``overlayfs`` is skipped (pytest.skip) where the kernel cannot mount it.
    Garbage collection runs only when a test asks (``db.gc.run_now()``).
    Everything is closed at the end, whatever happened.
    """
    content = await LocalContentStore.open(root / "content")
    backends: dict[str, Snapshotter] = {}
    db: MetadataDB | None = None
    bus = EventBus()
    try:
        for name in snapshotters:
            if name == "native":
                backends[name] = await NativeSnapshotter.open(root / "native")
            elif name == "overlayfs":
                reason = await check_supported(root)
                if reason:
                    pytest.skip(f"overlayfs: {reason}")
                backends[name] = await OverlaySnapshotter.open(root / "overlayfs")
            else:
                raise ValueError(name)
        db = await MetadataDB.open(root / "meta.db", content, backends, gc_delay=3600.0)
        yield World(root, db, content, backends, TarApplier(), bus)
        assert mount_points_under(root) == [], "a mount was left behind"
    finally:
        if db is not None:
            await db.close()
        for backend in backends.values():
            await backend.close()
        await content.close()
        bus.close()


async def files_of(world: World, snapshotter: str, chain_id: str, paths: Sequence[str]) -> dict[str, bool]:
    """Mount a view of ``chain_id`` and say which of ``paths`` exist (lexists: links count)."""
    sn = world.db.snapshotter(snapshotter)
    key = f"check-view-{chain_id[-12:]}"
    mounts = await sn.view(NS, key, chain_id)
    try:
        async with mounted(mounts, dir=world.root) as target:
            return {p: (target / p).is_symlink() or (target / p).exists() for p in paths}
    finally:
        await sn.remove(NS, key)


async def put_layers(world: World, layers: Sequence[oci.LayerBlob], namespace: str = NS) -> None:
    cs = world.db.content.namespace(namespace)
    for layer in layers:
        desc = Descriptor(layer.media_type, layer.digest, layer.size)
        await store_blob(cs, f"layer-{layer.digest}", desc, layer.data)


def descriptor(layer: oci.LayerBlob) -> Descriptor:
    return Descriptor(layer.media_type, layer.digest, layer.size)


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    async with images_world(tmp_path) as w:
        yield w


# -- chain ids and the tee ---------------------------------------------------------


def test_chain_ids_follow_the_oci_definition() -> None:
    image = oci.busybox_image("gzip")
    m = image.manifests[0]
    assert chain_ids(m.diff_ids) == m.chain_ids == oci.chain_ids(m.diff_ids)
    assert chain_ids(m.diff_ids)[0] == m.diff_ids[0]
    second = "sha256:" + hashlib.sha256(f"{m.diff_ids[0]} {m.diff_ids[1]}".encode()).hexdigest()
    assert chain_ids(m.diff_ids)[1] == second
    assert chain_ids([]) == []


async def test_tee_pushes_back_on_the_download_and_lets_go_when_detached() -> None:
    tee = TeeStream(limit=8)
    await tee.put(b"12345")
    blocked = asyncio.create_task(tee.put(b"6789"))  # 5 + 4 > 8: waits for the reader
    await asyncio.sleep(0)
    assert not blocked.done()
    assert await tee.read(3) == b"123"
    await asyncio.wait_for(blocked, 1)
    assert await tee.read(-1) == b"45"
    assert await tee.read(-1) == b"6789"
    reader = asyncio.create_task(tee.read(10))
    await asyncio.sleep(0)
    assert not reader.done()
    tee.close()
    assert await asyncio.wait_for(reader, 1) == b""
    assert tee.delivered == 9

    gone = TeeStream(limit=4)
    await gone.put(b"abcd")
    waiting = asyncio.create_task(gone.put(b"efgh"))
    await asyncio.sleep(0)
    gone.detach()  # the applier is done: the download must not hang on it
    await asyncio.wait_for(waiting, 1)
    await gone.put(b"more")


async def test_tee_reports_the_download_error_to_the_applier() -> None:
    tee = TeeStream()
    await tee.put(b"part")
    tee.fail(FailedPrecondition("blob sha256:x: digest mismatch"))
    with pytest.raises(FailedPrecondition, match="digest mismatch"):
        await tee.read(10)


# -- routes ----------------------------------------------------------------------------


class RecordingApplier:
    """Wraps the tar applier; records how many bytes each layer's stream had given at each read."""

    def __init__(self) -> None:
        self.inner = TarApplier()
        self.first_read = asyncio.Event()
        self.kinds: list[str] = []
        self.applied: list[str] = []

    async def apply(self, desc: Descriptor, mounts: Sequence[Mount], stream: ByteStream) -> Descriptor:
        self.kinds.append(type(stream).__name__)
        self.applied.append(desc.digest)
        applier = self

        class Spy:
            async def read(self, n: int = -1) -> bytes:
                data = await stream.read(n)
                applier.first_read.set()
                return data

        return await self.inner.apply(desc, mounts, Spy())


async def test_a_layer_is_applied_live_while_it_downloads(world: World) -> None:
    """The unpacker waits at layer 0; its bytes reach the applier before the download has ended."""
    layer = oci.busybox_layers("gzip")[0]
    desc = descriptor(layer)
    feed = LayerFeed(desc, backlog=64 << 10)
    applier = RecordingApplier()
    sn = world.db.snapshotter("native").namespace(NS)
    cs = world.db.content.namespace(NS)
    tracker = ProgressTracker(NS, "example/live", bus=world.bus)
    tracker.blob("layer", desc.digest, desc.size)
    unpacker = Unpacker(image="example/live", snapshotter=sn, applier=applier, content=cs, tracker=tracker)
    task = asyncio.create_task(unpacker.unpack([desc], [layer.diff_id], {desc.digest: feed}))

    # the download: the first chunk, then wait until the applier has read it
    chunk = 32 << 10
    feed.begin(0)
    await feed.push(layer.data[:chunk])
    await asyncio.wait_for(applier.first_read.wait(), 10)
    assert not task.done()
    assert tracker.progress.blobs[desc.digest].state is State.UNPACKING
    for i in range(chunk, layer.size, chunk):
        await feed.push(layer.data[i : i + chunk])
    feed.eof()
    await asyncio.sleep(0.05)
    assert not task.done(), "a snapshot must not be committed before its blob is"
    assert layer.diff_id not in await world.committed("native")
    await put_layers(world, [layer])  # the content commit (digest verified)
    feed.succeed()
    chain = await asyncio.wait_for(task, 30)

    assert chain == [layer.diff_id]
    assert applier.kinds == ["TeeStream"]
    assert feed.live and unpacker.teed == 1
    assert await world.committed("native") == {layer.diff_id: ""}
    assert [k for k in await world.keys("native") if k.startswith("extract-")] == []
    assert tracker.progress.blobs[desc.digest].live is True
    assert tracker.progress.blobs[desc.digest].state is State.UNPACKED


async def test_a_layer_past_the_backlog_is_applied_from_the_content_store(world: World) -> None:
    layers = oci.busybox_layers("gzip")
    desc = descriptor(layers[0])
    feed = LayerFeed(desc, backlog=1024)
    feed.begin(0)
    await feed.push(layers[0].data[:4096])  # more than the backlog before the unpacker came
    applier = RecordingApplier()
    unpacker = Unpacker(
        image="example/buffered",
        snapshotter=world.db.snapshotter("native").namespace(NS),
        applier=applier,
        content=world.db.content.namespace(NS),
    )
    task = asyncio.create_task(unpacker.unpack([desc], [layers[0].diff_id], {desc.digest: feed}))
    await asyncio.sleep(0.05)
    assert applier.kinds == []  # waiting for the commit, not reading
    await put_layers(world, layers[:1])
    feed.succeed()
    assert await asyncio.wait_for(task, 30) == [layers[0].diff_id]
    assert applier.kinds == ["ContentStream"]
    assert not feed.live and unpacker.teed == 0


async def test_a_resumed_download_is_never_teed(world: World) -> None:
    layer = oci.busybox_layers("gzip")[1]
    desc = descriptor(layer)
    feed = LayerFeed(desc)
    applier = RecordingApplier()
    unpacker = Unpacker(
        image="example/resumed",
        snapshotter=world.db.snapshotter("native").namespace(NS),
        applier=applier,
        content=world.db.content.namespace(NS),
    )
    task = asyncio.create_task(unpacker.unpack([desc], [layer.diff_id], {desc.digest: feed}))
    await asyncio.sleep(0.05)
    feed.begin(100)  # the first 100 bytes came from an ingest on disk, not through the feed
    await feed.push(layer.data[100:])
    feed.eof()
    await put_layers(world, [layer])
    feed.succeed()
    await asyncio.wait_for(task, 30)
    assert applier.kinds == ["ContentStream"]


async def test_digest_mismatch_after_a_live_apply_commits_nothing_and_names_the_blob(world: World) -> None:
    layer = oci.busybox_layers("none")[1]  # uncompressed: the corrupt bytes still untar
    desc = descriptor(layer)
    feed = LayerFeed(desc)
    unpacker = Unpacker(
        image="example/corrupt",
        snapshotter=world.db.snapshotter("native").namespace(NS),
        applier=TarApplier(),
        content=world.db.content.namespace(NS),
    )
    task = asyncio.create_task(unpacker.unpack([desc], [layer.diff_id], {desc.digest: feed}))
    feed.begin(0)
    await feed.push(layer.data)
    feed.fail(
        FailedPrecondition(f"blob {desc.digest}: digest mismatch: expected {desc.digest}, got sha256:0")
    )
    with pytest.raises(FailedPrecondition, match=f"blob {desc.digest}: digest mismatch"):
        await asyncio.wait_for(task, 30)
    assert await world.committed("native") == {}
    assert await world.keys("native") == []  # the active snapshot went too


async def test_apply_errors_name_the_image_and_layer(world: World) -> None:
    layer = oci.busybox_layers("gzip")[1]
    truncated = layer.data[: layer.size // 2]
    desc = Descriptor(layer.media_type, oci.sha256_digest(truncated), len(truncated))
    cs = world.db.content.namespace(NS)
    await store_blob(cs, "layer-truncated", desc, truncated)
    feed = LayerFeed(desc)
    feed.succeed()
    unpacker = Unpacker(
        image="example/truncated",
        snapshotter=world.db.snapshotter("native").namespace(NS),
        applier=TarApplier(),
        content=cs,
    )
    with pytest.raises(InvalidArgument, match=f"example/truncated: .*{desc.digest}"):
        await unpacker.unpack([desc], [layer.diff_id], {desc.digest: feed})
    assert await world.keys("native") == []


async def test_diff_id_mismatch_commits_nothing(world: World) -> None:
    layers = oci.busybox_layers("gzip")
    await put_layers(world, layers[:2])
    feeds = {}
    for layer in layers[:2]:
        feeds[layer.digest] = LayerFeed(descriptor(layer))
        feeds[layer.digest].succeed()
    wrong = [layers[0].diff_id, layers[2].diff_id]  # the config lies about layer 1
    unpacker = Unpacker(
        image="example/lies",
        snapshotter=world.db.snapshotter("native").namespace(NS),
        applier=TarApplier(),
        content=world.db.content.namespace(NS),
    )
    with pytest.raises(FailedPrecondition, match=f"example/lies: layer {layers[1].digest}: diff id mismatch"):
        await unpacker.unpack([descriptor(layer) for layer in layers[:2]], wrong, feeds)
    # layer 0 was right and stays; nothing under the bad chain id, no active snapshot left
    assert await world.committed("native") == {layers[0].diff_id: ""}
    assert await world.keys("native") == [layers[0].diff_id]


async def test_committed_chains_are_reused_not_applied_again(world: World) -> None:
    layers = oci.busybox_layers("gzip")
    await put_layers(world, layers)
    descs = [descriptor(layer) for layer in layers]
    diff_ids = [layer.diff_id for layer in layers]

    def feeds() -> dict[str, LayerFeed]:
        out = {}
        for d in descs:
            out[d.digest] = LayerFeed(d)
            out[d.digest].succeed()
        return out

    first = RecordingApplier()
    sn = world.db.snapshotter("native").namespace(NS)
    cs = world.db.content.namespace(NS)
    chain = await Unpacker(image="x", snapshotter=sn, applier=first, content=cs).unpack(
        descs, diff_ids, feeds()
    )
    assert len(first.applied) == 3
    second = RecordingApplier()
    tracker = ProgressTracker(NS, "x")
    for d in descs:
        tracker.blob("layer", d.digest, d.size)
    again = await Unpacker(image="x", snapshotter=sn, applier=second, content=cs, tracker=tracker).unpack(
        descs, diff_ids, feeds()
    )
    assert again == chain == oci.chain_ids(diff_ids)
    assert second.applied == []
    assert {b.state for b in tracker.progress.layers()} == {State.REUSED}
    committed = await world.committed("native")
    assert committed == {chain[0]: "", chain[1]: chain[0], chain[2]: chain[1]}
    present = await files_of(world, "native", chain[-1], (*oci.BUSYBOX_PRESENT, *oci.BUSYBOX_ABSENT))
    assert all(present[p] for p in oci.BUSYBOX_PRESENT), present
    assert not any(present[p] for p in oci.BUSYBOX_ABSENT), present


# -- the service's unpack of content already present ------------------------------------------


async def test_service_unpacks_content_into_another_snapshotter_and_labels_the_config(tmp_path: Path) -> None:
    image = oci.busybox_image(("gzip", "zstd", "none"))
    m = image.manifests[0]
    async with images_world(tmp_path, ("native", "overlayfs")) as w:
        service = w.service(ImagesConfig(snapshotter="native"))
        try:
            cs = w.db.content.namespace(NS)
            for digest, blob in image.blobs().items():
                await store_blob(
                    cs, f"blob-{digest}", Descriptor(blob.media_type, digest, blob.size), blob.data
                )
            record = await service.save(
                NS, "example.com/busybox:1", Descriptor(m.media_type, m.digest, m.manifest.size)
            )
            assert not await service.is_unpacked(NS, record)
            assert await service.unpack(NS, record) == m.chain_ids
            assert await service.unpack(NS, record.name, "overlayfs") == m.chain_ids
            assert await service.is_unpacked(NS, record, "overlayfs")
            labels = await w.labels(m.config.digest)
            assert labels[LABEL_GC_REF_SNAPSHOT + "native"] == m.chain_ids[-1]
            assert labels[LABEL_GC_REF_SNAPSHOT + "overlayfs"] == m.chain_ids[-1]
            for sn in ("native", "overlayfs"):
                present = await files_of(w, sn, m.chain_ids[-1], (*oci.BUSYBOX_PRESENT, *oci.BUSYBOX_ABSENT))
                assert [p for p in oci.BUSYBOX_PRESENT if not present[p]] == []
                assert [p for p in oci.BUSYBOX_ABSENT if present[p]] == []
            assert await w.db.leases.list(NS) == []  # the unpack's lease is gone

            # a missing layer is named
            await w.db.content.delete(NS, m.layers[2].digest)
            other = await service.save(NS, "example.com/busybox:2", record.target)
            await w.db.snapshotter("native").remove(NS, m.chain_ids[2])
            with pytest.raises(NotFound, match=f"layer {m.layers[2].digest} is not in the content store"):
                await service.unpack(NS, other)
        finally:
            await service.close()


async def test_save_creates_then_updates_and_publishes(world: World) -> None:
    service = world.service()
    sub = world.bus.subscribe(topic_prefix="/images")
    try:
        target = Descriptor(oci.OCI_MANIFEST, "sha256:" + "a" * 64, 10)
        created = await service.save(NS, "example.com/a:1", target, {"k": "v"})
        moved = Descriptor(oci.OCI_MANIFEST, "sha256:" + "b" * 64, 11)
        updated = await service.save(NS, "example.com/a:1", moved)
        assert created.target == target and updated.target == moved
        assert updated.labels == {"k": "v"}  # labels not given are kept
        await service.remove(NS, "example.com/a:1")
        topics = [(await asyncio.wait_for(sub.get(), 1)).topic for _ in range(3)]
        assert topics == ["/images/create", "/images/update", "/images/delete"]
        with pytest.raises(NotFound):
            await service.get(NS, "example.com/a:1")
    finally:
        sub.close()
        await service.close()


def test_progress_event_has_a_type_url_of_its_own() -> None:
    from daemon.typeurl import decode_any, pack_any, type_url

    event = PullProgressEvent(
        name="r", kind="layer", digest="sha256:x", state="downloading", offset=1, total=2
    )
    assert type_url(event) == "berth.images.v1.PullProgress"
    decoded = decode_any(pack_any(event))
    assert isinstance(decoded, PullProgressEvent) and decoded.offset == 1
    assert TOPIC == "/images/pull/progress"


def test_progress_phases_and_transfer_status() -> None:
    tracker = ProgressTracker(NS, "r")
    p = tracker.progress
    assert p.phase == "resolving"
    tracker.blob("manifest", "sha256:m", 10)
    tracker.blob("layer", "sha256:l", 100)
    assert p.phase == "fetching"
    tracker.state("sha256:m", State.DOWNLOADED)
    tracker.state("sha256:l", State.DOWNLOADING, offset=40)
    assert (p.offset, p.total) == (50, 110)
    tracker.state("sha256:l", State.DOWNLOADED)
    assert p.phase == "unpacking" and p.offset == p.total
    layer = p.blobs["sha256:l"]
    assert transfer_status(layer) == "waiting" and transfer_status(layer, unpack=False) == "done"
    tracker.state("sha256:l", State.UNPACKING, live=True)
    tracker.state("sha256:l", State.DOWNLOADED)  # a teed layer's download ending does not go back
    assert layer.state is State.UNPACKING and transfer_status(layer) == "applying"
    tracker.finish()
    assert p.phase == "done"
