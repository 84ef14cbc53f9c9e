"""The Transfer and GarbageCollector services of a real berthd, called with the generated stubs.

Images come from Debian's docker-registry (anonymous and basic-auth
fixtures of :mod:`tests.support.fixtures`), built by :mod:`tests.support.oci`.
Each test's daemon is stopped in the fixture, which then checks that nothing
stays mounted under its directories. The coalescing of progress messages is
checked in process against the service's feed, with a fake clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import tarfile
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from grpclib.client import Channel
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from daemon.mount import mount_points_under
from plugins.images import transfer
from plugins.images.progress import BlobProgress, State
from plugins.images.progress import PullProgress as Progress
from protos.berth.services.gc.v1 import CollectRequest, GarbageCollectorStub
from protos.berth.services.images.v1 import (
    Auth,
    ExportRequest,
    ImportChunk,
    PullProgress,
    PullRequest,
    TransferStub,
)
from protos.containerd.services.content.v1 import ContentStub, ListContentRequest
from protos.containerd.services.images.v1 import DeleteImageRequest, ImagesStub
from protos.containerd.services.snapshots.v1 import ListSnapshotsRequest, SnapshotsStub
from tests.integration.conftest import Berthd
from tests.support.oci import Image
from tests.support.push import push_image_sync
from tests.support.registry import PASSWORD, USER, Registry

PHASES = ["resolving", "fetching", "unpacking", "done"]
#: How far along each wire status is; a blob's status never goes back.
RANK = {"waiting": 0, "downloading": 1, "applying": 2, "downloaded": 2, "exists": 3, "done": 3, "error": 4}


def md(ns: str = "default") -> dict[str, str]:
    return {"containerd-namespace": ns}


@pytest.fixture
async def daemon(berthd: Berthd) -> AsyncIterator[Berthd]:
    """The integration daemon; stopped here, then no mount may be left under its base."""
    yield berthd
    berthd.stop()
    assert mount_points_under(berthd.base) == []
    log = berthd.log()
    assert "grpc.internal_error" not in log and "never retrieved" not in log, log


@pytest.fixture
async def channel(daemon: Berthd) -> AsyncIterator[Channel]:
    ch = daemon.channel()
    try:
        yield ch
    finally:
        ch.close()


def stub(channel: Channel, ns: str = "default") -> TransferStub:
    return TransferStub(channel, timeout=60, metadata=md(ns))


async def grpc_error(call: Awaitable[Any]) -> GRPCError:
    with pytest.raises(GRPCError) as err:
        await call
    return err.value


async def pull_all(channel: Channel, req: PullRequest, ns: str = "default") -> list[PullProgress]:
    return [m async for m in stub(channel, ns).pull(req)]


def push(registry: Registry, image: Image, tag: str = "1", **auth: str) -> str:
    push_image_sync(registry.url, "team/busybox", tag, image, auth.get("username"), auth.get("password"))
    return f"{registry.address}/team/busybox:{tag}"


def kind(layer: Any) -> str:
    return str(layer.descriptor.annotations[transfer.ANNOTATION_KIND])


async def test_pull_streams_ordered_progress_ending_with_the_image(
    channel: Channel, registry: Registry, busybox: Image
) -> None:
    ref = push(registry, busybox)
    m = busybox.manifest_for("linux/amd64")
    messages = await pull_all(channel, PullRequest(reference=ref))

    # phases only move forward, and only the last message carries the image
    phases = [PHASES.index(msg.phase) for msg in messages]
    assert phases == sorted(phases) and messages[0].phase == "resolving" and messages[-1].phase == "done"
    assert "fetching" in {msg.phase for msg in messages}
    assert [bool(msg.image and msg.image.name) for msg in messages] == [False] * (len(messages) - 1) + [True]
    last = messages[-1]
    assert last.image.name == ref
    assert (last.image.target.digest, last.image.target.size) == (busybox.digest, busybox.top.size)

    # each blob's status only moves forward; a blob once listed stays listed at its position
    seen: dict[str, int] = {}
    order: list[str] = []
    for msg in messages:
        digests = [layer.descriptor.digest for layer in msg.layers]
        assert digests[: len(order)] == order
        order = digests
        for layer in msg.layers:
            rank = RANK[layer.status]
            assert rank >= seen.get(layer.descriptor.digest, 0), (layer.descriptor.digest, layer.status)
            seen[layer.descriptor.digest] = rank
            assert 0 <= layer.offset <= layer.total == layer.descriptor.size
    final = {layer.descriptor.digest: (kind(layer), layer.status, layer.offset) for layer in last.layers}
    assert final == {
        m.manifest.digest: ("manifest", "done", m.manifest.size),
        m.config.digest: ("config", "done", m.config.size),
        **{layer.digest: ("layer", "done", layer.size) for layer in m.layers},
    }
    # every layer was seen being applied on its way to done
    applying = {
        layer.descriptor.digest for msg in messages for layer in msg.layers if layer.status == "applying"
    }
    assert applying == {layer.digest for layer in m.layers}

    snaps = SnapshotsStub(channel, timeout=10, metadata=md())
    names = [i.name async for r in snaps.list(ListSnapshotsRequest(snapshotter="overlayfs")) for i in r.info]
    assert sorted(names) == sorted(m.chain_ids)

    # a second pull finds everything in place: it still ends with the image
    again = await pull_all(channel, PullRequest(reference=ref))
    assert again[-1].image.target.digest == busybox.digest
    assert {layer.status for layer in again[-1].layers if kind(layer) == "layer"} == {"exists"}


async def test_pull_without_unpack_fetches_content_only(
    channel: Channel, registry: Registry, busybox: Image
) -> None:
    ref = push(registry, busybox)
    # a client that goes away after the first message cancels nothing it should not
    async with contextlib.aclosing(stub(channel).pull(PullRequest(reference=ref, no_unpack=True))) as it:
        async for _ in it:
            break
    messages = await pull_all(channel, PullRequest(reference=ref, no_unpack=True))
    assert messages[-1].image.target.digest == busybox.digest
    assert "unpacking" not in {msg.phase for msg in messages}
    assert {layer.status for layer in messages[-1].layers} == {"done"}
    snaps = SnapshotsStub(channel, timeout=10, metadata=md())
    assert [i async for r in snaps.list(ListSnapshotsRequest(snapshotter="overlayfs")) for i in r.info] == []


async def test_pull_errors_name_what_is_wrong(channel: Channel, registry: Registry, busybox: Image) -> None:
    ref = push(registry, busybox)
    missing = f"{registry.address}/team/busybox:no-such-tag"
    err = await grpc_error(pull_all(channel, PullRequest(reference=missing)))
    assert err.status is Status.NOT_FOUND and "no-such-tag" in (err.message or "")

    cases = [
        (PullRequest(reference=""), Status.INVALID_ARGUMENT, "reference"),
        (PullRequest(reference="Not A Reference"), Status.INVALID_ARGUMENT, "Not A Reference"),
        (PullRequest(reference=ref, platform="linux/amd64/x/y"), Status.INVALID_ARGUMENT, "linux/amd64/x/y"),
        (PullRequest(reference=ref, snapshotter="nosuch"), Status.NOT_FOUND, "nosuch"),
        (PullRequest(reference=ref, auth=Auth(password="x")), Status.INVALID_ARGUMENT, "auth.username"),
        (PullRequest(reference=ref, auth=Auth(username="u", token="t")), Status.INVALID_ARGUMENT, "auth"),
    ]
    for req, status, named in cases:
        err = await grpc_error(pull_all(channel, req))
        assert (err.status, named in (err.message or "")) == (status, True), (req, err.message)


async def test_pull_from_basic_auth_registry(
    channel: Channel, basic_registry: Registry, busybox: Image
) -> None:
    ref = push(basic_registry, busybox, username=USER, password=PASSWORD)
    err = await grpc_error(pull_all(channel, PullRequest(reference=ref)))
    assert err.status is Status.PERMISSION_DENIED and basic_registry.address in (err.message or "")
    wrong = await grpc_error(pull_all(channel, PullRequest(reference=ref, auth=Auth(USER, "wrong"))))
    assert wrong.status is Status.PERMISSION_DENIED

    messages = await pull_all(
        channel, PullRequest(reference=ref, auth=Auth(username=USER, password=PASSWORD))
    )
    assert messages[-1].image.name == ref and messages[-1].image.target.digest == busybox.digest


async def test_export_then_import_into_another_namespace(
    channel: Channel, registry: Registry, busybox: Image
) -> None:
    ref = push(registry, busybox)
    m = busybox.manifest_for("linux/amd64")
    await pull_all(channel, PullRequest(reference=ref))

    chunks = [c.data async for c in stub(channel).export(ExportRequest(names=[ref]))]
    assert len(chunks) >= 2 and all(0 < len(c) <= transfer.EXPORT_CHUNK for c in chunks)
    archive = b"".join(chunks)
    with tarfile.open(fileobj=io.BytesIO(archive)) as tf:
        members = set(tf.getnames())
        index = json.loads(tf.extractfile("index.json").read())  # type: ignore[union-attr]
    assert {f"blobs/sha256/{d.removeprefix('sha256:')}" for d in busybox.blobs()} <= members
    assert [e["annotations"]["io.containerd.image.name"] for e in index["manifests"]] == [ref]

    # odd chunk sizes: the daemon's reader must join and split them
    step = 7777
    pieces = [ImportChunk(data=archive[i : i + step]) for i in range(0, len(archive), step)]
    resp = await stub(channel, "other").import_(pieces)
    assert [(i.name, i.target.digest) for i in resp.images] == [(ref, busybox.digest)]
    snaps = SnapshotsStub(channel, timeout=10, metadata=md("other"))
    names = [i.name async for r in snaps.list(ListSnapshotsRequest(snapshotter="overlayfs")) for i in r.info]
    assert sorted(names) == sorted(m.chain_ids)

    # the first chunk's options apply: a name for an unnamed archive, no unpack
    resp = await stub(channel, "third").import_([ImportChunk(data=archive, no_unpack=True, name="x/y:z")])
    assert [i.name for i in resp.images] == [ref]
    snaps = SnapshotsStub(channel, timeout=10, metadata=md("third"))
    assert [i async for r in snaps.list(ListSnapshotsRequest(snapshotter="overlayfs")) for i in r.info] == []


async def test_import_and_export_reject_bad_requests(channel: Channel) -> None:
    garbage = [ImportChunk(data=b"this is no tar archive " * 400), ImportChunk(data=b"\x00\x01" * 5000)]
    err = await grpc_error(stub(channel).import_(garbage))
    assert err.status is Status.INVALID_ARGUMENT and "archive" in (err.message or "")
    err = await grpc_error(stub(channel).import_([]))
    assert err.status is Status.INVALID_ARGUMENT and "data" in (err.message or "")
    err = await grpc_error(stub(channel).import_([ImportChunk(data=b"x", snapshotter="nosuch")]))
    assert err.status is Status.NOT_FOUND and "nosuch" in (err.message or "")

    async def export(req: ExportRequest) -> list[bytes]:
        return [c.data async for c in stub(channel).export(req)]

    for req, status, named in [
        (ExportRequest(), Status.INVALID_ARGUMENT, "names"),
        (ExportRequest(names=["a", ""]), Status.INVALID_ARGUMENT, "names[1]"),
        (ExportRequest(names=["docker.io/library/ghost:1"]), Status.NOT_FOUND, "ghost"),
    ]:
        err = await grpc_error(export(req))
        assert (err.status, named in (err.message or "")) == (status, True), err.message


async def test_collect_reports_what_it_freed(
    make_berthd: Callable[..., Berthd], registry: Registry, busybox: Image
) -> None:
    """With the scheduled collection far away, only Collect frees what a deleted image held."""
    d = make_berthd(config='version = 1\n[plugins."berth.metadata.v1.sqlite"]\ngc_delay = 3600\n').start()
    try:
        await d.wait_ready()
        ch = d.channel()
        try:
            ref = push(registry, busybox)
            m = busybox.manifest_for("linux/amd64")
            await pull_all(ch, PullRequest(reference=ref))
            await ImagesStub(ch, timeout=10, metadata=md()).delete(DeleteImageRequest(name=ref))
            gc = GarbageCollectorStub(ch, timeout=30)
            first = await gc.collect(CollectRequest())
            assert first.errors == []
            assert first.content_removed == len(m.blobs()) + 1  # config and layers, and the manifest
            assert first.bytes_freed == m.manifest.size + sum(b.size for b in m.blobs().values())
            assert first.snapshots_removed == len(m.chain_ids)
            assert first.seconds > 0
            content = ContentStub(ch, timeout=10, metadata=md())
            assert [i async for r in content.list(ListContentRequest()) for i in r.info] == []
            second = await gc.collect(CollectRequest())
            assert (second.content_removed, second.snapshots_removed, second.bytes_freed) == (0, 0, 0)
        finally:
            ch.close()
    finally:
        d.stop()
        assert mount_points_under(d.base) == []


# -- the progress feed, in process -----------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def test_feed_sends_every_state_change_and_bytes_at_most_every_interval() -> None:
    clock = Clock()
    feed = transfer._PullFeed(unpack=True, interval=0.1, clock=clock)
    p = Progress("default", "r")
    digest = "sha256:" + "a" * 64
    p.blobs[digest] = BlobProgress("layer", digest, 1000)
    feed(p)  # new blob: sent
    p.blobs[digest].state = State.DOWNLOADING
    feed(p)  # state change: sent
    for offset in range(100, 600, 100):  # bytes within one interval: at most one more message
        p.blobs[digest].offset = offset
        feed(p)
    clock.now += 0.2
    p.blobs[digest].offset = 700
    feed(p)  # interval passed: sent
    clock.now += 0.2
    p.blobs[digest].offset = 800
    feed(p)  # sent too, replacing the unread 700 (a newer count makes it useless)
    p.blobs[digest].state = State.UNPACKING
    feed(p)
    p.done = True
    feed(p)  # the final message is the service's, not the feed's
    feed.pipe.close()
    got = [(m.layers[0].status, m.layers[0].offset) async for m in feed.pipe]
    assert got == [("waiting", 0), ("downloading", 0), ("downloading", 800), ("applying", 800)]
    assert feed.last is p


async def test_pipe_bounds_the_producer() -> None:
    pipe: transfer.Pipe[int] = transfer.Pipe(depth=2)
    await pipe.put(1)
    await pipe.put(2)
    third = asyncio.ensure_future(pipe.put(3))
    await asyncio.sleep(0)
    assert not third.done()  # two unread: the producer waits
    items = pipe.__aiter__()
    assert await anext(items) == 1
    await asyncio.wait_for(third, 5)
    pipe.close()
    assert [i async for i in items] == [2, 3]
