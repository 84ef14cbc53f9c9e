"""Namespaced content over a fake backend: records, sharing, ingests, leases, validation."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from daemon.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, Unavailable
from daemon.metadata import LeaseResource, MetadataStore, NamespacedContent
from daemon.protocols import ContentInfo, ContentStore
from daemon.testsuite.content import CASES, StoreFactory
from tests.unit.fakes import FakeContentStore, sha256

DATA = b"hello, layer"
DIGEST = sha256(DATA)


@pytest.fixture
def backend() -> FakeContentStore:
    return FakeContentStore()


@pytest.fixture
def content(store: MetadataStore, backend: FakeContentStore) -> NamespacedContent:
    return NamespacedContent(store, backend)


async def put(
    content: NamespacedContent,
    ns: str,
    data: bytes,
    labels: dict[str, str] | None = None,
    lease: str = "",
    expected: bool = True,
) -> str:
    digest = sha256(data)
    w = await content.writer(ns, f"ref-{digest}", len(data), digest if expected else "", lease=lease)
    if w.offset == 0:
        await w.write(data)
    try:
        return await w.commit(len(data), digest, labels)
    finally:
        await w.close()


async def read_all(content: NamespacedContent, ns: str, digest: str) -> bytes:
    r = await content.reader(ns, digest)
    try:
        return await r.read_at(0, r.size)
    finally:
        await r.close()


async def infos(content: NamespacedContent, ns: str, *filters: str) -> list[ContentInfo]:
    return [i async for i in content.walk(ns, list(filters))]


async def test_commit_records_and_reads(content: NamespacedContent, backend: FakeContentStore) -> None:
    assert await put(content, "default", DATA, {"k": "v"}) == DIGEST
    info = await content.info("default", DIGEST)
    assert (info.digest, info.size, info.labels) == (DIGEST, len(DATA), {"k": "v"})
    assert await read_all(content, "default", DIGEST) == DATA
    assert [i.digest for i in await infos(content, "default")] == [DIGEST]
    assert (await backend.info(DIGEST)).labels == {}  # labels live in the metadata DB
    assert backend.ingests == {}
    assert await content.list_statuses("default") == []


async def test_blob_not_recorded_in_namespace_is_not_found(
    content: NamespacedContent, backend: FakeContentStore
) -> None:
    await put(content, "ns1", DATA)
    orphan = backend.put(b"left by a crash")
    for ns, digest in (("ns2", DIGEST), ("ns1", orphan)):
        with pytest.raises(NotFound, match=f'content "{digest}": not found'):
            await content.info(ns, digest)
        with pytest.raises(NotFound):
            await content.reader(ns, digest)
        with pytest.raises(NotFound):
            await content.delete(ns, digest)
    assert await infos(content, "ns2") == []


async def test_second_namespace_shares_the_blob_without_writing(
    content: NamespacedContent, backend: FakeContentStore
) -> None:
    await put(content, "ns1", DATA, {"owner": "ns1"})
    written = backend.bytes_written
    w = await content.writer("ns2", "pull-ref", len(DATA), DIGEST)
    assert (w.offset, w.digest()) == (len(DATA), DIGEST)
    status = await content.status("ns2", "pull-ref")
    assert (status.ref, status.offset, status.total, status.expected) == ("pull-ref", 12, 12, DIGEST)
    assert await w.commit(len(DATA), DIGEST, {"owner": "ns2"}) == DIGEST
    assert backend.bytes_written == written  # no byte moved
    assert (await content.info("ns1", DIGEST)).labels == {"owner": "ns1"}
    assert (await content.info("ns2", DIGEST)).labels == {"owner": "ns2"}
    assert await read_all(content, "ns2", DIGEST) == DATA
    with pytest.raises(NotFound):
        await content.status("ns2", "pull-ref")


async def test_shared_writer_refuses_mismatched_commit(content: NamespacedContent) -> None:
    await put(content, "ns1", DATA)
    w = await content.writer("ns2", "r", 0, DIGEST)
    with pytest.raises(FailedPrecondition, match="size 5 expected, 12 written"):
        await w.commit(5)
    with pytest.raises(FailedPrecondition, match="expected, got"):
        await w.commit(0, sha256(b"other"))
    with pytest.raises(NotFound):
        await content.info("ns2", DIGEST)


async def test_writing_to_a_shared_writer_copies_first(
    content: NamespacedContent, backend: FakeContentStore
) -> None:
    await put(content, "ns1", DATA)
    w = await content.writer("ns2", "r", 0, DIGEST)
    await w.truncate(5)  # keep "hello", rewrite the rest
    assert w.offset == 5
    await w.write(DATA[5:])
    assert w.digest() == DIGEST
    assert await w.commit(len(DATA), DIGEST) == DIGEST  # the backend had it: still recorded here
    await w.close()
    assert (await content.info("ns2", DIGEST)).size == len(DATA)
    assert backend.ingests == {}


async def test_status_follows_a_writer_that_stops_sharing(content: NamespacedContent) -> None:
    await put(content, "ns1", DATA)
    w = await content.writer("ns2", "r", len(DATA), DIGEST)
    assert (await content.status("ns2", "r")).offset == len(DATA)
    await w.write(DATA[:3])  # a client that ignores offset: the ingest starts over
    assert w.offset == 3
    assert (await content.status("ns2", "r")).offset == 3
    with pytest.raises(InvalidArgument, match="truncate"):
        await w.truncate(100)
    await w.write(DATA[3:])
    assert await w.commit(len(DATA)) == DIGEST
    await w.close()
    assert (await content.info("ns2", DIGEST)).size == len(DATA)


async def test_writer_for_content_already_in_namespace(
    content: NamespacedContent, store: MetadataStore
) -> None:
    await put(content, "default", DATA)
    await store.leases.create("default", "pull")
    with pytest.raises(AlreadyExists, match=f'content "{DIGEST}": already exists'):
        await content.writer("default", "again", len(DATA), DIGEST, lease="pull")
    assert await store.leases.list_resources("default", "pull") == [LeaseResource(DIGEST, "content")]


async def test_backend_already_exists_is_recorded_and_namespace_duplicate_refused(
    content: NamespacedContent,
) -> None:
    await put(content, "ns1", DATA)
    # ns2 writes every byte without announcing the digest: the backend says AlreadyExists
    assert await put(content, "ns2", DATA, {"x": "y"}, expected=False) == DIGEST
    assert (await content.info("ns2", DIGEST)).labels == {"x": "y"}
    # writing it again into the same namespace is a real AlreadyExists, labels untouched
    with pytest.raises(AlreadyExists):
        await put(content, "ns2", DATA, {"x": "changed"}, expected=False)
    assert (await content.info("ns2", DIGEST)).labels == {"x": "y"}


async def test_failed_commit_keeps_the_ingest(content: NamespacedContent) -> None:
    w = await content.writer("default", "r1", len(DATA))
    await w.write(DATA[:4])
    with pytest.raises(FailedPrecondition):
        await w.commit(len(DATA), DIGEST)
    await w.close()
    status = await content.status("default", "r1")
    assert (status.ref, status.offset) == ("r1", 4)
    w = await content.writer("default", "r1", len(DATA))  # resume
    assert w.offset == 4
    await w.write(DATA[4:])
    assert await w.commit(len(DATA), DIGEST) == DIGEST
    await w.close()


async def test_refs_are_per_namespace(content: NamespacedContent, backend: FakeContentStore) -> None:
    w1 = await content.writer("ns1", "layer", 10)
    w2 = await content.writer("ns2", "layer", 10)  # same ref, other namespace: not locked
    await w1.write(b"abc")
    assert len(backend.ingests) == 2
    assert all(ref.endswith("/layer") for ref in backend.ingests)
    assert {ref.split("/", 1)[0] for ref in backend.ingests} == {"ns1", "ns2"}
    with pytest.raises(Unavailable, match="locked"):
        await content.writer("ns1", "layer")
    assert [(s.ref, s.offset) for s in await content.list_statuses("ns1")] == [("layer", 3)]
    assert [(s.ref, s.offset) for s in await content.list_statuses("ns2")] == [("layer", 0)]
    await w1.close()
    await w2.close()

    await content.writer("ns1", "config")
    assert [s.ref for s in await content.list_statuses("ns1", ["ref==config"])] == ["config"]
    assert [s.ref for s in await content.list_statuses("ns1", ["ref~=^lay"])] == ["layer"]

    await content.abort("ns1", "layer")
    with pytest.raises(NotFound, match='ingest "layer": not found'):
        await content.status("ns1", "layer")
    with pytest.raises(NotFound):
        await content.abort("ns1", "layer")
    assert (await content.status("ns2", "layer")).ref == "layer"
    assert len(backend.aborted) == 1


async def test_delete_drops_only_the_namespace_record(
    content: NamespacedContent, backend: FakeContentStore, store: MetadataStore
) -> None:
    calls: list[str] = []
    content.on_delete = lambda: calls.append("gc")
    await put(content, "ns1", DATA)
    await put(content, "ns2", DATA)
    await store.leases.create("ns1", "l")
    await store.leases.add_resource("ns1", "l", LeaseResource(DIGEST, "content"))
    await content.delete("ns1", DIGEST)
    assert calls == ["gc"]
    assert await store.leases.list_resources("ns1", "l") == []
    with pytest.raises(NotFound):
        await content.info("ns1", DIGEST)
    assert (await content.info("ns2", DIGEST)).size == len(DATA)
    assert DIGEST in backend.blobs  # only GC removes blobs
    with pytest.raises(NotFound):
        await content.delete("ns1", DIGEST)


async def test_update_field_masks(content: NamespacedContent) -> None:
    await put(content, "default", DATA, {"a": "1", "b": "2"})
    info = await content.info("default", DIGEST)
    info.labels = {"a": "x", "c": "3"}
    updated = await content.update("default", info, ["labels.c", "labels.b"])
    assert updated.labels == {"a": "1", "c": "3"}
    assert updated.updated_at >= updated.created_at
    updated = await content.update("default", info)
    assert updated.labels == {"a": "x", "c": "3"}
    assert (await content.info("default", DIGEST)).labels == {"a": "x", "c": "3"}
    with pytest.raises(InvalidArgument, match=r'cannot update "size" field'):
        await content.update("default", info, ["size"])
    with pytest.raises(NotFound):
        await content.update("other", info)


async def test_walk_filters(content: NamespacedContent) -> None:
    d1 = await put(content, "default", b"one", {"kind": "layer"})
    d2 = await put(content, "default", b"two", {"kind": "config"})
    assert {i.digest for i in await infos(content, "default")} == {d1, d2}
    assert [i.digest for i in await infos(content, "default", "labels.kind==layer")] == [d1]
    assert [i.digest for i in await infos(content, "default", f"digest=={d2}")] == [d2]
    assert {i.digest for i in await infos(content, "default", "size==3")} == {d1, d2}
    with pytest.raises(InvalidArgument):
        await infos(content, "default", "labels.")


async def test_digest_and_ref_validation(content: NamespacedContent) -> None:
    with pytest.raises(InvalidArgument, match=r'^digest "sha256:xyz": invalid digest'):
        await content.info("default", "sha256:xyz")
    with pytest.raises(InvalidArgument, match=r'^expected "nope": invalid digest'):
        await content.writer("default", "r", 0, "nope")
    with pytest.raises(InvalidArgument, match="ref: must not be empty"):
        await content.writer("default", "")
    with pytest.raises(InvalidArgument, match="total must be a non-negative integer"):
        await content.writer("default", "r", -1)
    w = await content.writer("default", "r")
    await w.write(DATA)
    with pytest.raises(InvalidArgument, match=r'^expected "bad": invalid digest'):
        await w.commit(0, "bad")
    with pytest.raises(InvalidArgument, match=r'^ingest "r": label "k": key and value length'):
        await w.commit(0, "", {"k": "v" * 5000})
    assert (await content.status("default", "r")).offset == len(DATA)  # nothing published
    with pytest.raises(FailedPrecondition, match="namespace is required"):
        await content.info("", DIGEST)


async def test_leases_follow_the_ingest_into_content(
    content: NamespacedContent, store: MetadataStore
) -> None:
    await store.leases.create("default", "pull")
    w = await content.writer("default", "layer", len(DATA), lease="pull")
    assert await store.leases.list_resources("default", "pull") == [LeaseResource("layer", "ingests")]
    await w.write(DATA)
    await w.commit(len(DATA), DIGEST)
    assert await store.leases.list_resources("default", "pull") == [LeaseResource(DIGEST, "content")]
    with pytest.raises(NotFound, match='lease "gone": not found'):
        await content.writer("default", "x", lease="gone")


async def test_unleased_ingests_expire(content: NamespacedContent, store: MetadataStore) -> None:
    await store.leases.create("default", "pull")
    await content.writer("default", "leased", lease="pull")
    await content.writer("default", "free")

    def expiry(conn: sqlite3.Connection) -> dict[str, int | None]:
        return dict(conn.execute("SELECT ref, expires_at FROM ingests").fetchall())

    got = await store.read(expiry)
    assert got["leased"] is None
    assert got["free"] is not None


async def test_namespace_with_content_or_ingests_cannot_be_deleted(
    content: NamespacedContent, store: MetadataStore
) -> None:
    await content.writer("busy", "r")
    with pytest.raises(FailedPrecondition) as info:
        await store.namespaces.delete("busy")
    assert str(info.value) == 'namespace "busy" must be empty, but it still has ingests'
    await content.abort("busy", "r")
    await put(content, "busy", DATA)
    with pytest.raises(FailedPrecondition, match=r"still has content$"):
        await store.namespaces.delete("busy")
    await content.delete("busy", DIGEST)
    await store.namespaces.delete("busy")


async def test_view_is_a_content_store(content: NamespacedContent, store: MetadataStore) -> None:
    await store.leases.create("k8s.io", "pull")
    view = content.namespace("k8s.io", lease="pull")
    assert isinstance(view, ContentStore)
    w = await view.writer("ref", len(DATA), DIGEST)
    await w.write(DATA)
    assert await w.commit(len(DATA), DIGEST) == DIGEST
    assert (await view.info(DIGEST)).size == len(DATA)
    assert [i.digest async for i in view.walk()] == [DIGEST]
    assert await store.leases.list_resources("k8s.io", "pull") == [LeaseResource(DIGEST, "content")]
    await view.delete(DIGEST)
    with pytest.raises(NotFound):
        await view.info(DIGEST)
    with pytest.raises(InvalidArgument):
        content.namespace("Bad NS")


# -- the ContentStore conformance suite, through a namespace ------------------------


@pytest.fixture
async def view_factory() -> AsyncIterator[StoreFactory]:
    """Views of one namespace; a second call on a root is a restart (new DB handle, same backend)."""
    opened: list[MetadataStore] = []
    backends: dict[Path, FakeContentStore] = {}

    async def make(root: Path) -> ContentStore:
        store = await MetadataStore.open(root / "meta.db")
        opened.append(store)
        backend = backends.setdefault(root, FakeContentStore())
        return NamespacedContent(store, backend).namespace("conformance")

    try:
        yield make
    finally:
        for store in reversed(opened):
            await store.close()


@pytest.mark.parametrize("name", sorted(CASES))
async def test_view_passes_the_content_conformance_suite(
    name: str, view_factory: StoreFactory, tmp_path: Path
) -> None:
    await CASES[name](view_factory, tmp_path / "root")
