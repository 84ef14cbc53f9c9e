"""CriStore: CRI objects as k8s.io container records plus atomic status files, and their names."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from daemon.errors import AlreadyExists, InvalidArgument, NotFound
from daemon.metadata import MetadataDB
from plugins.cri.store import (
    EXTENSION,
    KIND_LABEL,
    NAMESPACE,
    ContainerMeta,
    ContainerStatus,
    CriContainer,
    CriStore,
    Entry,
    NameIndex,
    Sandbox,
    SandboxMeta,
    SandboxStatus,
    container_name,
    sandbox_name,
)
from tests.unit.fakes import FakeContentStore, FakeSnapshotter

SPEC = b'{"ociVersion":"1.0.2-dev"}'


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[MetadataDB]:
    opened = await MetadataDB.open(
        tmp_path / "meta.db", FakeContentStore(), {"snap": FakeSnapshotter()}, gc_delay=0
    )
    try:
        yield opened
    finally:
        await opened.close()


def sandbox(id_: str, name: str = "web_default_uid_0", state: str = "ready") -> Sandbox:
    meta = SandboxMeta(id=id_, name=name, config=b"\x0a\x03\x0a\x01x", netns_path=f"/run/x/{id_}/net")
    return Entry(meta, SandboxStatus(state=state, created_at=123, ip="10.0.0.2"), {"app": "web"}, {"a": "b"})


def container(id_: str, sandbox_id: str, name: str = "c_web_default_uid_0") -> CriContainer:
    meta = ContainerMeta(id=id_, name=name, sandbox_id=sandbox_id, config=b"\x01\x02", image_ref="sha256:ab")
    return Entry(meta, ContainerStatus(state="running", pid=42), {"k": "v"}, {})


def test_names_are_containerds() -> None:
    assert sandbox_name("web", "default", "u1", 2) == "web_default_u1_2"
    assert container_name("c", 1, "web", "default", "u1") == "c_web_default_u1_1"


def test_name_index_reserves_for_one_holder_and_releases_only_for_it() -> None:
    names = NameIndex()
    names.reserve("n", "id1")
    names.reserve("n", "id1")  # the holder again: fine
    with pytest.raises(AlreadyExists, match='reserved for "id1"'):
        names.reserve("n", "id2")
    names.release("n", "id2")  # not the holder: nothing happens
    assert names.holder("n") == "id1"
    names.release("n", "id1")
    assert names.holder("n") is None
    names.reserve("n", "id2")
    names.release("n")  # without a key: unconditional
    assert names.holder("n") is None


async def test_round_trip_through_records_and_status_files(db: MetadataDB, tmp_path: Path) -> None:
    store = CriStore(db.containers, tmp_path / "cri")
    sb = sandbox("a" * 64)
    store.sandbox_names.reserve(sb.meta.name, sb.id)
    await store.add_sandbox(sb, {"app": "web"}, spec=SPEC)
    c = container("c" * 64, sb.id)
    await store.add_container(c, spec=SPEC, snapshotter="snap", snapshot_key="c" * 64)

    record = await db.containers.get(NAMESPACE, sb.id)
    assert record.labels == {"app": "web", KIND_LABEL: "sandbox"}
    assert record.spec is not None and record.spec.value == SPEC
    assert json.loads(record.extensions[EXTENSION].value)["labels"] == {"app": "web"}
    crecord = await db.containers.get(NAMESPACE, c.id)
    assert crecord.sandbox == sb.id and crecord.snapshot_key == c.id

    sb.status.state = "notready"
    sb.status.pid = 7
    await store.save_status(sb)

    loaded = CriStore(db.containers, tmp_path / "cri")
    await loaded.load()
    got = loaded.sandbox(sb.id)
    assert got.meta == sb.meta
    assert got.status == sb.status
    assert (got.labels, got.annotations) == (sb.labels, sb.annotations)
    assert loaded.containers_of(sb.id)[0].meta == c.meta
    assert loaded.container(c.id).status.pid == 42
    assert loaded.sandbox_names.holder(sb.meta.name) == sb.id
    assert loaded.container_names.holder(c.meta.name) == c.id

    await loaded.remove_container(loaded.container(c.id))
    await loaded.remove_sandbox(got)
    with pytest.raises(NotFound):
        await db.containers.get(NAMESPACE, sb.id)
    assert not (tmp_path / "cri" / "sandboxes" / sb.id).exists()
    assert loaded.sandbox_names.holder(sb.meta.name) is None
    again = CriStore(db.containers, tmp_path / "cri")
    await again.load()
    assert again.sandboxes == {} and again.containers == {}


async def test_a_missing_status_file_loads_as_unknown_state(db: MetadataDB, tmp_path: Path) -> None:
    store = CriStore(db.containers, tmp_path / "cri")
    sb = sandbox("b" * 64)
    await store.add_sandbox(sb, spec=SPEC)
    store.status_path("sandbox", sb.id).unlink()
    loaded = CriStore(db.containers, tmp_path / "cri")
    await loaded.load()
    assert loaded.sandbox(sb.id).status.state == "notready"


async def test_lookup_by_unique_prefix(db: MetadataDB, tmp_path: Path) -> None:
    store = CriStore(db.containers, tmp_path / "cri")
    for id_, name in (("ab" + "0" * 62, "n1"), ("ac" + "0" * 62, "n2")):
        await store.add_sandbox(sandbox(id_, name), spec=SPEC)
    assert store.sandbox("ab").meta.name == "n1"
    with pytest.raises(InvalidArgument, match="ambiguous"):
        store.sandbox("a")
    with pytest.raises(NotFound, match='"zz"'):
        store.sandbox("zz")
    with pytest.raises(InvalidArgument, match="empty"):
        store.sandbox("")


async def test_a_duplicate_id_is_refused_without_touching_the_first(db: MetadataDB, tmp_path: Path) -> None:
    store = CriStore(db.containers, tmp_path / "cri")
    first = sandbox("d" * 64)
    await store.add_sandbox(first, spec=SPEC)
    with pytest.raises(AlreadyExists, match="d" * 64):
        await store.add_sandbox(sandbox("d" * 64, "other", state="notready"), spec=SPEC)
    assert store.sandboxes["d" * 64] is first
    assert json.loads(store.status_path("sandbox", first.id).read_text())["state"] == "ready"


async def test_a_failed_record_leaves_no_status_file(db: MetadataDB, tmp_path: Path) -> None:
    store = CriStore(db.containers, tmp_path / "cri")
    await store.add_sandbox(sandbox("e" * 64), spec=SPEC)
    other = CriStore(db.containers, tmp_path / "cri2")  # knows nothing of "e"*64: the record store refuses
    with pytest.raises(AlreadyExists):
        await other.add_sandbox(sandbox("e" * 64), spec=SPEC)
    assert not other.status_path("sandbox", "e" * 64).exists()
    assert other.sandboxes == {}
