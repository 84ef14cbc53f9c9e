"""Import and export of image archives with the images service, in process.

Archives come from the test-image builder (OCI layout archives, ``docker
save`` archives in both styles) and from berth's own export; skopeo reads
what berth writes, as an independent check of the format.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from daemon.errors import FailedPrecondition, InvalidArgument, NotFound
from daemon.metadata.gc import LABEL_GC_REF_CONTENT, LABEL_GC_REF_SNAPSHOT
from daemon.protocols import Descriptor
from plugins.images.config import ImagesConfig
from plugins.images.service import ImageService
from tests.support import oci
from tests.support.push import skopeo_inspect
from tests.unit.test_unpack import NS, World, files_of, images_world

pytest_plugins = ["tests.support.fixtures"]

SN = "native"
CHECKED = (*oci.BUSYBOX_PRESENT, *oci.BUSYBOX_ABSENT)


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    async with images_world(tmp_path / "root", (SN,)) as w:
        yield w


@pytest.fixture
async def service(world: World) -> AsyncIterator[ImageService]:
    svc = world.service(ImagesConfig(snapshotter=SN, platform="linux/amd64"))
    try:
        yield svc
    finally:
        await svc.close()


async def assert_unpacked(world: World, chain_ids: list[str], namespace: str = NS) -> None:
    committed = await world.committed(SN, namespace)
    assert set(chain_ids) <= set(committed)
    sn = world.db.snapshotter(SN)
    key = "check"
    mounts = await sn.view(namespace, key, chain_ids[-1])
    await sn.remove(namespace, key)
    assert mounts
    if namespace == NS:
        present = await files_of(world, SN, chain_ids[-1], CHECKED)
        assert [p for p in oci.BUSYBOX_PRESENT if not present[p]] == []
        assert [p for p in oci.BUSYBOX_ABSENT if present[p]] == []


class Chunks:
    """An async byte stream over bytes, served in odd-sized pieces."""

    def __init__(self, data: bytes, piece: int = 7919) -> None:
        self._data = data
        self._offset = 0
        self._piece = piece

    async def read(self, n: int = -1) -> bytes:
        size = min(self._piece, n if n >= 0 else self._piece)
        chunk = self._data[self._offset : self._offset + size]
        self._offset += len(chunk)
        return chunk


class Sink:
    def __init__(self) -> None:
        self.buffer = bytearray()

    async def write(self, data: bytes) -> None:
        self.buffer += data


# -- import -----------------------------------------------------------------------------------


async def test_import_oci_archive_names_labels_and_unpacks(
    world: World, service: ImageService, busybox: oci.Image, tmp_path: Path
) -> None:
    path = oci.oci_archive(busybox, tmp_path / "busybox.tar", ref_name="latest")
    events = world.bus.subscribe(topic_prefix="/images")
    try:
        [image] = await service.import_archive(NS, path, name="example.com/team/busybox")
        env = events.get_nowait()
        assert env is not None and env.topic == "/images/create" and env.event.name == image.name
    finally:
        events.close()
    m = busybox.manifests[0]
    assert image.name == "example.com/team/busybox:latest"
    assert image.target == Descriptor(m.media_type, m.digest, m.manifest.size)
    labels = await world.labels(m.digest)
    assert labels[f"{LABEL_GC_REF_CONTENT}.config"] == m.config.digest
    assert labels[f"{LABEL_GC_REF_CONTENT}.l.2"] == m.layers[2].digest
    assert (await world.labels(m.config.digest))[LABEL_GC_REF_SNAPSHOT + SN] == m.chain_ids[-1]
    await assert_unpacked(world, m.chain_ids)
    assert await world.db.leases.list(NS) == []


async def test_import_docker_save_classic(
    world: World, service: ImageService, busybox: oci.Image, tmp_path: Path
) -> None:
    path = oci.docker_save_archive(busybox, tmp_path / "save.tar", "busybox:1")
    [image] = await service.import_archive(NS, path)
    [again] = await service.import_archive(NS, path)  # importing twice changes nothing
    assert again.target == image.target
    assert image.name == "docker.io/library/busybox:1"
    assert image.target.media_type == oci.DOCKER_MANIFEST
    m = busybox.manifests[0]
    local = await service.inspect(NS, image)
    assert local.config.descriptor.digest == m.config.digest
    assert local.config.descriptor.media_type == oci.DOCKER_CONFIG
    # layer.tar files are the uncompressed layers: their digests are the diff ids
    assert [d.digest for d in local.manifest.layers] == m.diff_ids
    assert {d.media_type for d in local.manifest.layers} == {oci.DOCKER_LAYER}
    assert local.chain_ids == m.chain_ids
    await assert_unpacked(world, m.chain_ids)
    assert {layer.digest for layer in local.manifest.layers} <= await world.digests()


async def test_import_docker_save_oci_style_from_a_stream(
    world: World, service: ImageService, busybox: oci.Image, tmp_path: Path
) -> None:
    data = oci.docker_save_archive(
        busybox, tmp_path / "save25.tar", "example.com/app:2", style="oci"
    ).read_bytes()
    [image] = await service.import_archive(NS, Chunks(data))
    assert image.name == "example.com/app:2"
    assert image.target.digest == busybox.digest
    await assert_unpacked(world, busybox.manifests[0].chain_ids)


async def test_import_gzipped_archive_from_a_file_object_without_unpacking(
    world: World, service: ImageService, busybox_index: oci.Image, tmp_path: Path
) -> None:
    import gzip

    raw = oci.oci_archive(
        busybox_index, tmp_path / "index.tar", ref_name="registry.example/idx:3"
    ).read_bytes()
    [image] = await service.import_archive(NS, io.BytesIO(gzip.compress(raw)), unpack=False)
    assert image.name == "registry.example/idx:3"
    assert image.target.media_type == oci.OCI_INDEX
    assert await world.committed(SN) == {}
    labels = await world.labels(busybox_index.digest)
    assert {labels[f"{LABEL_GC_REF_CONTENT}.m.{i}"] for i in range(2)} == {
        m.digest for m in busybox_index.manifests
    }
    chain = await service.unpack(NS, image, platform="linux/arm64")
    assert chain == busybox_index.manifest_for("linux/arm64").chain_ids


@pytest.mark.parametrize(
    ("members", "error", "match"),
    [
        ([("notes.txt", b"hello")], InvalidArgument, "neither an OCI image layout"),
        ([("index.json", b"{not json")], InvalidArgument, "index.json: not valid JSON"),
    ],
)
async def test_import_refuses_what_is_no_image_archive(
    service: ImageService, members: list[tuple[str, bytes]], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        await service.import_archive(NS, io.BytesIO(tar_of(members)), name="x/y")


async def test_import_refuses_garbage_and_truncated_tars(service: ImageService, busybox: oci.Image) -> None:
    with pytest.raises(InvalidArgument, match="not a valid tar archive"):
        await service.import_archive(NS, io.BytesIO(b"\x00garbage" * 200))
    whole = tar_of(oci.oci_layout_files(busybox))
    with pytest.raises(InvalidArgument, match="archive: "):
        await service.import_archive(NS, io.BytesIO(whole[: len(whole) // 2]), name="x/y")


def tar_of(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


async def test_import_verifies_blob_digests_and_commits_nothing_corrupt(
    world: World, service: ImageService, busybox: oci.Image
) -> None:
    files = oci.oci_layout_files(busybox, ref_name="example.com/bad:1")
    m = busybox.manifests[0]
    victim = f"blobs/sha256/{m.layers[1].digest.removeprefix('sha256:')}"
    files = [(n, d[:-1] + bytes([d[-1] ^ 1]) if n == victim else d) for n, d in files]
    with pytest.raises(FailedPrecondition, match=f"blob {m.layers[1].digest}: digest mismatch"):
        await service.import_archive(NS, io.BytesIO(tar_of(files)))
    assert m.layers[1].digest not in await world.digests()
    assert await service.list(NS) == []
    assert await world.db.leases.list(NS) == []
    assert await world.db.content.list_statuses(NS) == []


async def test_import_needs_a_name_for_unnamed_images(service: ImageService, busybox: oci.Image) -> None:
    archive = tar_of(oci.oci_layout_files(busybox, ref_name=None))
    with pytest.raises(InvalidArgument, match=f"image {busybox.digest} has no name in the archive"):
        await service.import_archive(NS, io.BytesIO(archive))
    [image] = await service.import_archive(NS, io.BytesIO(archive), name="example.com/named:1")
    assert image.name == "example.com/named:1"


async def test_import_refuses_an_index_naming_a_missing_blob(
    service: ImageService, busybox: oci.Image
) -> None:
    files = [(n, d) for n, d in oci.oci_layout_files(busybox) if not n.startswith("blobs/")]
    with pytest.raises(
        InvalidArgument, match=f"index.json names {busybox.digest}, which the archive does not hold"
    ):
        await service.import_archive(NS, io.BytesIO(tar_of(files)), name="x/y")


async def test_archive_members_never_touch_the_file_system(
    service: ImageService, busybox: oci.Image, tmp_path: Path
) -> None:
    files = [*oci.oci_layout_files(busybox, ref_name="example.com/evil:1"), ("../../escape.txt", b"x")]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in files:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("blobs/sha256/" + "0" * 64)
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tf.addfile(link)
    [image] = await service.import_archive(NS, io.BytesIO(buf.getvalue()))
    assert image.name == "example.com/evil:1"
    assert not (tmp_path.parent / "escape.txt").exists()
    assert not (tmp_path / "escape.txt").exists()


# -- export and round trips -----------------------------------------------------------------------


async def test_export_then_import_into_another_namespace(
    world: World, service: ImageService, busybox_index: oci.Image, tmp_path: Path
) -> None:
    source = oci.oci_archive(busybox_index, tmp_path / "in.tar", image_name="example.com/team/busybox:1")
    [image] = await service.import_archive(NS, source)
    out = tmp_path / "out.tar"
    await service.export(NS, [image.name], out)

    with tarfile.open(out) as tf:
        names = set(tf.getnames())
        index = json.load(tf.extractfile("index.json"))  # type: ignore[arg-type]
        assert json.load(tf.extractfile("oci-layout")) == {"imageLayoutVersion": "1.0.0"}  # type: ignore[arg-type]
    amd64, arm64 = busybox_index.manifest_for("linux/amd64"), busybox_index.manifest_for("linux/arm64")
    expected = {busybox_index.digest, amd64.digest, amd64.config.digest, *(x.digest for x in amd64.layers)}
    blobs = {"sha256:" + n.rsplit("/", 1)[-1] for n in names if n.startswith("blobs/sha256/")}
    assert blobs == expected  # the platform's manifest only
    assert arm64.config.digest not in blobs
    [entry] = index["manifests"]
    assert entry["digest"] == busybox_index.digest
    assert entry["annotations"] == {
        "io.containerd.image.name": "example.com/team/busybox:1",
        "org.opencontainers.image.ref.name": "1",
    }
    # skopeo reads it
    raw = skopeo_inspect(f"oci-archive:{out}:1", raw=True)
    assert raw["mediaType"] == oci.OCI_INDEX

    [copy] = await service.import_archive("copy", out)
    assert copy.name == image.name and copy.target == image.target
    assert set(amd64.chain_ids) <= set(await world.committed(SN, "copy"))
    assert await world.digests("copy") == expected

    sink = Sink()
    await service.export(NS, [image.name], sink, all_platforms=True)
    with tarfile.open(fileobj=io.BytesIO(bytes(sink.buffer))) as tf:
        every = {"sha256:" + n.rsplit("/", 1)[-1] for n in tf.getnames() if n.startswith("blobs/sha256/")}
    assert every == {busybox_index.digest, *(busybox_index.blobs())} & await world.digests()
    assert arm64.config.digest in every


async def test_export_of_a_docker_import_round_trips(
    world: World, service: ImageService, busybox: oci.Image, tmp_path: Path
) -> None:
    [image] = await service.import_archive(NS, oci.docker_save_archive(busybox, tmp_path / "s.tar", "app:7"))
    buf = io.BytesIO()
    await service.export(NS, [image.name], buf)
    await service.remove(NS, image.name, sync=True)
    assert await world.digests() == set()
    [back] = await service.import_archive(NS, io.BytesIO(buf.getvalue()))
    assert back.name == "docker.io/library/app:7" and back.target == image.target
    await assert_unpacked(world, busybox.manifests[0].chain_ids)


async def test_export_names_what_is_missing(
    world: World, service: ImageService, busybox: oci.Image, tmp_path: Path
) -> None:
    with pytest.raises(NotFound, match=r'image "example\.com/nothing:1": not found'):
        await service.export(NS, ["example.com/nothing:1"], tmp_path / "x.tar")
    [image] = await service.import_archive(
        NS, oci.oci_archive(busybox, tmp_path / "b.tar", image_name="example.com/b:1")
    )
    layer = busybox.manifests[0].layers[0].digest
    await world.db.content.delete(NS, layer)
    out = tmp_path / "partial.tar"
    with pytest.raises(NotFound, match=f"layer {layer} is not in the content store"):
        await service.export(NS, [image.name], out)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".partial")] == []
