"""Snapshots and Diff services of a real berthd: real overlay and bind mounts, and ``ctr snapshots``.

Every test mounts what the daemon returns (as root, with :mod:`daemon.mount`),
unmounts it in a ``finally``, and checks that nothing stays mounted under the
daemon's directories once it is stopped.
"""

from __future__ import annotations

import errno
import hashlib
import json
from collections.abc import AsyncIterator
from pathlib import Path

import betterproto.lib.google.protobuf as pb
import pytest
from grpclib.client import Channel
from grpclib.const import Status

from daemon.mount import mount_points_under, mounted
from daemon.protocols import Mount
from protos.containerd.services.content.v1 import ContentStub, WriteAction, WriteContentRequest
from protos.containerd.services.diff.v1 import ApplyRequest, DiffRequest, DiffStub
from protos.containerd.services.leases.v1 import CreateRequest, DeleteRequest, LeasesStub
from protos.containerd.services.snapshots.v1 import (
    CommitSnapshotRequest,
    Info,
    Kind,
    ListSnapshotsRequest,
    MountsRequest,
    PrepareSnapshotRequest,
    RemoveSnapshotRequest,
    SnapshotsStub,
    StatSnapshotRequest,
    UpdateSnapshotRequest,
    UsageRequest,
    ViewSnapshotRequest,
)
from protos.containerd.types import Descriptor as PbDescriptor
from protos.containerd.types import Mount as PbMount
from tests.integration.conftest import Berthd, ctr, grpc_error, headers, ok
from tests.support.oci import BUSYBOX_ABSENT, BUSYBOX_PRESENT, HELLO_TEXT, busybox_layers, chain_ids

OVERLAY = "overlayfs"


def mounts_of(pbs: list[PbMount]) -> list[Mount]:
    return [Mount(m.type, m.source, m.target, tuple(m.options)) for m in pbs]


async def names(stub: SnapshotsStub, snapshotter: str = OVERLAY, *filters: str) -> list[str]:
    req = ListSnapshotsRequest(snapshotter=snapshotter, filters=list(filters))
    return sorted([i.name async for r in stub.list(req) for i in r.info])


async def collect_now(channel: Channel, ns: str) -> None:
    """Run a garbage collection now: deleting a throw-away lease with ``sync`` does that."""
    leases = LeasesStub(channel, timeout=20, metadata=headers(ns))
    await leases.create(CreateRequest(id="gc-trigger"))
    await leases.delete(DeleteRequest(id="gc-trigger", sync=True))


@pytest.fixture
async def channel(berthd: Berthd) -> AsyncIterator[Channel]:
    ch = berthd.channel()
    try:
        yield ch
    finally:
        ch.close()
        berthd.stop()
        assert mount_points_under(berthd.base) == []


async def leased(channel: Channel, ns: str, lease: str = "work") -> SnapshotsStub:
    """A Snapshots stub whose snapshots a lease holds (so no collection takes them mid-test)."""
    await LeasesStub(channel, timeout=10, metadata=headers(ns)).create(CreateRequest(id=lease))
    return SnapshotsStub(channel, timeout=30, metadata=headers(ns, lease))


def backend_dirs(d: Berthd, snapshotter: str = OVERLAY) -> list[str]:
    return sorted(p.name for p in (d.root / f"berth.snapshotter.v1.{snapshotter}" / "snapshots").iterdir())


# -- snapshots ------------------------------------------------------------------------------------------


async def test_prepare_commit_view_with_real_mounts_then_remove_and_collect(
    berthd: Berthd, channel: Channel
) -> None:
    sn = await leased(channel, "s1")
    prepared = await sn.prepare(PrepareSnapshotRequest(snapshotter=OVERLAY, key="k1", labels={"step": "1"}))
    assert [(m.type, m.options) for m in prepared.mounts] == [("bind", ["rw", "rbind"])]
    again = await sn.mounts(MountsRequest(snapshotter=OVERLAY, key="k1"))
    assert again.mounts == prepared.mounts
    async with mounted(mounts_of(prepared.mounts), dir=berthd.base) as root:
        (root / "hello.txt").write_text("layer one\n")
    assert (await sn.usage(UsageRequest(snapshotter=OVERLAY, key="k1"))).size > 0
    await sn.commit(CommitSnapshotRequest(snapshotter=OVERLAY, name="c1", key="k1", labels={"layer": "1"}))
    err = await grpc_error(sn.stat(StatSnapshotRequest(snapshotter=OVERLAY, key="k1")))
    assert err.status is Status.NOT_FOUND
    c1 = (await sn.stat(StatSnapshotRequest(snapshotter=OVERLAY, key="c1"))).info
    assert (c1.kind, c1.parent, c1.labels) == (Kind.COMMITTED, "", {"layer": "1"})

    k2 = await sn.prepare(PrepareSnapshotRequest(snapshotter=OVERLAY, key="k2", parent="c1"))
    assert k2.mounts[0].type == "overlay"
    assert any(o.startswith("upperdir=") for o in k2.mounts[0].options)
    async with mounted(mounts_of(k2.mounts), dir=berthd.base) as root:
        assert (root / "hello.txt").read_text() == "layer one\n"
        (root / "second.txt").write_text("layer two\n")
    await sn.commit(CommitSnapshotRequest(snapshotter=OVERLAY, name="c2", key="k2"))
    assert (await sn.usage(UsageRequest(snapshotter=OVERLAY, key="c2"))).size > 0

    view = await sn.view(ViewSnapshotRequest(snapshotter=OVERLAY, key="v1", parent="c2"))
    async with mounted(mounts_of(view.mounts), dir=berthd.base) as root:
        assert sorted(p.name for p in root.iterdir()) == ["hello.txt", "second.txt"]
        with pytest.raises(OSError) as ro:
            (root / "nope").write_text("x")
        assert ro.value.errno == errno.EROFS
    v1 = (await sn.stat(StatSnapshotRequest(snapshotter=OVERLAY, key="v1"))).info
    assert (v1.kind, v1.parent) == (Kind.VIEW, "c2")

    assert await names(sn) == ["c1", "c2", "v1"]
    assert await names(sn, OVERLAY, "kind==committed") == ["c1", "c2"]
    assert await names(sn, OVERLAY, "parent==c1", "name==v1") == ["c2", "v1"]
    upd = await sn.update(
        UpdateSnapshotRequest(
            snapshotter=OVERLAY,
            info=Info(name="c2", labels={"team": "a", "layer": "x"}),
            update_mask=pb.FieldMask(paths=["labels.team"]),
        )
    )
    assert upd.info.labels == {"team": "a"} and upd.info.kind == Kind.COMMITTED
    err = await grpc_error(
        sn.update(
            UpdateSnapshotRequest(
                snapshotter=OVERLAY, info=Info(name="c2"), update_mask=pb.FieldMask(paths=["parent"])
            )
        )
    )
    assert err.status is Status.INVALID_ARGUMENT and "parent" in (err.message or "")

    err = await grpc_error(sn.remove(RemoveSnapshotRequest(snapshotter=OVERLAY, key="c1")))
    assert err.status is Status.FAILED_PRECONDITION and "c2" in (err.message or "")
    assert len(backend_dirs(berthd)) == 3
    for key in ("v1", "c2", "c1"):
        await sn.remove(RemoveSnapshotRequest(snapshotter=OVERLAY, key=key))
    assert await names(sn) == []
    await collect_now(channel, "s1")
    assert backend_dirs(berthd) == []  # removed from the backend and cleaned up


async def test_requests_are_validated_and_scoped(channel: Channel) -> None:
    sn = await leased(channel, "v1")
    err = await grpc_error(sn.prepare(PrepareSnapshotRequest(snapshotter="", key="k")))
    assert err.status is Status.INVALID_ARGUMENT and (err.message or "").startswith("snapshotter")
    err = await grpc_error(sn.prepare(PrepareSnapshotRequest(snapshotter="zfs", key="k")))
    assert err.status is Status.NOT_FOUND and "zfs" in (err.message or "") and OVERLAY in (err.message or "")
    err = await grpc_error(sn.prepare(PrepareSnapshotRequest(snapshotter=OVERLAY, key="")))
    assert err.status is Status.INVALID_ARGUMENT and (err.message or "").startswith("key")
    err = await grpc_error(sn.prepare(PrepareSnapshotRequest(snapshotter=OVERLAY, key="k", parent="ghost")))
    assert err.status is Status.NOT_FOUND and "ghost" in (err.message or "")
    await sn.prepare(PrepareSnapshotRequest(snapshotter=OVERLAY, key="k"))
    err = await grpc_error(sn.prepare(PrepareSnapshotRequest(snapshotter=OVERLAY, key="k")))
    assert err.status is Status.ALREADY_EXISTS
    err = await grpc_error(sn.commit(CommitSnapshotRequest(snapshotter=OVERLAY, name="", key="k")))
    assert err.status is Status.INVALID_ARGUMENT and (err.message or "").startswith("name")
    err = await grpc_error(
        sn.commit(CommitSnapshotRequest(snapshotter=OVERLAY, name="c", key="k", parent="p"))
    )
    assert err.status is Status.UNIMPLEMENTED and "parent" in (err.message or "")
    err = await grpc_error(sn.update(UpdateSnapshotRequest(snapshotter=OVERLAY, info=Info())))
    assert err.status is Status.INVALID_ARGUMENT and (err.message or "").startswith("info.name")
    other = SnapshotsStub(channel, timeout=10, metadata=headers("elsewhere"))
    err = await grpc_error(other.stat(StatSnapshotRequest(snapshotter=OVERLAY, key="k")))
    assert err.status is Status.NOT_FOUND
    unleased = SnapshotsStub(channel, timeout=10, metadata=headers("v1", "no-such-lease"))
    err = await grpc_error(unleased.prepare(PrepareSnapshotRequest(snapshotter=OVERLAY, key="k9")))
    assert err.status is Status.NOT_FOUND and "no-such-lease" in (err.message or "")


async def test_native_snapshotter_is_served_too(berthd: Berthd, channel: Channel) -> None:
    sn = await leased(channel, "n1")
    prepared = await sn.prepare(PrepareSnapshotRequest(snapshotter="native", key="a"))
    async with mounted(mounts_of(prepared.mounts), dir=berthd.base) as root:
        (root / "native.txt").write_text("copied\n")
    await sn.commit(CommitSnapshotRequest(snapshotter="native", name="base", key="a"))
    view = await sn.view(ViewSnapshotRequest(snapshotter="native", key="look", parent="base"))
    async with mounted(mounts_of(view.mounts), dir=berthd.base) as root:
        assert (root / "native.txt").read_text() == "copied\n"
    assert await names(sn, "native") == ["base", "look"]
    assert await names(sn, OVERLAY) == []  # snapshotters do not share keys


# -- diff --------------------------------------------------------------------------------------------


async def _put(channel: Channel, ns: str, lease: str, data: bytes) -> None:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    cs = ContentStub(channel, timeout=30, metadata=headers(ns, lease))
    reqs = [
        WriteContentRequest(action=WriteAction.STAT, ref=f"layer-{digest}", total=len(data), expected=digest),
        WriteContentRequest(action=WriteAction.COMMIT, offset=0, data=data, total=len(data), expected=digest),
    ]
    resps = [r async for r in cs.write(reqs)]
    assert resps[-1].digest == digest


async def test_diff_apply_unpacks_layers_into_snapshots(berthd: Berthd, channel: Channel) -> None:
    sn = await leased(channel, "d1")
    diff = DiffStub(channel, timeout=60, metadata=headers("d1"))
    layers = busybox_layers(("gzip", "zstd", "none"))
    chains = chain_ids([layer.diff_id for layer in layers])
    parent = ""
    for i, (layer, chain) in enumerate(zip(layers, chains, strict=True)):
        await _put(channel, "d1", "work", layer.data)
        key = f"extract-{i} {chain}"
        prepared = await sn.prepare(PrepareSnapshotRequest(snapshotter=OVERLAY, key=key, parent=parent))
        desc = PbDescriptor(media_type=layer.media_type, digest=layer.digest, size=layer.size)
        applied = (await diff.apply(ApplyRequest(diff=desc, mounts=prepared.mounts, sync_fs=i == 0))).applied
        assert (applied.digest, applied.size) == (layer.diff_id, layer.uncompressed_size)
        assert applied.media_type == "application/vnd.oci.image.layer.v1.tar"
        await sn.commit(CommitSnapshotRequest(snapshotter=OVERLAY, name=chain, key=key))
        parent = chain

    view = await sn.view(ViewSnapshotRequest(snapshotter=OVERLAY, key="rootfs", parent=chains[-1]))
    async with mounted(mounts_of(view.mounts), dir=berthd.base) as root:
        for path in BUSYBOX_PRESENT:
            assert (root / path).exists() or (root / path).is_symlink(), path
        for path in BUSYBOX_ABSENT:
            assert not (root / path).exists(), path
        assert (root / "data/hello.txt").read_bytes() == HELLO_TEXT
        assert (root / "data/hello-link.txt").stat().st_ino == (root / "data/hello.txt").stat().st_ino
        assert (root / "bin/ls").readlink() == Path("/bin/busybox")
    assert mount_points_under(berthd.base) == []


async def test_diff_apply_validates_and_diff_is_unimplemented(channel: Channel) -> None:
    sn = await leased(channel, "d2")
    diff = DiffStub(channel, timeout=30, metadata=headers("d2"))
    layer = busybox_layers("gzip")[1]
    await _put(channel, "d2", "work", layer.data)
    prepared = await sn.prepare(PrepareSnapshotRequest(snapshotter=OVERLAY, key="target"))
    good = PbDescriptor(media_type=layer.media_type, digest=layer.digest, size=layer.size)
    err = await grpc_error(diff.apply(ApplyRequest(diff=good)))
    assert err.status is Status.INVALID_ARGUMENT and (err.message or "").startswith("mounts")
    bad_size = PbDescriptor(media_type=layer.media_type, digest=layer.digest, size=layer.size + 1)
    err = await grpc_error(diff.apply(ApplyRequest(diff=bad_size, mounts=prepared.mounts)))
    assert err.status is Status.INVALID_ARGUMENT and "diff.size" in (err.message or "")
    err = await grpc_error(
        diff.apply(ApplyRequest(diff=PbDescriptor(digest=layer.digest), mounts=prepared.mounts))
    )
    assert err.status is Status.INVALID_ARGUMENT and "diff.media_type" in (err.message or "")
    missing = PbDescriptor(media_type=layer.media_type, digest="sha256:" + "0" * 64, size=3)
    err = await grpc_error(diff.apply(ApplyRequest(diff=missing, mounts=prepared.mounts)))
    assert err.status is Status.NOT_FOUND
    other_ns = DiffStub(channel, timeout=30, metadata=headers("d3"))
    err = await grpc_error(other_ns.apply(ApplyRequest(diff=good, mounts=prepared.mounts)))
    assert err.status is Status.NOT_FOUND  # the blob is d2's
    err = await grpc_error(diff.diff(DiffRequest(left=prepared.mounts, right=prepared.mounts)))
    assert err.status is Status.UNIMPLEMENTED and "berth" in (err.message or "")


# -- ctr --------------------------------------------------------------------------------------------


async def test_ctr_snapshots(berthd: Berthd, channel: Channel) -> None:
    ok(ctr(berthd, "snapshots", "prepare", "base-active"))  # ctr labels it gc.root: no lease needed
    mount_cmd = ok(ctr(berthd, "snapshots", "mounts", "/mnt/x", "base-active"))
    assert mount_cmd.startswith("mount -t bind ") and "/mnt/x" in mount_cmd
    ok(ctr(berthd, "snapshots", "commit", "base", "base-active"))
    ok(ctr(berthd, "snapshots", "prepare", "work", "base"))
    assert "-t overlay" in ok(ctr(berthd, "snapshots", "mounts", "/mnt/x", "work"))
    ok(ctr(berthd, "snapshots", "view", "peek", "base"))
    rows = [line.split() for line in ok(ctr(berthd, "snapshots", "ls")).splitlines()]
    assert rows[0] == ["KEY", "PARENT", "KIND"]
    assert sorted(rows[1:]) == [["base", "Committed"], ["peek", "base", "View"], ["work", "base", "Active"]]
    info = json.loads(ok(ctr(berthd, "snapshots", "info", "work")))
    assert info["Kind"] == "Active" and info["Parent"] == "base"
    assert "containerd.io/gc.root" in info["Labels"]
    ok(ctr(berthd, "snapshots", "label", "base", "team=a"))
    labels = json.loads(ok(ctr(berthd, "snapshots", "info", "base")))["Labels"]
    assert labels["team"] == "a" and "containerd.io/gc.root" in labels  # ctr's commit labels it too
    assert "base" in ok(ctr(berthd, "snapshots", "usage"))
    tree = ok(ctr(berthd, "snapshots", "tree"))
    assert "base" in tree and "work" in tree
    refused = ctr(berthd, "snapshots", "rm", "base")
    assert refused.returncode != 0 and "children" in refused.stderr
    ok(ctr(berthd, "snapshots", "rm", "peek", "work"))
    ok(ctr(berthd, "snapshots", "rm", "base"))
    assert ok(ctr(berthd, "snapshots", "ls")).splitlines()[1:] == []
    ok(ctr(berthd, "snapshots", "--snapshotter", "native", "prepare", "n1"))
    assert "n1" in ok(ctr(berthd, "snapshots", "--snapshotter", "native", "ls"))
    ok(ctr(berthd, "snapshots", "--snapshotter", "native", "rm", "n1"))
    missing = ctr(berthd, "snapshots", "--snapshotter", "btrfs", "ls")
    assert missing.returncode != 0 and "btrfs" in missing.stderr
