"""ContainerStore: containerd's container records, their validation, field masks, filters and GC roots."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import cast

import pytest

from daemon.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from daemon.metadata import Container, MetadataDB, Runtime, TypedValue
from daemon.metadata.schema import NAMESPACED_TABLES
from tests.unit.fakes import FakeContentStore, FakeSnapshotter, sha256

SPEC = TypedValue("types.containerd.io/opencontainers/runtime-spec/1/Spec", b'{"ociVersion":"1.1.0"}')
RUNC = "io.containerd.runc.v2"


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[MetadataDB]:
    opened = await MetadataDB.open(
        tmp_path / "meta.db", FakeContentStore(), {"snapA": FakeSnapshotter()}, gc_delay=0
    )
    try:
        yield opened
    finally:
        await opened.close()


def container(id_: str = "c1", **kw: object) -> Container:
    fields: dict[str, object] = {
        "id": id_,
        "runtime": Runtime(RUNC),
        "spec": SPEC,
        "image": "docker.io/x/y:1",
    }
    fields.update(kw)
    return Container(**fields)  # type: ignore[arg-type]


async def test_create_get_list_delete_round_trip_every_field(db: MetadataDB) -> None:
    opts = TypedValue("containerd.runc.v1.Options", b"\x08\x01")
    ext = {"a": TypedValue("x/ext", b"\x00\xffbin")}
    c = container(
        labels={"k": "v"},
        runtime=Runtime(RUNC, opts),
        snapshotter="snapA",
        snapshot_key="c1-root",
        extensions=ext,
        sandbox="sb1",
    )
    created = await db.containers.create("ns", c)
    assert created.created_at == created.updated_at and created.created_at.year >= 2024
    got = await db.containers.get("ns", "c1")
    assert got == created
    assert got.runtime.options == opts and got.extensions == ext and got.spec == SPEC and got.sandbox == "sb1"
    assert [n.name for n in await db.namespaces.list()] == ["ns"]  # created implicitly
    with pytest.raises(AlreadyExists, match='container "c1": already exists'):
        await db.containers.create("ns", container())
    await db.containers.create("ns", container("a0"))
    assert [x.id for x in await db.containers.list("ns")] == ["a0", "c1"]
    await db.containers.delete("ns", "c1")
    with pytest.raises(NotFound, match='container "c1" in namespace "ns": not found'):
        await db.containers.get("ns", "c1")
    with pytest.raises(NotFound):
        await db.containers.delete("ns", "c1")


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"id": "bad id"}, r'container\.id "bad id": invalid'),
        ({"id": ""}, r"container\.id: invalid: must not be empty"),
        ({"runtime": Runtime("")}, "must specify a runtime name"),
        ({"spec": None}, "spec must be set"),
        ({"snapshot_key": "k"}, "snapshotter must be set if snapshot_key is set"),
        ({"extensions": {"": SPEC}}, "extension names must not be empty"),
        ({"labels": {"k": "x" * 5000}}, "label"),
    ],
)
async def test_create_validates_like_containerd(db: MetadataDB, kw: dict[str, object], message: str) -> None:
    fields = {"id": "c1", "runtime": Runtime(RUNC), "spec": SPEC} | kw
    with pytest.raises(InvalidArgument, match=message):
        await db.containers.create("ns", Container(**fields))  # type: ignore[arg-type]
    assert await db.containers.list("ns") == []


async def test_image_is_optional(db: MetadataDB) -> None:
    created = await db.containers.create("ns", container(image=""))
    assert created.image == ""


async def test_update_with_field_masks(db: MetadataDB) -> None:
    await db.containers.create(
        "ns",
        container(
            labels={"a": "1", "b": "2"}, snapshotter="snapA", snapshot_key="k1", extensions={"e1": SPEC}
        ),
    )
    new_spec = TypedValue(SPEC.type_url, b"{}")
    change = container(
        labels={"a": "9", "c": "3"},
        image="other:2",
        spec=new_spec,
        snapshot_key="k2",
        extensions={"e2": new_spec},
        runtime=Runtime("other.runtime"),
        snapshotter="elsewhere",
    )
    up = await db.containers.update("ns", change, ["labels.a", "labels.b"])
    assert up.labels == {"a": "9"} and up.image == "docker.io/x/y:1" and up.spec == SPEC
    assert up.runtime.name == RUNC and up.snapshotter == "snapA"  # immutable ones never change
    up = await db.containers.update(
        "ns", change, ["image", "spec", "snapshotkey", "extensions.e2", "extensions.e1"]
    )
    assert (up.image, up.spec, up.snapshot_key, up.extensions) == (
        "other:2",
        new_spec,
        "k2",
        {"e2": new_spec},
    )
    assert up.updated_at >= up.created_at
    assert await db.containers.get("ns", "c1") == up
    with pytest.raises(InvalidArgument, match='container "c1": cannot update "runtime" field'):
        await db.containers.update("ns", change, ["runtime"])
    with pytest.raises(InvalidArgument, match='cannot update "snapshotter" field'):
        await db.containers.update("ns", change, ["snapshotter"])
    with pytest.raises(InvalidArgument, match="spec must be set"):
        await db.containers.update("ns", container(spec=None), ["spec"])
    with pytest.raises(NotFound):
        await db.containers.update("ns", container("missing"), ["labels"])


async def test_full_update_refuses_changing_immutable_fields(db: MetadataDB) -> None:
    await db.containers.create("ns", container(snapshotter="snapA", snapshot_key="k1", labels={"x": "1"}))
    with pytest.raises(InvalidArgument, match=r"runtime\.name field is immutable"):
        await db.containers.update("ns", container(runtime=Runtime("other"), snapshotter="snapA"))
    with pytest.raises(InvalidArgument, match="snapshotter field is immutable"):
        await db.containers.update("ns", container(snapshotter="snapB"))
    up = await db.containers.update("ns", container(snapshotter="snapA", image="new:1", labels={"y": "2"}))
    assert (up.image, up.labels, up.snapshot_key) == ("new:1", {"y": "2"}, "")


async def test_list_filters(db: MetadataDB) -> None:
    await db.containers.create("ns", container("web", labels={"app": "web"}, image="nginx:1"))
    await db.containers.create("ns", container("db", labels={"app": "db"}, snapshotter="snapA"))
    await db.containers.create("ns", container("vm", runtime=Runtime("io.containerd.kata.v2")))

    async def ids(*f: str) -> list[str]:
        return [c.id for c in await db.containers.list("ns", f)]

    assert await ids("id==web") == ["web"]
    assert await ids("labels.app==db") == ["db"]
    assert await ids("image==nginx:1") == ["web"]
    assert await ids("runtime.name==io.containerd.kata.v2") == ["vm"]
    assert await ids("snapshotter==snapA") == ["db"]
    assert await ids("id==web", "id==vm") == ["vm", "web"]  # filters are ORed
    assert await ids("labels.app") == ["db", "web"]
    with pytest.raises(InvalidArgument):
        await db.containers.list("ns", ["id=="])


async def test_namespaces_are_isolated_and_a_namespace_with_containers_is_kept(db: MetadataDB) -> None:
    assert ("containers", "containers") in NAMESPACED_TABLES
    await db.containers.create("one", container())
    with pytest.raises(NotFound):
        await db.containers.get("two", "c1")
    await db.containers.create("two", container(image="other"))
    assert (await db.containers.get("one", "c1")).image == "docker.io/x/y:1"
    with pytest.raises(FailedPrecondition, match="still has containers"):
        await db.namespaces.delete("one")
    await db.containers.delete("one", "c1")
    await db.namespaces.delete("one")
    assert [c.id for c in await db.containers.list("two")] == ["c1"]


async def test_gc_keeps_the_snapshot_and_labelled_content_of_a_container(db: MetadataDB) -> None:
    sn = db.snapshotter("snapA")
    await db.leases.create("ns", "hold")
    await sn.prepare("ns", "c1-root", lease="hold")
    await sn.prepare("ns", "other", lease="hold")
    data = b"config"
    w = await db.content.writer("ns", "ref", len(data), sha256(data), lease="hold")
    await w.write(data)
    await w.commit(len(data), sha256(data))
    await w.close()
    labels = {"containerd.io/gc.ref.content.spec": sha256(data)}
    await db.containers.create("ns", container(snapshotter="snapA", snapshot_key="c1-root", labels=labels))
    await db.leases.delete("ns", "hold")
    await db.gc.run_now()

    def keys(conn: sqlite3.Connection) -> list[str]:
        return [k for (k,) in conn.execute("SELECT key FROM snapshots ORDER BY key")]

    assert await db.store.read(keys) == ["c1-root"]  # "other" was only leased
    assert sha256(data) in cast(FakeContentStore, db.content.backend).blobs
    await db.containers.delete("ns", "c1")
    await db.gc.wait_idle()  # the delete requested a collection
    assert await db.store.read(keys) == []
    assert sha256(data) not in cast(FakeContentStore, db.content.backend).blobs
    assert cast(FakeSnapshotter, sn.backend).snapshots == {}
