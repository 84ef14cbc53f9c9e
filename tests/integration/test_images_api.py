"""The Images service of a real berthd: records, events, GC of what an image kept, and ``ctr images``."""

from __future__ import annotations

from pathlib import Path

import betterproto.lib.google.protobuf as pb
from grpclib.client import Channel
from grpclib.const import Status

from daemon.mount import mount_points_under
from protos.containerd.services.content.v1 import ContentStub, ListContentRequest
from protos.containerd.services.images.v1 import (
    CreateImageRequest,
    DeleteImageRequest,
    GetImageRequest,
    Image,
    ImageCreate,
    ImageDelete,
    ImagesStub,
    ImageUpdate,
    ListImagesRequest,
    UpdateImageRequest,
)
from protos.containerd.services.leases.v1 import CreateRequest as LeaseCreateRequest
from protos.containerd.services.leases.v1 import DeleteRequest as LeaseDeleteRequest
from protos.containerd.services.leases.v1 import LeasesStub
from protos.containerd.services.namespaces.v1 import DeleteNamespaceRequest, NamespacesStub
from protos.containerd.services.snapshots.v1 import ListSnapshotsRequest, SnapshotsStub
from protos.containerd.types import Descriptor
from tests.integration.conftest import Berthd, Subscribed, ctr, grpc_error, headers, ok
from tests.support.oci import busybox_image, oci_archive

MANIFEST = "application/vnd.oci.image.manifest.v1+json"
INDEX = "application/vnd.oci.image.index.v1+json"
D1 = "sha256:" + "1" * 64
D2 = "sha256:" + "2" * 64
D3 = "sha256:" + "3" * 64


def images(channel: Channel, ns: str) -> ImagesStub:
    return ImagesStub(channel, timeout=30, metadata=headers(ns))


def image(name: str, digest: str = D1, **labels: str) -> Image:
    return Image(name=name, labels=labels, target=Descriptor(media_type=MANIFEST, digest=digest, size=123))


async def test_images_crud_filters_and_events(channel: Channel) -> None:
    ims = images(channel, "i1")
    events = Subscribed(channel, "^/images/")
    try:
        # the subscription is live once a probe's event arrives
        for i in range(100):
            await ims.create(CreateImageRequest(image=image(f"probe/p:{i}", D3)))
            try:
                await events.wait_for(1, timeout=0.2)
                break
            except TimeoutError:
                continue
        start = len(events.got)
        created = (await ims.create(CreateImageRequest(image=image("example.com/app:1", team="a")))).image
        assert created.name == "example.com/app:1" and created.labels == {"team": "a"}
        assert created.target.digest == D1 and created.created_at.year >= 2024
        await ims.create(CreateImageRequest(image=image("example.com/app:2", D2, team="b")))
        err = await grpc_error(ims.create(CreateImageRequest(image=image("example.com/app:1"))))
        assert err.status is Status.ALREADY_EXISTS and "example.com/app:1" in (err.message or "")

        got = (await ims.get(GetImageRequest(name="example.com/app:2"))).image
        assert (got.target.digest, got.target.size, got.labels) == (D2, 123, {"team": "b"})
        listed = (await ims.list(ListImagesRequest(filters=['name~="^example.com/"']))).images
        assert [i.name for i in listed] == ["example.com/app:1", "example.com/app:2"]
        by_label = (
            await ims.list(ListImagesRequest(filters=["labels.team==b", f"target.digest=={D1}"]))
        ).images
        assert [i.name for i in by_label] == ["example.com/app:1", "example.com/app:2"]

        labelled = await ims.update(
            UpdateImageRequest(
                image=Image(name="example.com/app:1", labels={"env": "prod"}),
                update_mask=pb.FieldMask(paths=["labels.env"]),
            )
        )
        assert labelled.image.labels == {"team": "a", "env": "prod"} and labelled.image.target.digest == D1
        retargeted = await ims.update(
            UpdateImageRequest(
                image=image("example.com/app:1", D2), update_mask=pb.FieldMask(paths=["target"])
            )
        )
        assert retargeted.image.target.digest == D2 and retargeted.image.labels == {
            "team": "a",
            "env": "prod",
        }
        err = await grpc_error(
            ims.update(
                UpdateImageRequest(image=image("example.com/app:1"), update_mask=pb.FieldMask(paths=["name"]))
            )
        )
        assert err.status is Status.INVALID_ARGUMENT and "name" in (err.message or "")

        err = await grpc_error(
            ims.delete(DeleteImageRequest(name="example.com/app:1", target=Descriptor(digest=D1)))
        )
        assert err.status is Status.NOT_FOUND  # it points at D2 now
        await ims.delete(DeleteImageRequest(name="example.com/app:1", target=Descriptor(digest=D2)))
        await ims.delete(DeleteImageRequest(name="example.com/app:2"))
        err = await grpc_error(ims.get(GetImageRequest(name="example.com/app:2")))
        assert err.status is Status.NOT_FOUND

        envs = (await events.wait_for(start + 6))[start:]
    finally:
        await events.close()
    assert [e.topic for e in envs] == [
        "/images/create",
        "/images/create",
        "/images/update",
        "/images/update",
        "/images/delete",
        "/images/delete",
    ]
    assert all(e.namespace == "i1" for e in envs)
    assert envs[0].event.type_url == "containerd.services.images.v1.ImageCreate"
    assert ImageCreate().parse(envs[0].event.value).labels == {"team": "a"}
    assert ImageUpdate().parse(envs[2].event.value).labels == {"team": "a", "env": "prod"}
    assert ImageDelete().parse(envs[5].event.value).name == "example.com/app:2"


async def test_images_requests_are_validated_and_scoped(channel: Channel) -> None:
    ims = images(channel, "i2")
    for call, field in [
        (ims.get(GetImageRequest(name="")), "name"),
        (ims.create(CreateImageRequest(image=Image(target=Descriptor(digest=D1, size=1)))), "image.name"),
        (ims.create(CreateImageRequest(image=Image(name="a", target=Descriptor(digest="x")))), "image"),
        (ims.update(UpdateImageRequest(image=Image(name=""))), "image.name"),
        (ims.update(UpdateImageRequest(image=Image(name="a"))), "image.target.digest"),
        (ims.delete(DeleteImageRequest(name="")), "name"),
        (ims.delete(DeleteImageRequest(name="a", target=Descriptor())), "target.digest"),
    ]:
        err = await grpc_error(call)
        assert err.status is Status.INVALID_ARGUMENT, (field, err)
        assert (err.message or "").startswith(field), (field, err.message)
    err = await grpc_error(ims.list(ListImagesRequest(filters=["name=="])))
    assert err.status is Status.INVALID_ARGUMENT
    await ims.create(CreateImageRequest(image=image("only/in:i2")))
    assert (await images(channel, "elsewhere").list(ListImagesRequest())).images == []
    err = await grpc_error(images(channel, "elsewhere").get(GetImageRequest(name="only/in:i2")))
    assert err.status is Status.NOT_FOUND


async def test_namespace_holding_images_cannot_be_deleted(channel: Channel) -> None:
    ims = images(channel, "held")
    await ims.create(CreateImageRequest(image=image("keep/me:1")))
    namespaces = NamespacesStub(channel, timeout=10)
    err = await grpc_error(namespaces.delete(DeleteNamespaceRequest(name="held")))
    assert err.status is Status.FAILED_PRECONDITION and "images" in (err.message or "")
    await ims.delete(DeleteImageRequest(name="keep/me:1", sync=True))
    await namespaces.delete(DeleteNamespaceRequest(name="held"))


# -- the whole image: ctr import (content, leases, images, diff, snapshots), then GC -------------


def ctr_import(d: Berthd, *args: str, ns: str) -> str:
    """``ctr images import`` against berth (containerd's client-side import)."""
    return ok(ctr(d, "images", "import", *args, ns=ns))


async def _content(channel: Channel, ns: str) -> list[str]:
    stub = ContentStub(channel, timeout=10, metadata=headers(ns))
    return sorted([i.digest async for r in stub.list(ListContentRequest()) for i in r.info])


async def _snapshots(channel: Channel, ns: str) -> list[str]:
    stub = SnapshotsStub(channel, timeout=10, metadata=headers(ns))
    return sorted(
        [i.name async for r in stub.list(ListSnapshotsRequest(snapshotter="overlayfs")) for i in r.info]
    )


async def test_ctr_import_unpacks_and_sync_delete_collects_everything(
    berthd: Berthd, channel: Channel, tmp_path: Path
) -> None:
    built = busybox_image()
    manifest = built.manifest_for("linux/amd64")
    archive = oci_archive(built, tmp_path / "bb.tar", ref_name="1.0")
    name = "docker.io/berth/bb:1.0"
    out = ctr_import(berthd, "--base-name", "docker.io/berth/bb", str(archive), ns="imp")
    assert f"unpacking {name}" in out and "done" in out

    rows = [line.split() for line in ok(ctr(berthd, "images", "ls", ns="imp")).splitlines()]
    assert rows[1][:3] == [name, MANIFEST, manifest.digest] and "linux/amd64" in rows[1]
    check = ok(ctr(berthd, "images", "check", ns="imp")).splitlines()[1].split()
    assert check[0] == name and "complete" in check and check[-1] == "true"  # all content, unpacked
    stored = await _content(channel, "imp")
    assert set(manifest.blobs()) <= set(stored)
    assert await _snapshots(channel, "imp") == sorted(manifest.chain_ids)
    assert ok(ctr(berthd, "leases", "ls", ns="imp")).splitlines()[1:] == []  # ctr's lease is gone

    blobs = berthd.root / "berth.content.v1.local" / "blobs"
    assert len([p for p in blobs.rglob("*") if p.is_file()]) >= len(manifest.blobs())

    # the image keeps manifest, config, layers and the snapshot chain through gc.ref labels
    rm = ok(ctr(berthd, "images", "rm", "--sync", name, ns="imp"))
    assert name in rm
    assert await _content(channel, "imp") == []
    assert await _snapshots(channel, "imp") == []
    overlay = berthd.root / "berth.snapshotter.v1.overlayfs" / "snapshots"
    assert list(overlay.iterdir()) == []
    assert [p for p in blobs.rglob("*") if p.is_file()] == []
    ok(ctr(berthd, "namespaces", "rm", "imp"))
    berthd.stop()
    assert mount_points_under(berthd.base) == []


async def test_sync_delete_keeps_what_another_image_holds(berthd: Berthd, channel: Channel) -> None:
    built = busybox_image()
    manifest = built.manifest_for("linux/amd64")
    archive = oci_archive(built, berthd.base / "bb.tar", ref_name="1.0")
    ctr_import(berthd, "--no-unpack", "--base-name", "docker.io/berth/bb", str(archive), ns="two")
    ims = images(channel, "two")
    target = (await ims.get(GetImageRequest(name="docker.io/berth/bb:1.0"))).image.target
    await ims.create(CreateImageRequest(image=Image(name="alias/bb:same", target=target)))
    await ims.delete(DeleteImageRequest(name="docker.io/berth/bb:1.0", sync=True))
    assert set(manifest.blobs()) <= set(await _content(channel, "two"))  # the alias keeps them
    await ims.delete(DeleteImageRequest(name="alias/bb:same", sync=True))
    assert await _content(channel, "two") == []


async def test_containerd_random_lease_ids_are_accepted(channel: Channel) -> None:
    leases = LeasesStub(channel, timeout=10, metadata=headers("rl"))
    await leases.create(LeaseCreateRequest(id="486088630-8__0"))
    await leases.delete(LeaseDeleteRequest(id="486088630-8__0"))
