"""Image records: CRUD, validation, filters, field masks, namespace isolation."""

from __future__ import annotations

import sqlite3

import pytest

from daemon.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from daemon.metadata import NAMESPACED_TABLES, Image, ImageStore, MetadataStore
from daemon.protocols import Descriptor

INDEX = "application/vnd.oci.image.index.v1+json"
MANIFEST = "application/vnd.oci.image.manifest.v1+json"
D1 = "sha256:" + "1" * 64
D2 = "sha256:" + "2" * 64


@pytest.fixture
def images(store: MetadataStore) -> ImageStore:
    return ImageStore(store)


def image(name: str, digest: str = D1, media_type: str = INDEX, **labels: str) -> Image:
    return Image(name, Descriptor(media_type, digest, 100, {"a": "1"}), dict(labels))


async def test_crud(images: ImageStore, store: MetadataStore) -> None:
    created = await images.create("default", image("docker.io/library/busybox:latest", owner="me"))
    assert created.created_at == created.updated_at
    assert created.created_at.year >= 2024
    assert (await store.namespaces.get("default")).name == "default"  # created implicitly

    got = await images.get("default", "docker.io/library/busybox:latest")
    assert got == created
    assert got.target == Descriptor(INDEX, D1, 100, {"a": "1"})

    with pytest.raises(AlreadyExists, match=r'image "docker.io/library/busybox:latest": already exists'):
        await images.create("default", image("docker.io/library/busybox:latest"))

    await images.delete("default", "docker.io/library/busybox:latest")
    with pytest.raises(NotFound, match=r'image "docker.io/library/busybox:latest": not found'):
        await images.get("default", "docker.io/library/busybox:latest")
    with pytest.raises(NotFound):
        await images.delete("default", "docker.io/library/busybox:latest")
    assert await images.list("default") == []


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("", "image name: must not be empty"),
        ("busy box", "must not contain whitespace or control characters"),
        ("busybox\n", "must not contain whitespace"),
        ("busy\x00box", "control characters"),
        ("x" * 4097, "longer than 4096 characters"),
    ],
)
async def test_name_validation(images: ImageStore, name: str, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        await images.create("default", image(name))


async def test_references_are_valid_names(images: ImageStore) -> None:
    for name in (
        "docker.io/library/busybox:latest",
        "localhost:5000/team/app@sha256:" + "f" * 64,
        "registry.k8s.io/pause:3.9",
        "x" * 4096,
    ):
        await images.create("default", image(name))
    assert len(await images.list("default")) == 4


@pytest.mark.parametrize(
    ("target", "message"),
    [
        (Descriptor(INDEX, "sha256:abc", 1), "target.digest"),
        (Descriptor(INDEX, "md5:" + "a" * 32, 1), "unsupported algorithm"),
        (Descriptor(INDEX, D1, 0), "target.size must be greater than zero"),
        (Descriptor("", D1, 1), "target.media_type must be set"),
    ],
)
async def test_target_validation(images: ImageStore, target: Descriptor, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        await images.create("default", Image("img", target))
    assert await images.list("default") == []


async def test_namespace_is_required_and_validated(images: ImageStore) -> None:
    with pytest.raises(FailedPrecondition, match="namespace is required"):
        await images.create("", image("a"))
    with pytest.raises(InvalidArgument, match="namespace"):
        await images.list("bad namespace")


async def test_list_filters(images: ImageStore) -> None:
    await images.create("default", image("docker.io/library/busybox:latest", D1, INDEX, team="a"))
    await images.create("default", image("docker.io/library/alpine:3", D2, MANIFEST, team="b"))
    await images.create("default", image("quay.io/x/y:1", D2, INDEX))

    async def names(*filters: str) -> list[str]:
        return [i.name for i in await images.list("default", list(filters))]

    assert await names() == [
        "docker.io/library/alpine:3",
        "docker.io/library/busybox:latest",
        "quay.io/x/y:1",
    ]
    assert await names("name==quay.io/x/y:1") == ["quay.io/x/y:1"]
    assert await names(f"target.digest=={D2}") == ["docker.io/library/alpine:3", "quay.io/x/y:1"]
    assert await names(f"target.mediatype=={MANIFEST}") == ["docker.io/library/alpine:3"]
    assert await names("labels.team==a") == ["docker.io/library/busybox:latest"]
    assert await names("labels.team") == ["docker.io/library/alpine:3", "docker.io/library/busybox:latest"]
    assert await names(r"name~=^docker\.io/", f"target.digest=={D2}") == [
        "docker.io/library/alpine:3",
        "docker.io/library/busybox:latest",
        "quay.io/x/y:1",
    ]
    assert await names(r"name~=^docker\.io/,labels.team==b") == ["docker.io/library/alpine:3"]
    assert await names("annotations.a==1") == [
        "docker.io/library/alpine:3",
        "docker.io/library/busybox:latest",
        "quay.io/x/y:1",
    ]
    with pytest.raises(InvalidArgument, match="filters: parse error"):
        await images.list("default", ["name=="])


async def test_update_field_masks(images: ImageStore) -> None:
    created = await images.create("default", image("img", keep="1", drop="2"))

    changed = await images.update("default", image("img", D2, MANIFEST, keep="x", new="3"), ["labels.new"])
    assert changed.labels == {"keep": "1", "drop": "2", "new": "3"}
    assert changed.target.digest == D1  # target not in the mask
    assert changed.created_at == created.created_at
    assert changed.updated_at >= created.updated_at

    changed = await images.update("default", image("img"), ["labels.drop"])  # absent in input: removed
    assert changed.labels == {"keep": "1", "new": "3"}

    changed = await images.update("default", image("img", D2, MANIFEST), ["target"])
    assert changed.target == Descriptor(MANIFEST, D2, 100, {"a": "1"})
    assert changed.labels == {"keep": "1", "new": "3"}

    new_target = Descriptor(MANIFEST, D2, 100, {"b": "2", "c": "3"})
    changed = await images.update("default", Image("img", new_target), ["annotations.b"])
    assert changed.target.annotations == {"a": "1", "b": "2"}
    changed = await images.update("default", Image("img", new_target), ["annotations"])
    assert changed.target.annotations == {"b": "2", "c": "3"}

    changed = await images.update("default", image("img", D1, INDEX, only="this"))  # no mask: replace
    assert changed.labels == {"only": "this"}
    assert changed.target == Descriptor(INDEX, D1, 100, {"a": "1"})
    assert await images.get("default", "img") == changed

    with pytest.raises(InvalidArgument, match=r'image "img": cannot update "name" field'):
        await images.update("default", image("img"), ["name"])
    with pytest.raises(InvalidArgument, match=r"target\.digest"):
        await images.update("default", Image("img", Descriptor(INDEX, "nope", 1)), ["target"])
    with pytest.raises(NotFound, match='image "other": not found'):
        await images.update("default", image("other"), ["labels"])
    with pytest.raises(InvalidArgument, match="image name is required"):
        await images.update("default", image(""), ["labels"])
    assert await images.get("default", "img") == changed  # failed updates changed nothing


async def test_namespaces_are_isolated(images: ImageStore) -> None:
    await images.create("ns1", image("same", D1))
    await images.create("ns2", image("same", D2))
    assert (await images.get("ns1", "same")).target.digest == D1
    assert (await images.get("ns2", "same")).target.digest == D2
    await images.delete("ns1", "same")
    with pytest.raises(NotFound):
        await images.get("ns1", "same")
    assert (await images.get("ns2", "same")).target.digest == D2
    assert await images.list("ns3") == []


async def test_delete_with_target_check_and_callback(images: ImageStore) -> None:
    calls: list[str] = []
    images.on_delete = lambda: calls.append("gc")
    await images.create("default", image("img", D1))
    with pytest.raises(NotFound, match=f'image "img": has target {D1}, not {D2}'):
        await images.delete("default", "img", target_digest=D2)
    assert calls == []
    await images.get("default", "img")
    await images.delete("default", "img", target_digest=D1)
    assert calls == ["gc"]


async def test_namespace_with_images_cannot_be_deleted(images: ImageStore, store: MetadataStore) -> None:
    await images.create("busy", image("img"))
    with pytest.raises(FailedPrecondition) as info:
        await store.namespaces.delete("busy")
    assert str(info.value) == 'namespace "busy" must be empty, but it still has images'
    await images.delete("busy", "img")
    await store.namespaces.delete("busy")


def test_new_tables_join_the_emptiness_check() -> None:
    assert {"images", "content", "ingests", "snapshots"} <= {t for t, _ in NAMESPACED_TABLES}


async def test_tx_variants_compose_in_one_transaction(images: ImageStore, store: MetadataStore) -> None:
    class Boom(Exception):
        pass

    def tx(conn: sqlite3.Connection) -> None:
        images.create_tx(conn, "default", image("a"))
        raise Boom

    with pytest.raises(Boom):
        await store.write(tx)
    assert await images.list("default") == []
