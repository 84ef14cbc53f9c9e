"""The Containers service of a real berthd: records, field masks, events, GC roots, and ``ctr containers``."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import betterproto.lib.google.protobuf as pb
from grpclib.client import Channel
from grpclib.const import Status

from daemon.mount import mount_points_under
from protos.containerd.events import ContainerCreate, ContainerDelete, ContainerUpdate
from protos.containerd.services.containers.v1 import (
    Container,
    ContainerRuntime,
    ContainersStub,
    CreateContainerRequest,
    DeleteContainerRequest,
    GetContainerRequest,
    ListContainersRequest,
    UpdateContainerRequest,
)
from protos.containerd.services.namespaces.v1 import DeleteNamespaceRequest, NamespacesStub
from protos.containerd.services.snapshots.v1 import ListSnapshotsRequest, SnapshotsStub
from tests.integration.conftest import Berthd, Subscribed, ctr, grpc_error, headers, ok
from tests.support.oci import busybox_image, oci_archive

SPEC_URL = "types.containerd.io/opencontainers/runtime-spec/1/Spec"
RUNC = "io.containerd.runc.v2"


def stub(channel: Channel, ns: str) -> ContainersStub:
    return ContainersStub(channel, timeout=30, metadata=headers(ns))


def container(id_: str, **kw: Any) -> Container:
    fields: dict[str, Any] = {
        "id": id_,
        "image": "docker.io/library/busybox:latest",
        "runtime": ContainerRuntime(name=RUNC),
        "spec": pb.Any(type_url=SPEC_URL, value=b'{"ociVersion":"1.1.0"}'),
    }
    fields.update(kw)
    return Container(**fields)


async def test_containers_crud_stream_masks_and_events(channel: Channel) -> None:
    events = Subscribed(channel, "^/containers/")
    try:
        # the subscription is live once a probe's event (in another namespace) arrives
        probes = stub(channel, "probe")
        for i in range(100):
            await probes.create(CreateContainerRequest(container=container(f"p{i}")))
            try:
                await events.wait_for(1, timeout=0.2)
                break
            except TimeoutError:
                continue
        cs = stub(channel, "crud")
        opts = pb.Any(type_url="containerd.runc.v1.Options", value=b"\x08\x01")
        ext = {"e": pb.Any(type_url="x/ext", value=b"\x00\x01")}
        c = container(
            "c1", labels={"a": "1"}, extensions=ext, runtime=ContainerRuntime(name=RUNC, options=opts)
        )
        created = (await cs.create(CreateContainerRequest(container=c))).container
        assert created.id == "c1" and created.runtime.options == opts and created.extensions == ext
        assert created.spec.value == b'{"ociVersion":"1.1.0"}' and created.created_at == created.updated_at
        await cs.create(CreateContainerRequest(container=container("c2", image="other:1")))
        got = (await cs.get(GetContainerRequest(id="c1"))).container
        assert got == created

        listed = (await cs.list(ListContainersRequest(filters=["image==other:1"]))).containers
        assert [x.id for x in listed] == ["c2"]
        streamed = [m.container.id async for m in cs.list_stream(ListContainersRequest())]
        assert streamed == ["c1", "c2"]
        assert [
            m.container.id async for m in cs.list_stream(ListContainersRequest(filters=["labels.a==1"]))
        ] == ["c1"]

        change = container("c1", labels={"a": "", "b": "2"}, image="new:2")
        mask = pb.FieldMask(paths=["labels.a", "labels.b", "image"])
        up = (await cs.update(UpdateContainerRequest(container=change, update_mask=mask))).container
        assert up.labels == {"b": "2"} and up.image == "new:2" and up.extensions == ext
        assert up.runtime.options == opts  # untouched by the update

        await cs.delete(DeleteContainerRequest(id="c2"))
        assert [x.id for x in (await cs.list(ListContainersRequest())).containers] == ["c1"]

        got_events = await events.wait_for(4, "crud")
        assert [(e.topic, e.namespace) for e in got_events] == [
            ("/containers/create", "crud"),
            ("/containers/create", "crud"),
            ("/containers/update", "crud"),
            ("/containers/delete", "crud"),
        ]
        first = ContainerCreate().parse(got_events[0].event.value)
        assert (first.id, first.image, first.runtime.name) == ("c1", c.image, RUNC)
        update = ContainerUpdate().parse(got_events[2].event.value)
        assert (update.id, update.image, update.labels) == ("c1", "new:2", {"b": "2"})
        assert ContainerDelete().parse(got_events[3].event.value).id == "c2"
    finally:
        await events.close()


async def test_containers_requests_are_validated_and_scoped(channel: Channel) -> None:
    cs = stub(channel, "val")
    err = await grpc_error(
        cs.create(CreateContainerRequest(container=container("c1", runtime=ContainerRuntime())))
    )
    assert err.status == Status.INVALID_ARGUMENT and "must specify a runtime name" in str(err.message)
    err = await grpc_error(cs.create(CreateContainerRequest(container=container("bad id"))))
    assert err.status == Status.INVALID_ARGUMENT and "container.id" in str(err.message)
    err = await grpc_error(cs.create(CreateContainerRequest(container=container("c1", spec=None))))
    assert err.status == Status.INVALID_ARGUMENT and "spec must be set" in str(err.message)
    await cs.create(
        CreateContainerRequest(container=container("c1", snapshotter="overlayfs", snapshot_key="k"))
    )
    err = await grpc_error(cs.create(CreateContainerRequest(container=container("c1"))))
    assert err.status == Status.ALREADY_EXISTS
    # a full update must not change the immutable runtime or snapshotter
    err = await grpc_error(cs.update(UpdateContainerRequest(container=container("c1", snapshotter="native"))))
    assert err.status == Status.INVALID_ARGUMENT and "snapshotter field is immutable" in str(err.message)
    mask = pb.FieldMask(paths=["runtime"])
    err = await grpc_error(cs.update(UpdateContainerRequest(container=container("c1"), update_mask=mask)))
    assert err.status == Status.INVALID_ARGUMENT and 'cannot update "runtime"' in str(err.message)
    err = await grpc_error(stub(channel, "elsewhere").get(GetContainerRequest(id="c1")))
    assert err.status == Status.NOT_FOUND
    err = await grpc_error(cs.delete(DeleteContainerRequest(id="nope")))
    assert err.status == Status.NOT_FOUND
    err = await grpc_error(cs.get(GetContainerRequest(id="")))
    assert err.status == Status.INVALID_ARGUMENT
    namespaces = NamespacesStub(channel, timeout=10)
    err = await grpc_error(namespaces.delete(DeleteNamespaceRequest(name="val")))
    assert err.status == Status.FAILED_PRECONDITION and "containers" in str(err.message)
    await cs.delete(DeleteContainerRequest(id="c1"))
    await namespaces.delete(DeleteNamespaceRequest(name="val"))


# -- ctr: a container from an imported image, which keeps its snapshot through GC -------------


async def _snapshots(channel: Channel, ns: str) -> list[str]:
    stub = SnapshotsStub(channel, timeout=10, metadata=headers(ns))
    return sorted(
        [i.name async for r in stub.list(ListSnapshotsRequest(snapshotter="overlayfs")) for i in r.info]
    )


async def test_ctr_containers_create_info_label_rm(berthd: Berthd, channel: Channel, tmp_path: Path) -> None:
    archive = oci_archive(busybox_image(), tmp_path / "bb.tar", ref_name="1.0")
    image = "docker.io/berth/bb:1.0"
    ok(ctr(berthd, "images", "import", "--base-name", "docker.io/berth/bb", str(archive), ns="ctr"))
    chain = await _snapshots(channel, "ctr")
    assert chain

    ok(
        ctr(
            berthd,
            "containers",
            "create",
            "--snapshotter",
            "overlayfs",
            "--label",
            "a=1",
            image,
            "box",
            ns="ctr",
        )
    )
    rows = [line.split() for line in ok(ctr(berthd, "containers", "ls", ns="ctr")).splitlines()]
    assert rows[1][:2] == ["box", image]
    info = json.loads(ok(ctr(berthd, "containers", "info", "box", ns="ctr")))
    assert info["ID"] == "box" and info["Image"] == image and info["Labels"]["a"] == "1"
    assert info["Snapshotter"] == "overlayfs" and info["SnapshotKey"] == "box"
    assert info["Runtime"]["Name"] == RUNC and info["Spec"]["ociVersion"]
    assert "box" in await _snapshots(channel, "ctr")

    ok(ctr(berthd, "containers", "label", "box", "b=2", ns="ctr"))
    labels = json.loads(ok(ctr(berthd, "containers", "info", "box", ns="ctr")))["Labels"]
    assert labels["a"] == "1" and labels["b"] == "2"

    # the image goes, but the container keeps its snapshot and the chain below it
    ok(ctr(berthd, "images", "rm", "--sync", image, ns="ctr"))
    assert await _snapshots(channel, "ctr") == sorted([*chain, "box"])

    ok(ctr(berthd, "containers", "rm", "box", ns="ctr"))  # removes its snapshot too
    assert ok(ctr(berthd, "containers", "ls", "-q", ns="ctr")).split() == []
    # nothing keeps the chain any more: the collection the delete requested takes it
    async with asyncio.timeout(20):
        while await _snapshots(channel, "ctr"):
            await asyncio.sleep(0.1)
    ok(ctr(berthd, "namespaces", "rm", "ctr"))
    berthd.stop()
    assert mount_points_under(berthd.base) == []
