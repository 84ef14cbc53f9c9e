"""Pulling images with the images service, in process, against real registries.

Debian's docker-registry serves the busybox test images (gzip, mixed
gzip/zstd/none, an OCI index, a Docker manifest list); the fake registry
counts requests and injects faults (corrupt blobs, dropped connections,
auth challenges). The service runs on the real metadata database, local
content store, overlayfs snapshotter and tar applier on a temporary root
(:func:`tests.unit.test_unpack.images_world`); berthd end to end comes with
the gRPC services.
"""

from __future__ import annotations

import asyncio
import gzip
import io
import os
import signal
import subprocess
import sys
import tarfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import IO

import pytest

from daemon.errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied, Unavailable
from daemon.metadata.gc import LABEL_GC_REF_CONTENT, LABEL_GC_REF_SNAPSHOT
from daemon.protocols import Descriptor, Kind
from plugins.images.blobs import store_blob
from plugins.images.config import ImagesConfig
from plugins.images.progress import TOPIC, PullProgress, PullProgressEvent, State, transfer_status
from plugins.images.registry.hosts import Credentials
from plugins.images.service import ImageService
from tests.support import oci
from tests.support.fakeregistry import FakeRegistry
from tests.support.push import push_image_sync
from tests.support.registry import Registry, free_port
from tests.unit.test_unpack import NS, World, files_of, images_world

pytest_plugins = ["tests.support.fixtures"]

SN = "overlayfs"
CHECKED = (*oci.BUSYBOX_PRESENT, *oci.BUSYBOX_ABSENT)


def fast_config(**kw: object) -> ImagesConfig:
    """Tiny retry delays: a failing pull fails in milliseconds."""
    return ImagesConfig(
        snapshotter=SN,
        platform="linux/amd64",
        retry_attempts=2,
        retry_initial_delay=0.01,
        retry_max_delay=0.05,
        retry_max_elapsed=5.0,
        connect_timeout=2.0,
        read_timeout=5.0,
        **kw,  # type: ignore[arg-type]
    )


@pytest.fixture(scope="module")
def hub() -> Iterator[Registry]:
    """One anonymous docker-registry for the module with every busybox variant pushed."""
    reg = Registry()
    try:
        reg.start()
        push_image_sync(reg.url, "team/busybox", "gzip", oci.busybox_image("gzip"))
        push_image_sync(reg.url, "team/busybox", "mixed", oci.busybox_image(("gzip", "zstd", "none")))
        push_image_sync(reg.url, "team/busybox", "oci", oci.busybox_image("gzip", index=True))
        push_image_sync(reg.url, "team/busybox", "docker", oci.busybox_image("gzip", index=True, docker=True))
        yield reg
    finally:
        reg.stop()


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    async with images_world(tmp_path, (SN,)) as w:
        yield w


@pytest.fixture
async def service(world: World) -> AsyncIterator[ImageService]:
    svc = world.service(fast_config())
    try:
        yield svc
    finally:
        await svc.close()


async def assert_pulled(
    world: World, svc: ImageService, name: str, image: oci.Image, platform: str, *, leases: int = 0
) -> None:
    """The record, the content and its labels, the snapshot chain and the files of one pull."""
    record = await svc.get(NS, name)
    assert record.target == Descriptor(image.media_type, image.digest, image.top.size)
    m = image.manifest_for(platform)
    digests = await world.digests()
    assert {m.manifest.digest, m.config.digest, *(layer.digest for layer in m.layers)} <= digests
    manifest_labels = await world.labels(m.manifest.digest)
    assert manifest_labels[f"{LABEL_GC_REF_CONTENT}.config"] == m.config.digest
    for i, layer in enumerate(m.layers):
        assert manifest_labels[f"{LABEL_GC_REF_CONTENT}.l.{i}"] == layer.digest
    if image.is_index:
        position = [x.digest for x in image.manifests].index(m.digest)
        assert (await world.labels(image.digest))[f"{LABEL_GC_REF_CONTENT}.m.{position}"] == m.digest
        other = {x.digest for x in image.manifests} - {m.digest}
        assert not other & digests  # only the chosen platform was fetched
    assert (await world.labels(m.config.digest))[LABEL_GC_REF_SNAPSHOT + SN] == m.chain_ids[-1]
    committed = await world.committed(SN)
    chain = m.chain_ids
    assert {c: committed.get(c) for c in chain} == {chain[0]: "", chain[1]: chain[0], chain[2]: chain[1]}
    assert [k for k in await world.keys(SN) if k.startswith("extract-")] == []
    present = await files_of(world, SN, chain[-1], CHECKED)
    assert [p for p in oci.BUSYBOX_PRESENT if not present[p]] == []
    assert [p for p in oci.BUSYBOX_ABSENT if present[p]] == []
    assert len(await world.db.leases.list(NS)) == leases


# -- from docker-registry --------------------------------------------------------------------


async def test_pull_gzip_image(
    world: World, service: ImageService, hub: Registry, busybox: oci.Image
) -> None:
    seen: list[tuple[str, State]] = []
    final: list[PullProgress] = []

    phases: list[str] = []

    def progress(p: PullProgress) -> None:
        seen.extend((b.digest, b.state) for b in p.blobs.values())
        if not phases or phases[-1] != p.phase:
            phases.append(p.phase)
        if p.done:
            final.append(p)

    events = world.bus.subscribe(topic_prefix="/images")
    try:
        image = await service.pull(NS, f"{hub.address}/team/busybox:gzip", progress=progress)
        name = f"{hub.address}/team/busybox:gzip"
        assert image.name == name
        await assert_pulled(world, service, name, busybox, "linux/amd64")
        m = busybox.manifests[0]
        assert final and {b.state for b in final[0].layers()} == {State.UNPACKED}
        assert (
            final[0].offset
            == final[0].total
            == m.manifest.size + m.config.size + sum(x.size for x in m.layers)
        )
        assert any(final[0].blobs[layer.digest].live for layer in m.layers)  # layer 0 at least was teed
        assert (m.layers[0].digest, State.DOWNLOADING) in seen
        assert phases[0] == "resolving" and phases[-1] == "done" and "fetching" in phases
        assert {transfer_status(b) for b in final[0].layers()} == {"done"}
        envelopes = []
        while (env := events.get_nowait()) is not None:
            envelopes.append(env)
        progress_events = [e.event for e in envelopes if e.topic == TOPIC]
        assert progress_events and all(isinstance(e, PullProgressEvent) for e in progress_events)
        assert {e.state for e in progress_events if e.digest == m.layers[2].digest} >= {"waiting", "unpacked"}
        creates = [e for e in envelopes if e.topic == "/images/create"]
        assert [(e.namespace, e.event.name) for e in creates] == [(NS, name)]
    finally:
        events.close()


async def test_pull_mixed_compression(
    world: World, service: ImageService, hub: Registry, busybox_mixed: oci.Image
) -> None:
    name = f"{hub.address}/team/busybox:mixed"
    await service.pull(NS, name)
    await assert_pulled(world, service, name, busybox_mixed, "linux/amd64")


@pytest.mark.parametrize("platform", ["linux/amd64", "linux/arm64"])
async def test_pull_index_chooses_the_platform(
    world: World, service: ImageService, hub: Registry, busybox_index: oci.Image, platform: str
) -> None:
    name = f"{hub.address}/team/busybox:oci"
    await service.pull(NS, name, platform=platform)
    await assert_pulled(world, service, name, busybox_index, platform)
    local = await service.inspect(NS, name, platform=platform)
    assert local.config.platform == str(busybox_index.manifest_for(platform).platform)


async def test_pull_docker_schema2_manifest_list(
    world: World, service: ImageService, hub: Registry, busybox_docker: oci.Image
) -> None:
    name = f"{hub.address}/team/busybox:docker"
    await service.pull(NS, name)
    await assert_pulled(world, service, name, busybox_docker, "linux/amd64")
    assert busybox_docker.media_type == oci.DOCKER_MANIFEST_LIST


async def test_no_manifest_for_the_platform(service: ImageService, hub: Registry, world: World) -> None:
    with pytest.raises(
        NotFound,
        match=r"busybox:oci: no manifest for platform linux/s390x "
        r"\(the index offers: linux/amd64, linux/arm64\)",
    ):
        await service.pull(NS, f"{hub.address}/team/busybox:oci", platform="linux/s390x")
    assert await service.list(NS) == []
    assert await world.db.leases.list(NS) == []


# -- from the fake registry: reuse, resume, faults -----------------------------------------------


@pytest.fixture
def fake(fake_registry: FakeRegistry, busybox: oci.Image) -> FakeRegistry:
    fake_registry.add_image("busybox", "1", busybox)
    return fake_registry


def blob_gets(fake: FakeRegistry, digest: str = "") -> int:
    return fake.count(f"/blobs/{digest}", "GET")


async def test_pulling_again_fetches_no_blob(world: World, service: ImageService, fake: FakeRegistry) -> None:
    name = f"{fake.address}/busybox:1"
    events = world.bus.subscribe(topic_prefix="/images/update")
    try:
        first = await service.pull(NS, name)
        fetched = blob_gets(fake)
        assert fetched == 4  # config and three layers, once each
        again = await service.pull(NS, name)
        assert blob_gets(fake) == fetched
        assert fake.count("/manifests/", "GET") <= 1  # the manifest was read from the content store
        assert again.target == first.target
        env = await asyncio.wait_for(events.get(), 1)
        assert env.event.name == name
    finally:
        events.close()


async def test_concurrent_identical_pulls_share_one(
    world: World, service: ImageService, fake: FakeRegistry
) -> None:
    name = f"{fake.address}/busybox:1"
    a, b = await asyncio.gather(service.pull(NS, name), service.pull(NS, name))
    assert a.target == b.target
    assert blob_gets(fake) == 4
    assert fake.count("/manifests/", "HEAD") == 1  # resolved once: one pull served both


async def test_a_partial_download_is_resumed_and_verified_layers_reused(
    world: World, service: ImageService, fake: FakeRegistry, busybox: oci.Image
) -> None:
    """What a berthd killed mid-pull leaves (a committed layer, a partial ingest) is reused."""
    m = busybox.manifests[0]
    cs = world.db.content.namespace(NS)
    partial = max(m.layers, key=lambda layer: layer.size)
    done = next(layer for layer in m.layers if layer.digest != partial.digest)
    await store_blob(
        cs, f"layer-{done.digest}", Descriptor(done.media_type, done.digest, done.size), done.data
    )
    writer = await cs.writer(f"layer-{partial.digest}", partial.size, partial.digest)
    await writer.write(partial.data[: partial.size // 2])
    await writer.close()

    await service.pull(NS, f"{fake.address}/busybox:1")
    await assert_pulled(world, service, f"{fake.address}/busybox:1", busybox, "linux/amd64")
    ranges = [r.range for r in fake.records if partial.digest in r.path and r.method == "GET"]
    assert ranges == [f"bytes={partial.size // 2}-"]
    assert await world.db.content.list_statuses(NS) == []


async def test_a_dropped_connection_is_resumed(
    world: World, service: ImageService, fake: FakeRegistry, busybox: oci.Image
) -> None:
    big = max(busybox.manifests[0].layers, key=lambda layer: layer.size)
    fake.drop_after(big.digest, 100_000, times=1)
    await service.pull(NS, f"{fake.address}/busybox:1")
    await assert_pulled(world, service, f"{fake.address}/busybox:1", busybox, "linux/amd64")
    ranges = [r.range for r in fake.records if big.digest in r.path and r.method == "GET"]
    assert ranges[0] is None and len(ranges) == 2 and ranges[1] is not None and ranges[1].startswith("bytes=")


async def test_corrupt_layer_commits_nothing_then_a_retry_succeeds(
    world: World, service: ImageService, fake: FakeRegistry, busybox: oci.Image
) -> None:
    m = busybox.manifests[0]
    bad = m.layers[1]
    fake.corrupt(bad.digest)
    name = f"{fake.address}/busybox:1"
    with pytest.raises(FailedPrecondition, match=f"blob {bad.digest}: digest mismatch"):
        await service.pull(NS, name)
    assert bad.digest not in await world.digests()
    assert m.chain_ids[1] not in await world.committed(SN)
    assert [k for k in await world.keys(SN) if k.startswith("extract-")] == []
    assert await service.list(NS) == []
    assert await world.db.leases.list(NS) == []
    assert [s for s in await world.db.content.list_statuses(NS) if bad.digest in s.ref] == []

    with fake.lock:
        fake._corrupt.clear()  # the registry is repaired
    await service.pull(NS, name)
    await assert_pulled(world, service, name, busybox, "linux/amd64")


async def test_truncated_gzip_layer_is_refused_then_a_fixed_image_pulls(
    world: World, service: ImageService, fake_registry: FakeRegistry
) -> None:
    layers = oci.busybox_layers("gzip")
    whole = layers[1]
    cut = whole.data[: len(whole.data) - 12]  # the deflate end and the gzip trailer are gone
    with pytest.raises(EOFError):
        gzip.decompress(cut)
    broken_layer = oci.LayerBlob(
        whole.media_type, cut, whole.tar, "gzip", oci.sha256_digest(cut), whole.diff_id
    )
    broken_layers = [layers[0], broken_layer, layers[2]]
    platform = oci.Platform()
    config = oci.make_config([layer.diff_id for layer in broken_layers], platform)
    broken = oci.single(oci.make_manifest(broken_layers, config, platform))
    fake_registry.add_image("busybox", "cut", broken)
    name = f"{fake_registry.address}/busybox:cut"
    with pytest.raises(InvalidArgument, match=f"{name}: .*{broken_layer.digest}"):
        await service.pull(NS, name)
    chain = broken.manifests[0].chain_ids
    assert chain[1] not in await world.committed(SN)
    assert [k for k in await world.keys(SN) if k.startswith("extract-")] == []
    assert await service.list(NS) == []

    fixed = oci.busybox_image("gzip")
    fake_registry.add_image("busybox", "cut", fixed)
    await service.pull(NS, name)
    await assert_pulled(world, service, name, fixed, "linux/amd64")


async def test_unknown_layer_media_type_is_refused_before_downloading(
    service: ImageService, fake_registry: FakeRegistry
) -> None:
    layers = list(oci.busybox_layers("gzip"))
    odd = layers[2]
    layers[2] = oci.LayerBlob(
        "application/vnd.example.thing", odd.data, odd.tar, "gzip", odd.digest, odd.diff_id
    )
    platform = oci.Platform()
    config = oci.make_config([layer.diff_id for layer in layers], platform)
    fake_registry.add_image("odd", "1", oci.single(oci.make_manifest(layers, config, platform)))
    with pytest.raises(
        InvalidArgument, match=f"layer {odd.digest}: unknown layer media type 'application/vnd.example"
    ):
        await service.pull(NS, f"{fake_registry.address}/odd:1")
    assert blob_gets(fake_registry) == 0


async def test_401_without_credentials_then_with(
    world: World, service: ImageService, fake: FakeRegistry, busybox: oci.Image
) -> None:
    fake.require_basic("puller", "s3cret")
    name = f"{fake.address}/busybox:1"
    with pytest.raises(
        PermissionDenied, match=f"{name}: registry {fake.address}.*no credentials are configured"
    ):
        await service.pull(NS, name)
    await service.pull(NS, name, auth=Credentials("puller", "s3cret"))
    await assert_pulled(world, service, name, busybox, "linux/amd64")


async def test_registry_down(service: ImageService, world: World) -> None:
    name = f"127.0.0.1:{free_port()}/busybox:1"
    with pytest.raises(Unavailable, match=f"{name}: registry 127.0.0.1:.* unavailable"):
        await asyncio.wait_for(service.pull(NS, name), 30)
    assert await world.db.leases.list(NS) == []


async def test_unknown_snapshotter_is_refused_before_anything(
    service: ImageService, fake: FakeRegistry
) -> None:
    with pytest.raises(NotFound, match='snapshotter "zfs": not loaded'):
        await service.pull(NS, f"{fake.address}/busybox:1", snapshotter="zfs")
    assert fake.records == []


async def test_malicious_layer_is_refused_and_nothing_escapes(
    world: World, service: ImageService, fake_registry: FakeRegistry, tmp_path: Path
) -> None:
    layers = oci.busybox_layers("gzip")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        info = tarfile.TarInfo("../../../escaped-by-layer.txt")
        info.size = 4
        tf.addfile(info, io.BytesIO(b"evil"))
    evil = oci.LayerBlob.from_tar(buf.getvalue(), "gzip")
    bad_layers = [layers[0], evil]
    platform = oci.Platform()
    config = oci.make_config([layer.diff_id for layer in bad_layers], platform)
    fake_registry.add_image("evil", "1", oci.single(oci.make_manifest(bad_layers, config, platform)))
    name = f"{fake_registry.address}/evil:1"
    with pytest.raises(
        InvalidArgument, match=f"{name}: layer {evil.digest}: .*leads outside the snapshot root"
    ):
        await service.pull(NS, name)
    assert [p for p in tmp_path.rglob("escaped-by-layer.txt")] == []
    assert not Path("/escaped-by-layer.txt").exists()
    assert [k for k in await world.keys(SN) if k.startswith("extract-")] == []
    assert await service.list(NS) == []


async def test_a_cancelled_pull_cleans_up_and_the_next_one_resumes(
    world: World, service: ImageService, fake: FakeRegistry, busybox: oci.Image
) -> None:
    big = max(busybox.manifests[0].layers, key=lambda layer: layer.size)
    fake.drop_after(big.digest, 32 << 10, times=10_000)  # slow: 32 KiB per request
    started = asyncio.Event()

    def progress(p: PullProgress) -> None:
        blob = p.blobs.get(big.digest)
        if blob is not None and blob.offset > 0:
            started.set()

    name = f"{fake.address}/busybox:1"
    task = asyncio.create_task(service.pull(NS, name, progress=progress))
    await asyncio.wait_for(started.wait(), 30)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    for _ in range(100):  # the shared pull task winds down after its last caller left
        if not service._pulls:
            break
        await asyncio.sleep(0.01)
    assert service._pulls == {}
    assert await world.db.leases.list(NS) == []
    assert [k for k in await world.keys(SN) if k.startswith("extract-")] == []
    assert await service.list(NS) == []
    [partial] = [s for s in await world.db.content.list_statuses(NS) if big.digest in s.ref]
    assert partial.offset > 0  # kept for the next attempt

    with fake.lock:
        fake._drops.clear()
    await service.pull(NS, name)
    await assert_pulled(world, service, name, busybox, "linux/amd64")
    last = [r.range for r in fake.records if big.digest in r.path and r.method == "GET"][-1]
    assert last == f"bytes={partial.offset}-"


async def test_pull_without_unpack_records_the_image_only(
    world: World, service: ImageService, fake: FakeRegistry, busybox: oci.Image
) -> None:
    name = f"{fake.address}/busybox:1"
    image = await service.pull(NS, name, unpack=False, labels={"io.cri-containerd.image": "managed"})
    assert image.labels == {"io.cri-containerd.image": "managed"}
    assert await world.committed(SN) == {}
    m = busybox.manifests[0]
    assert LABEL_GC_REF_SNAPSHOT + SN not in await world.labels(m.config.digest)
    assert not await service.is_unpacked(NS, name)
    assert await service.unpack(NS, name) == m.chain_ids
    await assert_pulled(world, service, name, busybox, "linux/amd64")


# -- garbage collection ------------------------------------------------------------------------------


async def test_gc_keeps_the_image_and_takes_the_rest(
    world: World, service: ImageService, fake: FakeRegistry, busybox: oci.Image
) -> None:
    name = f"{fake.address}/busybox:1"
    await service.pull(NS, name)
    stray = b"left over by nobody"
    cs = world.db.content.namespace(NS)
    await store_blob(
        cs, "stray", Descriptor("application/octet-stream", oci.sha256_digest(stray), len(stray)), stray
    )
    before = await world.digests()
    summary = await world.db.gc.run_now()
    after = await world.digests()
    assert before - after == {oci.sha256_digest(stray)}
    assert summary.blobs_removed == 1
    m = busybox.manifests[0]
    assert set(m.chain_ids) <= set(await world.committed(SN))
    present = await files_of(world, SN, m.chain_ids[-1], ("bin/busybox",))
    assert present == {"bin/busybox": True}

    await service.remove(NS, name, sync=True)
    assert await world.digests() == set()
    assert await world.keys(SN) == []
    assert [info async for info in world.content.walk()] == []
    assert [info.name async for info in world.backends[SN].walk()] == []
    # and it pulls again from scratch
    await service.pull(NS, name)
    await assert_pulled(world, service, name, busybox, "linux/amd64")
    assert (await world.db.snapshotter(SN).stat(NS, m.chain_ids[-1])).kind is Kind.COMMITTED


# -- kill -9 in the middle of a pull ----------------------------------------------------------------

#: A pull in a child process that freezes (its loop blocked) once the big layer is partly on
#: disk and the small ones are committed, and says so: the parent then kills it with SIGKILL.
CHILD = """
import asyncio, sys, time
from pathlib import Path
from plugins.images.progress import State
from tests.integration.test_pull import fast_config
from tests.unit.test_unpack import images_world

root, ref, big, threshold, *small = sys.argv[1:]

async def main():
    async with images_world(Path(root), ("overlayfs",)) as w:
        svc = w.service(fast_config())

        def progress(p):
            b = p.blobs.get(big)
            done = [p.blobs.get(d) for d in small]
            if b is not None and b.offset >= int(threshold) and all(
                d is not None and d.state is State.DOWNLOADED for d in done
            ):
                print("READY", b.offset, flush=True)
                time.sleep(3600)

        await svc.pull("default", ref, progress=progress)
        print("DONE", flush=True)

asyncio.run(main())
"""


def ready_line(stdout: IO[bytes]) -> bytes:
    """The child's READY line (its logs go to stdout too), or b"" if it ended first."""
    while line := stdout.readline():
        if line.startswith((b"READY", b"DONE")):
            return line
    return b""


async def test_kill_9_mid_pull_then_pull_again_reuses_what_was_verified(
    fake: FakeRegistry, busybox: oci.Image, tmp_path: Path
) -> None:
    m = busybox.manifests[0]
    big = max(m.layers, key=lambda layer: layer.size)
    small = [layer.digest for layer in m.layers if layer.digest != big.digest]
    fake.drop_after(big.digest, 64 << 10, times=10_000)  # the big layer comes 64 KiB per request
    root = tmp_path / "root"
    name = f"{fake.address}/busybox:1"
    repo = Path(__file__).resolve().parents[2]
    with open(tmp_path / "child.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(root), name, big.digest, str(128 << 10), *small],
            stdout=subprocess.PIPE,
            stderr=log,
            cwd=repo,
        )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(ready_line, proc.stdout), 60)
        assert line.startswith(b"READY"), (tmp_path / "child.log").read_text()[-3000:]
        offset = int(line.split()[1])
        assert 0 < offset < big.size
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=10) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()

    with fake.lock:
        fake._drops.clear()
    gets = {d: blob_gets(fake, d) for d in small}
    async with images_world(root, (SN,)) as world:
        assert len(await world.db.leases.list(NS)) == 1  # the dead pull's lease holds its work
        svc = world.service(fast_config())
        try:
            assert [k for k in await world.keys(SN) if k.startswith("extract-")] != []
            assert await svc.cleanup_interrupted() == 1  # the plugin's init does this
            await svc.pull(NS, name)
            await assert_pulled(world, svc, name, busybox, "linux/amd64", leases=1)
        finally:
            await svc.close()
        assert {d: blob_gets(fake, d) for d in small} == gets  # verified blobs are not fetched again
        resumed = [r.range for r in fake.records if big.digest in r.path and r.method == "GET"][-1]
        assert resumed is not None and int(resumed.removeprefix("bytes=").rstrip("-")) >= offset
        assert await world.db.content.list_statuses(NS) == []
