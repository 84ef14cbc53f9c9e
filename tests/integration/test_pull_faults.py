"""Faults during image pulls, end to end: a real berthd, its Transfer RPC, a misbehaving registry.

Every case fails a pull through ``berth.services.images.v1.Transfer/Pull``
and checks what an operator (or kubelet) would get: the gRPC status, a
message naming the image or the blob at fault, nothing corrupt committed
(checked through the Content and Snapshots services), a daemon that still
serves; then the cause is repaired and the same pull succeeds. The disk-full
case runs berthd on a small tmpfs root that is grown afterwards; the crash
case SIGKILLs berthd in the middle of a pull and restarts it on the same root.

The in-process counterparts (the images service without gRPC) are in
:mod:`tests.integration.test_pull`. Images come from
:mod:`tests.support.oci`, served by :class:`~tests.support.fakeregistry.FakeRegistry`.
Every daemon is stopped, every mount under its directory released (a leak
fails the test after the cleanup), every tmpfs unmounted, even on failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import io
import os
import signal
import subprocess
import tarfile
from collections.abc import AsyncIterator, Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import betterproto.lib.google.protobuf as pb
import pytest
from grpclib.client import Channel
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from daemon.mount import mount_points_under, mounted, release, unmount_all
from daemon.protocols import Mount
from protos.berth.services.images.v1 import Auth, LayerProgress, PullProgress, PullRequest, TransferStub
from protos.containerd.services.content.v1 import (
    ContentStub,
    ListContentRequest,
    ListStatusesRequest,
    ReadContentRequest,
)
from protos.containerd.services.content.v1 import Status as IngestStatus
from protos.containerd.services.images.v1 import ImagesStub, ListImagesRequest
from protos.containerd.services.leases.v1 import CreateRequest, DeleteRequest, LeasesStub
from protos.containerd.services.snapshots.v1 import (
    Info,
    Kind,
    ListSnapshotsRequest,
    RemoveSnapshotRequest,
    SnapshotsStub,
    ViewSnapshotRequest,
)
from protos.containerd.services.version.v1 import VersionStub
from tests.integration.conftest import Berthd
from tests.support import oci
from tests.support.fakeregistry import FakeRegistry
from tests.support.registry import free_port

pytest_plugins = ["tests.support.fixtures"]

NS = "default"
SN = "overlayfs"
#: Fast retries (a failing pull fails in milliseconds), linux/amd64 chosen from indexes.
CONFIG = """version = 1
[plugins."berth.images.v1.default"]
platform = "linux/amd64"
retry_attempts = 2
retry_initial_delay = 0.01
retry_max_delay = 0.05
retry_max_elapsed = 5.0
connect_timeout = 2.0
read_timeout = 10.0
"""
#: Longest a pull may take here (big_image is ~26 MB compressed); a hang fails the test with the log.
PULL_TIMEOUT = 45.0
#: The tmpfs root of the disk-full case: too small for big_image's blobs and unpacked files ...
SMALL_ROOT = "24m"
#: ... and what it is grown to afterwards (remount keeps the data).
LARGE_ROOT = "256m"
#: Bytes the fake registry sends per request of the layer that must be slow (then it drops the
#: connection and berthd resumes with Range): ~770 requests for a 6 MB layer.
TRICKLE = 8 << 10
#: The descriptor annotation of a LayerProgress naming the blob's kind (transfer.proto).
ANNOTATION_KIND = "io.berth.progress.kind"
#: Wire statuses of a layer whose blob is verified and committed to content.
DONE = ("downloaded", "done")


def md(ns: str = NS, lease: str = "") -> dict[str, str]:
    out = {"containerd-namespace": ns}
    if lease:
        out["containerd-lease"] = lease
    return out


@pytest.fixture(scope="module")
def big() -> oci.Image:
    """~26 MB of gzip layers, ~50 MB unpacked: busybox's three layers and two more, bulk files in four."""
    return oci.big_image()


# -- daemons, tmpfs roots and their cleanup ------------------------------------------------------------


@dataclass
class Rig:
    """Starts daemons (optionally on a tmpfs root) and takes everything down again, in order."""

    make_berthd: Callable[..., Berthd]
    daemons: list[Berthd] = field(default_factory=list)
    tmpfs: list[Path] = field(default_factory=list)

    def daemon(self, *, tmpfs_size: str = "") -> Berthd:
        d: Berthd = self.make_berthd(config=CONFIG)
        self.daemons.append(d)
        if tmpfs_size:
            d.root.mkdir(parents=True)
            subprocess.run(
                ["mount", "-t", "tmpfs", "-o", f"size={tmpfs_size},mode=0711", "tmpfs", str(d.root)],
                check=True,
                capture_output=True,
            )
            self.tmpfs.append(d.root)
        return d

    async def start(self, d: Berthd) -> Berthd:
        d.start()
        await d.wait_ready()
        return d

    async def close(self) -> list[str]:
        """Stop every daemon, release what they left mounted, unmount the tmpfs roots.

        Returns the mounts the daemons left behind (there should be none),
        after releasing them so that nothing outlives the test either way.
        """
        for d in self.daemons:
            with contextlib.suppress(Exception):  # stop() escalates to SIGKILL itself
                d.stop()
        leaked: list[str] = []
        ours = {os.path.realpath(p) for p in self.tmpfs}
        for d in self.daemons:
            left = [p for p in mount_points_under(d.base) if p not in ours]
            leaked += left
            for target in sorted(left, key=len, reverse=True):  # deepest first
                with contextlib.suppress(Exception):
                    await release(target)
        for root in self.tmpfs:
            try:
                await unmount_all(root)
            except Exception:  # noqa: BLE001 - busy: detach, the kernel finishes when it can
                await unmount_all(root, detach=True)
        return leaked


@pytest.fixture
async def rig(make_berthd: Callable[..., Berthd]) -> AsyncIterator[Rig]:
    r = Rig(make_berthd)
    try:
        yield r
    finally:
        leaked = await r.close()
        assert leaked == [], f"berthd left mounts behind: {leaked}"
        for d in r.daemons:
            assert mount_points_under(d.base) == []


@pytest.fixture
async def daemon(rig: Rig) -> Berthd:
    return await rig.start(rig.daemon())


@pytest.fixture
async def channel(daemon: Berthd) -> AsyncIterator[Channel]:
    ch = daemon.channel()
    try:
        yield ch
    finally:
        ch.close()


# -- calls ------------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    """What one Pull call streamed, and how it ended (``error`` None: it succeeded)."""

    messages: list[PullProgress]
    error: GRPCError | None

    @property
    def last(self) -> PullProgress:
        assert self.messages, "the pull streamed no message"
        return self.messages[-1]

    def blob_statuses(self) -> dict[str, str]:
        """Every blob's last wire status (the last message lists every blob found so far)."""
        return {lp.descriptor.digest: lp.status for lp in self.last.layers} if self.messages else {}


async def pull(d: Berthd, channel: Channel, ref: str, **fields: object) -> Outcome:
    """One Transfer.Pull, streamed to its end; a hang fails the test with the daemon's log tail."""
    stub = TransferStub(channel, metadata=md())
    messages: list[PullProgress] = []
    try:
        async with asyncio.timeout(PULL_TIMEOUT):
            async for message in stub.pull(PullRequest(reference=ref, **fields)):  # type: ignore[arg-type]
                messages.append(message)
    except GRPCError as exc:
        return Outcome(messages, exc)
    except TimeoutError:
        raise AssertionError(
            f"pull of {ref} hung for {PULL_TIMEOUT}s; berthd log:\n{d.log()[-6000:]}"
        ) from None
    return Outcome(messages, None)


async def pull_ok(d: Berthd, channel: Channel, ref: str, image: oci.Image, **fields: object) -> Outcome:
    out = await pull(d, channel, ref, **fields)
    assert out.error is None, f"pull of {ref} failed: {out.error.status.name}: {out.error.message}"
    assert out.last.phase == "done"
    assert (out.last.image.name, out.last.image.target.digest) == (ref, image.digest)
    return out


async def pull_fails(d: Berthd, channel: Channel, ref: str, status: Status, **fields: object) -> Outcome:
    out = await pull(d, channel, ref, **fields)
    assert out.error is not None, f"pull of {ref} succeeded, expected {status.name}"
    assert out.error.status is status, f"{out.error.status.name}: {out.error.message}"
    return out


def message_of(out: Outcome) -> str:
    assert out.error is not None
    return out.error.message or ""


def assert_names(out: Outcome, *candidates: str) -> None:
    """The error message names at least one of ``candidates`` (the image, a digest)."""
    message = message_of(out)
    assert any(c in message for c in candidates), f"{message!r} names none of {candidates}"


async def content(channel: Channel) -> dict[str, int]:
    """Committed blobs of the namespace: digest -> size."""
    stub = ContentStub(channel, timeout=10, metadata=md())
    return {i.digest: i.size async for r in stub.list(ListContentRequest()) for i in r.info}


async def ingests(channel: Channel) -> list[IngestStatus]:
    stub = ContentStub(channel, timeout=10, metadata=md())
    return list((await stub.list_statuses(ListStatusesRequest())).statuses)


async def sha256_of(channel: Channel, digest: str) -> str:
    stub = ContentStub(channel, timeout=30, metadata=md())
    h = hashlib.sha256()
    async for r in stub.read(ReadContentRequest(digest=digest)):
        h.update(r.data)
    return "sha256:" + h.hexdigest()


async def snapshots(channel: Channel) -> list[Info]:
    stub = SnapshotsStub(channel, timeout=10, metadata=md())
    return [i async for r in stub.list(ListSnapshotsRequest(snapshotter=SN)) for i in r.info]


async def image_names(channel: Channel) -> list[str]:
    return [
        i.name
        for i in (await ImagesStub(channel, timeout=10, metadata=md()).list(ListImagesRequest())).images
    ]


async def assert_nothing_corrupt(channel: Channel, image: oci.Image, failed: Collection[str] = ()) -> None:
    """Only verified content and correctly chained, committed layers are left by a failed pull.

    Every committed blob belongs to ``image``, has its size and hashes to its
    digest (read back through the Content service); no blob of ``failed`` is
    committed; every committed snapshot is one of the image's chain ids on
    its proper parent, and its layer blob is committed; anything else is an
    active ``extract-*`` snapshot (an unpack that did not finish, never used).
    """
    expected = {digest: blob.size for digest, blob in image.blobs().items()}
    stored = await content(channel)
    assert {d: s for d, s in stored.items() if expected.get(d) != s} == {}
    assert set(failed) & set(stored) == set()
    for digest in stored:
        assert await sha256_of(channel, digest) == digest
    for m in image.manifests:
        parents = dict(zip(m.chain_ids, ["", *m.chain_ids[:-1]], strict=True))
        layer_of = {c: layer.digest for c, layer in zip(m.chain_ids, m.layers, strict=True)}
        for info in await snapshots(channel):
            if info.kind is Kind.COMMITTED:
                assert parents.get(info.name) == info.parent, (info.name, info.parent)
                assert layer_of[info.name] in stored
            else:
                assert info.kind is Kind.ACTIVE and info.name.startswith("extract-"), info


async def assert_files(
    d: Berthd, channel: Channel, manifest: oci.Manifest, extra: Mapping[str, int] | None = None
) -> None:
    """The image is unpacked: its chain committed, and its files seen through a view's real mounts.

    ``extra`` maps more paths to their sizes. The view is held by a lease of
    its own so that no collection takes it while it is looked at.
    """
    extra = dict(extra or {})
    chain = manifest.chain_ids
    committed = {i.name: i.parent for i in await snapshots(channel) if i.kind is Kind.COMMITTED}
    assert {c: committed.get(c) for c in chain} == dict(zip(chain, ["", *chain[:-1]], strict=True))
    leases = LeasesStub(channel, timeout=10, metadata=md())
    await leases.create(CreateRequest(id="check-files"))
    sn = SnapshotsStub(channel, timeout=30, metadata=md(lease="check-files"))
    try:
        view = await sn.view(ViewSnapshotRequest(snapshotter=SN, key="check-files", parent=chain[-1]))
        mounts = [Mount(m.type, m.source, m.target, tuple(m.options)) for m in view.mounts]
        try:
            async with mounted(mounts, dir=d.base) as root:
                missing = [p for p in oci.BUSYBOX_PRESENT if not os.path.lexists(root / p)]
                present = [p for p in oci.BUSYBOX_ABSENT if os.path.lexists(root / p)]
                sizes = {p: (root / p).stat().st_size if (root / p).exists() else -1 for p in extra}
                hello = (root / "data/hello.txt").read_bytes()
        finally:
            await sn.remove(RemoveSnapshotRequest(snapshotter=SN, key="check-files"))
    finally:
        await leases.delete(DeleteRequest(id="check-files"))
    assert (missing, present, sizes, hello) == ([], [], extra, oci.HELLO_TEXT)


def bulk_files(image: oci.Image) -> dict[str, int]:
    """The bulk files of :func:`oci.big_image`, by path, with their sizes (read from the layers)."""
    out: dict[str, int] = {}
    for layer in image.manifests[0].layers:
        with tarfile.open(fileobj=io.BytesIO(layer.tar)) as tf:
            out.update({m.name: m.size for m in tf.getmembers() if m.name.startswith("bulk/") and m.isfile()})
    return out


def gets(fake: FakeRegistry, digest: str, since: int = 0) -> list[str | None]:
    """The Range headers of the blob GETs of ``digest`` (None: the whole blob), from record ``since`` on."""
    with fake.lock:
        records = list(fake.records[since:])
    return [r.range for r in records if r.method == "GET" and r.path.endswith(f"/blobs/{digest}")]


async def close_quietly(stream: AsyncIterator[object]) -> None:
    """Close a response stream whose server may be gone (it then cannot end cleanly)."""
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        with contextlib.suppress(Exception):
            await aclose()


def image_with_layers(layers: list[oci.LayerBlob]) -> oci.Image:
    platform = oci.Platform()
    config = oci.make_config([layer.diff_id for layer in layers], platform)
    return oci.single(oci.make_manifest(layers, config, platform))


# -- disk full ---------------------------------------------------------------------------------------------


async def test_disk_full_fails_cleanly_then_the_pull_succeeds_once_there_is_room(
    rig: Rig, fake_registry: FakeRegistry, big: oci.Image
) -> None:
    d = await rig.start(rig.daemon(tmpfs_size=SMALL_ROOT))
    fake_registry.add_image("big", "1", big)
    ref = f"{fake_registry.address}/big:1"
    m = big.manifests[0]
    ch = d.channel()
    try:
        out = await pull_fails(d, ch, ref, Status.RESOURCE_EXHAUSTED)
        assert_names(out, ref, *big.blobs())
        failed = [digest for digest, status in out.blob_statuses().items() if status == "error"]
        await assert_nothing_corrupt(ch, big, failed)
        assert await image_names(ch) == []
        # the daemon still serves, on its full disk
        assert (await VersionStub(ch, timeout=10).version(pb.Empty())).version

        subprocess.run(["mount", "-o", f"remount,size={LARGE_ROOT}", str(d.root)], check=True)
        await pull_ok(d, ch, ref, big)
        assert await image_names(ch) == [ref]
        await assert_files(d, ch, m, bulk_files(big))
        stored = await content(ch)
        assert {layer.digest for layer in m.layers} <= set(stored)
    finally:
        ch.close()


# -- kill -9 in the middle of a pull -------------------------------------------------------------------------


@dataclass
class Midway:
    """What the daemon reported just before it was killed."""

    committed: list[str]  # layers verified and committed to content
    partial: int  # bytes of the slow layer on disk (at least)


def midway(message: PullProgress, slow: str) -> Midway | None:
    """The moment to kill: a layer committed, the slow one partly downloaded; else None.

    The slow layer may be ``applying`` while it downloads (teed into the
    unpacker once the layers below it are applied).
    """
    layers: dict[str, LayerProgress] = {lp.descriptor.digest: lp for lp in message.layers}
    s = layers.get(slow)
    committed = [
        d
        for d, lp in layers.items()
        if d != slow and lp.descriptor.annotations.get(ANNOTATION_KIND) == "layer" and lp.status in DONE
    ]
    if (
        s is None
        or not committed
        or s.status not in ("downloading", "applying")
        or not 0 < s.offset < s.total
    ):
        return None
    return Midway(committed, s.offset)


async def test_kill_9_mid_pull_then_restart_resumes_and_reuses_what_was_verified(
    rig: Rig, fake_registry: FakeRegistry, big: oci.Image
) -> None:
    m = big.manifests[0]
    slow = m.layers[-1]  # downloads after others have finished (three at a time)
    fake_registry.add_image("big", "1", big)
    fake_registry.drop_after(slow.digest, TRICKLE, times=1_000_000)
    ref = f"{fake_registry.address}/big:1"
    d = await rig.start(rig.daemon())

    seen: Midway | None = None
    ch = d.channel()
    stream = TransferStub(ch, metadata=md()).pull(PullRequest(reference=ref))
    try:
        async with asyncio.timeout(PULL_TIMEOUT):
            async for message in stream:
                assert not message.image.name, "the pull finished before it could be interrupted"
                seen = midway(message, slow.digest)
                if seen is not None:
                    d.signal(signal.SIGKILL)
                    break
    finally:
        await close_quietly(stream)
        ch.close()
    assert seen is not None, f"never saw a committed layer and a partial one:\n{d.log()[-4000:]}"
    assert d.wait_exit(timeout=10) == -signal.SIGKILL

    fake_registry.clear_faults()
    mark = len(fake_registry.records)
    await rig.start(d)  # the same root and state
    ch = d.channel()
    try:
        partial = [s for s in await ingests(ch) if s.ref == f"layer-{slow.digest}"]
        assert len(partial) == 1 and seen.partial <= partial[0].offset < slow.size, partial
        assert [s.name for s in await snapshots(ch) if s.name.startswith("extract-")] == []

        await pull_ok(d, ch, ref, big)

        for digest in seen.committed:  # verified before the kill: not fetched again
            assert gets(fake_registry, digest, mark) == [], digest
        resumed = gets(fake_registry, slow.digest, mark)
        assert resumed == [f"bytes={partial[0].offset}-"], resumed
        assert await ingests(ch) == []
        assert [s.name for s in await snapshots(ch) if s.name.startswith("extract-")] == []
        await assert_files(d, ch, m, bulk_files(big))
    finally:
        ch.close()


# -- bad registries and bad images, each repaired and pulled again ----------------------------------------


@pytest.fixture
def fake(fake_registry: FakeRegistry, busybox: oci.Image) -> FakeRegistry:
    fake_registry.add_image("busybox", "1", busybox)
    return fake_registry


async def test_corrupt_blob_then_the_repaired_registry(
    daemon: Berthd, channel: Channel, fake: FakeRegistry, busybox: oci.Image
) -> None:
    m = busybox.manifests[0]
    bad = m.layers[1]
    fake.corrupt(bad.digest)
    ref = f"{fake.address}/busybox:1"
    out = await pull_fails(daemon, channel, ref, Status.FAILED_PRECONDITION)
    assert bad.digest in message_of(out) and "digest" in message_of(out)
    await assert_nothing_corrupt(channel, busybox, [bad.digest])
    assert m.chain_ids[1] not in {s.name for s in await snapshots(channel)}
    assert [s for s in await ingests(channel) if bad.digest in s.ref] == []  # bad bytes are not kept
    assert await image_names(channel) == []

    fake.clear_faults()
    await pull_ok(daemon, channel, ref, busybox)
    await assert_files(daemon, channel, m)


async def test_registry_down_then_up(daemon: Berthd, channel: Channel, busybox: oci.Image) -> None:
    port = free_port()
    ref = f"127.0.0.1:{port}/busybox:1"
    out = await pull_fails(daemon, channel, ref, Status.UNAVAILABLE)
    assert_names(out, ref)
    assert await image_names(channel) == [] and await content(channel) == {}

    up = FakeRegistry()
    up.server.port = port  # the same address the reference names
    up.add_image("busybox", "1", busybox)
    with up:
        await pull_ok(daemon, channel, ref, busybox)
    await assert_files(daemon, channel, busybox.manifests[0])


async def test_401_without_credentials_then_with(
    daemon: Berthd, channel: Channel, fake: FakeRegistry, busybox: oci.Image
) -> None:
    fake.require_basic("puller", "s3cret")
    ref = f"{fake.address}/busybox:1"
    out = await pull_fails(daemon, channel, ref, Status.PERMISSION_DENIED)
    assert_names(out, ref)
    assert fake.count("/blobs/", "GET") == 0
    out = await pull_fails(daemon, channel, ref, Status.PERMISSION_DENIED, auth=Auth("puller", "wrong"))
    assert_names(out, ref)

    await pull_ok(daemon, channel, ref, busybox, auth=Auth("puller", "s3cret"))
    await assert_files(daemon, channel, busybox.manifests[0])


async def test_no_manifest_for_the_platform_then_one_that_is_offered(
    daemon: Berthd, channel: Channel, fake_registry: FakeRegistry, busybox_index: oci.Image
) -> None:
    fake_registry.add_image("busybox", "multi", busybox_index)
    ref = f"{fake_registry.address}/busybox:multi"
    out = await pull_fails(daemon, channel, ref, Status.NOT_FOUND, platform="linux/s390x")
    assert_names(out, ref)
    assert "linux/s390x" in message_of(out) and "linux/arm64" in message_of(out)
    assert fake_registry.count("/blobs/", "GET") == 0
    assert await image_names(channel) == []

    await pull_ok(daemon, channel, ref, busybox_index, platform="linux/arm64")
    arm = busybox_index.manifest_for("linux/arm64")
    await assert_files(daemon, channel, arm)
    amd = busybox_index.manifest_for("linux/amd64")
    assert amd.digest not in await content(channel)


async def test_truncated_gzip_layer_then_a_fixed_image_under_the_same_tag(
    daemon: Berthd, channel: Channel, fake_registry: FakeRegistry, busybox: oci.Image
) -> None:
    layers = oci.busybox_layers("gzip")
    whole = layers[1]
    cut = whole.data[: len(whole.data) - 12]  # the deflate end and the gzip trailer are gone
    with pytest.raises(EOFError):
        gzip.decompress(cut)
    truncated = oci.LayerBlob(whole.media_type, cut, whole.tar, "gzip", oci.sha256_digest(cut), whole.diff_id)
    broken = image_with_layers([layers[0], truncated, layers[2]])
    fake_registry.add_image("busybox", "1", broken)
    ref = f"{fake_registry.address}/busybox:1"
    out = await pull_fails(daemon, channel, ref, Status.INVALID_ARGUMENT)
    assert_names(out, truncated.digest)
    assert_names(out, ref)
    await assert_nothing_corrupt(channel, broken)
    chain = broken.manifests[0].chain_ids
    assert {s.name for s in await snapshots(channel)} & set(chain[1:]) == set()
    assert await image_names(channel) == []

    fake_registry.add_image("busybox", "1", busybox)  # the tag now names a good image
    await pull_ok(daemon, channel, ref, busybox)
    await assert_files(daemon, channel, busybox.manifests[0])


async def test_unknown_media_type_is_refused_before_downloading_then_a_fixed_image(
    daemon: Berthd, channel: Channel, fake_registry: FakeRegistry, busybox: oci.Image
) -> None:
    layers = list(oci.busybox_layers("gzip"))
    odd = layers[2]
    layers[2] = oci.LayerBlob(
        "application/vnd.example.thing", odd.data, odd.tar, "gzip", odd.digest, odd.diff_id
    )
    fake_registry.add_image("busybox", "1", image_with_layers(layers))
    ref = f"{fake_registry.address}/busybox:1"
    out = await pull_fails(daemon, channel, ref, Status.INVALID_ARGUMENT)
    assert_names(out, ref)
    assert odd.digest in message_of(out) and "application/vnd.example.thing" in message_of(out)
    assert fake_registry.count("/blobs/", "GET") == 0
    assert await image_names(channel) == []

    fake_registry.add_image("busybox", "1", busybox)
    await pull_ok(daemon, channel, ref, busybox)
    await assert_files(daemon, channel, busybox.manifests[0])


async def test_malicious_layer_escapes_nothing_then_a_fixed_image(
    daemon: Berthd, channel: Channel, fake_registry: FakeRegistry, busybox: oci.Image
) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        info = tarfile.TarInfo("../../../../escaped-by-layer.txt")
        info.size = 4
        tf.addfile(info, io.BytesIO(b"evil"))
    evil = oci.LayerBlob.from_tar(buf.getvalue(), "gzip")
    bad = image_with_layers([oci.busybox_layers("gzip")[0], evil])
    fake_registry.add_image("busybox", "1", bad)
    ref = f"{fake_registry.address}/busybox:1"
    out = await pull_fails(daemon, channel, ref, Status.INVALID_ARGUMENT)
    assert_names(out, evil.digest)
    assert_names(out, ref)
    assert list(daemon.base.rglob("escaped-by-layer.txt")) == []
    assert not Path("/escaped-by-layer.txt").exists()
    chain = bad.manifests[0].chain_ids
    assert chain[1] not in {s.name for s in await snapshots(channel)}
    assert await image_names(channel) == []

    fake_registry.add_image("busybox", "1", busybox)
    await pull_ok(daemon, channel, ref, busybox)
    await assert_files(daemon, channel, busybox.manifests[0])
