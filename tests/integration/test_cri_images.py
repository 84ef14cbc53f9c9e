"""CRI ``runtime.v1.ImageService`` end to end: a real berthd, its socket, a real registry with basic auth.

kubelet's view is checked through the generated grpclib stubs (what it pulls,
lists, inspects and removes), containerd's record layout in ``k8s.io``
through the native Images API and ``berth -n k8s.io images ls``, and disk
usage through ImageFsInfo. The registry is Debian's docker-registry with
htpasswd auth (:mod:`tests.support.registry`), started once for the module.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import betterproto
import pytest
from grpclib.client import Channel
from grpclib.const import Status

from protos.containerd.services.images.v1 import ImagesStub
from protos.containerd.services.images.v1 import ListImagesRequest as NativeListImages
from protos.runtime import v1 as cri
from tests.integration.conftest import Berthd, grpc_error, headers
from tests.support import oci
from tests.support.push import push_image_sync
from tests.support.registry import PASSWORD, USER, Registry

K8S = "k8s.io"
MANAGED = "io.cri-containerd.image"
SNAPSHOTTER_DIR = "berth.snapshotter.v1.overlayfs"


def config(tmp: Path) -> str:
    """Fast-failing pulls, linux/amd64 from indexes, CNI dirs in ``tmp``."""
    return f"""version = 1
[plugins."berth.images.v1.default"]
platform = "linux/amd64"
retry_attempts = 2
retry_initial_delay = 0.01
retry_max_delay = 0.05
retry_max_elapsed = 5.0
connect_timeout = 2.0
read_timeout = 10.0

[plugins."berth.cri.v1.cri"]
conf_dir = "{tmp}/net.d"
bin_dirs = ["/usr/lib/cni"]
"""


@dataclass(frozen=True)
class Hub:
    """The module's registry and what is pushed to it."""

    registry: Registry
    plain: oci.Image  # team/busybox:1, one manifest, User "1000"
    index: oci.Image  # team/busybox:idx, an OCI index, User "nobody"

    def ref(self, tag: str) -> str:
        return f"{self.registry.address}/team/busybox:{tag}"

    @property
    def repo(self) -> str:
        return f"{self.registry.address}/team/busybox"


@pytest.fixture(scope="module")
def hub() -> Iterator[Hub]:
    reg = Registry(users={USER: PASSWORD})
    try:
        reg.start()
        plain = oci.busybox_image("gzip", user="1000")
        index = oci.busybox_image("gzip", index=True, user="nobody")
        push_image_sync(reg.url, "team/busybox", "1", plain, USER, PASSWORD)
        push_image_sync(reg.url, "team/busybox", "idx", index, USER, PASSWORD)
        yield Hub(reg, plain, index)
    finally:
        reg.stop()


@dataclass
class Cri:
    daemon: Berthd
    channel: Channel
    images: cri.ImageServiceStub
    native: ImagesStub

    async def records(self) -> dict[str, dict[str, str]]:
        """The ``k8s.io`` image records: name -> labels (plus the target digest under "@target")."""
        resp = await self.native.list(NativeListImages(), metadata=headers(K8S))
        return {i.name: {**i.labels, "@target": i.target.digest} for i in resp.images}


@pytest.fixture
async def crid(make_berthd: Callable[..., Berthd], short_tmp: Path) -> AsyncIterator[Cri]:
    d = make_berthd(config=config(short_tmp))
    d.start()
    await d.wait_ready()
    ch = d.channel()
    try:
        yield Cri(d, ch, cri.ImageServiceStub(ch, timeout=60), ImagesStub(ch, timeout=10))
    finally:
        ch.close()


def basic_auth(**extra: str) -> cri.AuthConfig:
    return cri.AuthConfig(username=USER, password=PASSWORD, **extra)


async def test_pull_list_status_remove(crid: Cri, hub: Hub) -> None:
    m = hub.plain.manifest_for("linux/amd64")
    image_id = m.config.digest
    before = (await crid.images.image_fs_info(cri.ImageFsInfoRequest())).image_filesystems[0]
    assert before.used_bytes.value == 0

    resp = await crid.images.pull_image(
        cri.PullImageRequest(image=cri.ImageSpec(image=hub.ref("1")), auth=basic_auth())
    )
    assert resp.image_ref == image_id

    # containerd's three records, all on the pulled target, all managed
    records = await crid.records()
    repo_digest = f"{hub.repo}@{hub.plain.digest}"
    assert set(records) == {hub.ref("1"), repo_digest, image_id}
    assert {r["@target"] for r in records.values()} == {hub.plain.digest}
    assert all(r[MANAGED] == "managed" for r in records.values())
    shown = crid.daemon.berth("-n", K8S, "images", "ls")
    assert shown.returncode == 0, shown.stderr
    for name in records:
        assert name in shown.stdout

    listed = (await crid.images.list_images(cri.ListImagesRequest())).images
    assert len(listed) == 1
    img = listed[0]
    assert img.id == image_id
    assert img.repo_tags == [hub.ref("1")]
    assert img.repo_digests == [repo_digest]
    assert img.size == m.manifest.size + m.config.size + sum(layer.size for layer in m.layers)
    assert img.uid.value == 1000 and betterproto.serialized_on_wire(img.uid)
    assert img.username == ""
    assert img.spec.image == image_id
    assert not img.pinned

    # ImageStatus by tag, by id, by short id (with and without sha256:), by repo digest
    short = image_id.removeprefix("sha256:")[:12]
    for name in (hub.ref("1"), image_id, short, "sha256:" + short, repo_digest):
        status = await crid.images.image_status(cri.ImageStatusRequest(image=cri.ImageSpec(image=name)))
        assert status.image.id == image_id, name
        assert status.info == {}
    verbose = await crid.images.image_status(
        cri.ImageStatusRequest(image=cri.ImageSpec(image=hub.ref("1")), verbose=True)
    )
    info = json.loads(verbose.info["info"])
    assert info["chainID"] == m.chain_ids[-1]
    assert info["imageSpec"]["rootfs"]["diff_ids"] == m.diff_ids
    assert info["imageSpec"]["config"]["User"] == "1000"

    # the filter names one image; an unknown one matches nothing
    one = await crid.images.list_images(
        cri.ListImagesRequest(filter=cri.ImageFilter(image=cri.ImageSpec(image=hub.ref("1"))))
    )
    assert [i.id for i in one.images] == [image_id]
    none = await crid.images.list_images(
        cri.ListImagesRequest(filter=cri.ImageFilter(image=cri.ImageSpec(image="nothing:here")))
    )
    assert none.images == []
    streamed = [r async for r in crid.images.stream_images(cri.StreamImagesRequest())]
    assert [i.id for r in streamed for i in r.images] == [image_id]

    fs = await crid.images.image_fs_info(cri.ImageFsInfoRequest())
    usage = fs.image_filesystems[0]
    assert usage.used_bytes.value > 0 and usage.inodes_used.value > 0
    assert usage.fs_id.mountpoint == str(crid.daemon.root / SNAPSHOTTER_DIR)
    assert abs(usage.timestamp - time.time_ns()) < 60 * 10**9
    assert fs.container_filesystems[0].fs_id.mountpoint == usage.fs_id.mountpoint

    # removal by tag takes every record of the image; unknown images are fine
    await crid.images.remove_image(cri.RemoveImageRequest(image=cri.ImageSpec(image=hub.ref("1"))))
    assert await crid.records() == {}
    assert (await crid.images.list_images(cri.ListImagesRequest())).images == []
    gone = await crid.images.image_status(cri.ImageStatusRequest(image=cri.ImageSpec(image=hub.ref("1"))))
    assert not betterproto.serialized_on_wire(gone.image)
    await crid.images.remove_image(cri.RemoveImageRequest(image=cri.ImageSpec(image=hub.ref("1"))))
    await crid.images.remove_image(cri.RemoveImageRequest(image=cri.ImageSpec(image=image_id)))
    after = (await crid.images.image_fs_info(cri.ImageFsInfoRequest())).image_filesystems[0]
    assert after.used_bytes.value == 0  # the last removal collected synchronously


async def test_pull_index_with_base64_auth_and_by_digest(crid: Cri, hub: Hub) -> None:
    m = hub.index.manifest_for("linux/amd64")
    encoded = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    auth = cri.AuthConfig(auth=encoded, server_address=f"http://{hub.registry.address}")
    resp = await crid.images.pull_image(
        cri.PullImageRequest(image=cri.ImageSpec(image=hub.ref("idx")), auth=auth)
    )
    assert resp.image_ref == m.config.digest
    status = await crid.images.image_status(cri.ImageStatusRequest(image=cri.ImageSpec(image=hub.ref("idx"))))
    # the repo digest is the index's, the size counts the index and linux/amd64's blobs
    assert status.image.repo_digests == [f"{hub.repo}@{hub.index.digest}"]
    assert status.image.username == "nobody"
    assert not betterproto.serialized_on_wire(status.image.uid)
    blobs = m.manifest.size + m.config.size + sum(layer.size for layer in m.layers)
    assert status.image.size == hub.index.top.size + blobs

    # a pull by digest of the same image: no tag record, one image
    by_digest = f"{hub.repo}@{hub.index.digest}"
    again = await crid.images.pull_image(
        cri.PullImageRequest(image=cri.ImageSpec(image=by_digest), auth=basic_auth())
    )
    assert again.image_ref == m.config.digest
    listed = (await crid.images.list_images(cri.ListImagesRequest())).images
    assert [(i.id, i.repo_tags, i.repo_digests) for i in listed] == [
        (m.config.digest, [hub.ref("idx")], [by_digest])
    ]


async def test_pull_auth_failures(crid: Cri, hub: Hub) -> None:
    wrong = cri.AuthConfig(username=USER, password="not-the-password")
    err = await grpc_error(
        crid.images.pull_image(cri.PullImageRequest(image=cri.ImageSpec(image=hub.ref("1")), auth=wrong))
    )
    # containerd answers a registry's 401 with UNKNOWN and this prefix
    assert err.status is Status.UNKNOWN, err
    assert f'failed to pull and unpack image "{hub.ref("1")}"' in (err.message or "")
    # no credentials at all, and credentials for another registry (ignored), fail the same way
    for auth in (None, basic_auth(server_address="other.example.com")):
        req = cri.PullImageRequest(image=cri.ImageSpec(image=hub.ref("1")))
        if auth is not None:
            req.auth = auth
        err = await grpc_error(crid.images.pull_image(req))
        assert err.status is Status.UNKNOWN, err
    assert await crid.records() == {}
    # a tag the registry does not have keeps NotFound
    err = await grpc_error(
        crid.images.pull_image(
            cri.PullImageRequest(image=cri.ImageSpec(image=hub.ref("no-such-tag")), auth=basic_auth())
        )
    )
    assert err.status is Status.NOT_FOUND, err


async def test_bad_requests(crid: Cri) -> None:
    err = await grpc_error(crid.images.pull_image(cri.PullImageRequest()))
    assert err.status is Status.INVALID_ARGUMENT and "image.image" in (err.message or ""), err
    err = await grpc_error(
        crid.images.pull_image(cri.PullImageRequest(image=cri.ImageSpec(image="Bad/UPPER:case")))
    )
    assert err.status is Status.INVALID_ARGUMENT and "image.image" in (err.message or ""), err
    err = await grpc_error(
        crid.images.pull_image(
            cri.PullImageRequest(image=cri.ImageSpec(image="busybox"), auth=cri.AuthConfig(auth="%%%"))
        )
    )
    assert err.status is Status.INVALID_ARGUMENT and "auth.auth" in (err.message or ""), err
    for call in (
        crid.images.image_status(cri.ImageStatusRequest()),
        crid.images.remove_image(cri.RemoveImageRequest()),
    ):
        err = await grpc_error(call)
        assert err.status is Status.INVALID_ARGUMENT and "image.image" in (err.message or ""), err
    # unknown images: an empty status, a successful removal
    status = await crid.images.image_status(cri.ImageStatusRequest(image=cri.ImageSpec(image="busybox")))
    assert not betterproto.serialized_on_wire(status.image) and status.info == {}
    await crid.images.remove_image(cri.RemoveImageRequest(image=cri.ImageSpec(image="sha256:" + "a" * 64)))
