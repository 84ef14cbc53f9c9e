"""Namespaced snapshots over a fake backend: keys, parents, commit, remove, labels, leases."""

from __future__ import annotations

import pytest

from daemon.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from daemon.metadata import LeaseResource, MetadataStore, NamespacedSnapshotter
from daemon.protocols import Kind, SnapshotInfo, Snapshotter, Usage
from tests.unit.fakes import FakeSnapshotter

LEASED = "snapshots/fake"


@pytest.fixture
def backend() -> FakeSnapshotter:
    return FakeSnapshotter()


@pytest.fixture
def sn(store: MetadataStore, backend: FakeSnapshotter) -> NamespacedSnapshotter:
    return NamespacedSnapshotter(store, "fake", backend)


async def layer(sn: NamespacedSnapshotter, ns: str, name: str, parent: str = "") -> None:
    await sn.prepare(ns, f"extract {name}", parent)
    await sn.commit(ns, name, f"extract {name}")


async def keys(sn: NamespacedSnapshotter, ns: str, *filters: str) -> list[str]:
    return [info.name async for info in sn.walk(ns, list(filters))]


async def test_prepare_commit_view_chain(sn: NamespacedSnapshotter, backend: FakeSnapshotter) -> None:
    mounts = await sn.prepare("default", "extract-1 sha256:a", labels={"l": "1"})
    assert mounts[0].type == "bind" and mounts[0].options == ("rw",)
    active = await sn.stat("default", "extract-1 sha256:a")
    assert (active.kind, active.name, active.parent, active.labels) == (
        Kind.ACTIVE,
        "extract-1 sha256:a",
        "",
        {"l": "1"},
    )
    await sn.commit("default", "sha256:a", "extract-1 sha256:a", {"c": "1"})
    with pytest.raises(NotFound, match='snapshot "extract-1 sha256:a": not found'):
        await sn.stat("default", "extract-1 sha256:a")
    committed = await sn.stat("default", "sha256:a")
    assert (committed.kind, committed.parent, committed.labels) == (Kind.COMMITTED, "", {"c": "1"})

    await layer(sn, "default", "sha256:b", "sha256:a")
    assert (await sn.stat("default", "sha256:b")).parent == "sha256:a"
    mounts = await sn.view("default", "ro-view", "sha256:b")
    assert mounts[0].options == ("ro",)
    assert (await sn.stat("default", "ro-view")).kind is Kind.VIEW
    assert await sn.mounts("default", "ro-view") == mounts

    # the backend knows unique, namespaced keys, with the same parent structure
    by_key = {info.name: info for info in backend.snapshots.values()}
    assert len(by_key) == 3
    assert all(k.startswith("default/") for k in by_key)
    [b] = [info for k, info in by_key.items() if k.endswith("/sha256:b")]
    assert b.parent.endswith("/sha256:a")
    assert await keys(sn, "default") == ["ro-view", "sha256:a", "sha256:b"]


async def test_same_key_in_two_namespaces(sn: NamespacedSnapshotter, backend: FakeSnapshotter) -> None:
    await sn.prepare("ns1", "rootfs")
    await sn.prepare("ns2", "rootfs")
    assert len(backend.snapshots) == 2
    await sn.remove("ns1", "rootfs")
    assert (await sn.stat("ns2", "rootfs")).kind is Kind.ACTIVE
    with pytest.raises(NotFound):
        await sn.stat("ns1", "rootfs")


async def test_parent_is_resolved_in_the_callers_namespace(sn: NamespacedSnapshotter) -> None:
    await layer(sn, "ns1", "base")
    with pytest.raises(NotFound, match='parent snapshot "base": not found'):
        await sn.prepare("ns2", "child", "base")
    await sn.prepare("ns1", "active")
    with pytest.raises(FailedPrecondition, match='parent snapshot "active": is not committed'):
        await sn.prepare("ns1", "child", "active")
    assert await keys(sn, "ns2") == []


async def test_commit_errors(sn: NamespacedSnapshotter, backend: FakeSnapshotter) -> None:
    await layer(sn, "default", "base")
    await sn.view("default", "v", "base")
    with pytest.raises(FailedPrecondition, match='snapshot "v": is a view snapshot'):
        await sn.commit("default", "x", "v")
    with pytest.raises(NotFound, match='snapshot "missing": not found'):
        await sn.commit("default", "x", "missing")
    await sn.prepare("default", "work", "base")
    with pytest.raises(AlreadyExists, match='snapshot "base": already exists'):
        await sn.commit("default", "base", "work")
    assert (await sn.stat("default", "work")).kind is Kind.ACTIVE  # untouched
    assert len(backend.snapshots) == 3


async def test_remove_refuses_parents_and_leaves_backend_to_gc(
    sn: NamespacedSnapshotter, backend: FakeSnapshotter
) -> None:
    calls: list[str] = []
    sn.on_remove = lambda: calls.append("gc")
    await layer(sn, "default", "base")
    await sn.prepare("default", "rootfs", "base")
    with pytest.raises(FailedPrecondition, match='snapshot "base": cannot remove a snapshot with children'):
        await sn.remove("default", "base")
    assert calls == []
    await sn.remove("default", "rootfs")
    await sn.remove("default", "base")
    assert calls == ["gc", "gc"]
    assert await keys(sn, "default") == []
    assert len(backend.snapshots) == 2  # removed from the backend by GC, not here
    with pytest.raises(NotFound):
        await sn.remove("default", "base")


async def test_update_labels_and_inherited_labels(
    sn: NamespacedSnapshotter, backend: FakeSnapshotter
) -> None:
    labels = {"a": "1", "containerd.io/snapshot/remote": "yes"}
    await sn.prepare("default", "k", labels=labels)
    [backend_info] = backend.snapshots.values()
    assert backend_info.labels == {"containerd.io/snapshot/remote": "yes"}  # only inherited labels

    info = await sn.stat("default", "k")
    info.labels = {"a": "2", "b": "3"}
    updated = await sn.update("default", info, ["labels.b"])
    assert updated.labels == {"a": "1", "b": "3", "containerd.io/snapshot/remote": "yes"}
    updated = await sn.update("default", SnapshotInfo(Kind.ACTIVE, "k", labels={"only": "x"}))
    assert updated.labels == {"only": "x"}
    assert (await sn.stat("default", "k")).labels == {"only": "x"}
    with pytest.raises(InvalidArgument, match=r'snapshot "k": cannot update "parent" field'):
        await sn.update("default", info, ["parent"])
    with pytest.raises(InvalidArgument, match="snapshot name is required"):
        await sn.update("default", SnapshotInfo(Kind.ACTIVE, ""))
    with pytest.raises(NotFound):
        await sn.update("default", SnapshotInfo(Kind.ACTIVE, "nope"))


async def test_walk_filters(sn: NamespacedSnapshotter) -> None:
    await layer(sn, "default", "base")
    await sn.prepare("default", "rootfs", "base", {"app": "web"})
    await sn.view("default", "peek", "base")
    assert await keys(sn, "default", "kind==committed") == ["base"]
    assert await keys(sn, "default", "kind==active") == ["rootfs"]
    assert await keys(sn, "default", "parent==base") == ["peek", "rootfs"]
    assert await keys(sn, "default", "labels.app==web") == ["rootfs"]
    assert await keys(sn, "default", "name~=^p", "kind==committed") == ["base", "peek"]
    with pytest.raises(InvalidArgument):
        await keys(sn, "default", "kind==")


async def test_usage_and_mounts_go_to_the_backend(
    sn: NamespacedSnapshotter, backend: FakeSnapshotter
) -> None:
    await sn.prepare("default", "k")
    [backend_key] = backend.snapshots
    assert await sn.usage("default", "k") == Usage(len(backend_key), 100 * len(backend_key))
    assert (await sn.mounts("default", "k"))[0].source == f"/fake/{backend_key}"
    with pytest.raises(NotFound):
        await sn.usage("other", "k")


async def test_existing_key_is_refused_and_leased(sn: NamespacedSnapshotter, store: MetadataStore) -> None:
    await sn.prepare("default", "k")
    await store.leases.create("default", "l")
    with pytest.raises(AlreadyExists, match='snapshot "k": already exists'):
        await sn.prepare("default", "k", lease="l")
    assert await store.leases.list_resources("default", "l") == [LeaseResource("k", LEASED)]


async def test_leases_follow_commit(sn: NamespacedSnapshotter, store: MetadataStore) -> None:
    await store.leases.create("default", "unpack")
    await sn.prepare("default", "extract", lease="unpack")
    assert await store.leases.list_resources("default", "unpack") == [LeaseResource("extract", LEASED)]
    await sn.commit("default", "sha256:c", "extract")
    assert await store.leases.list_resources("default", "unpack") == [LeaseResource("sha256:c", LEASED)]
    await sn.remove("default", "sha256:c")
    assert await store.leases.list_resources("default", "unpack") == []
    with pytest.raises(NotFound, match='lease "gone": not found'):
        await sn.prepare("default", "x", lease="gone")


async def test_backend_failure_leaves_no_record(sn: NamespacedSnapshotter, backend: FakeSnapshotter) -> None:
    backend.fail_prepare = FailedPrecondition("disk full")
    with pytest.raises(FailedPrecondition, match="disk full"):
        await sn.prepare("default", "k")
    assert await keys(sn, "default") == []
    backend.fail_prepare = None
    await sn.prepare("default", "k")
    assert await keys(sn, "default") == ["k"]


async def test_key_validation(sn: NamespacedSnapshotter) -> None:
    with pytest.raises(InvalidArgument, match="snapshot key: must not be empty"):
        await sn.prepare("default", "")
    with pytest.raises(InvalidArgument, match="must not contain control characters"):
        await sn.prepare("default", "a\nb")
    with pytest.raises(InvalidArgument, match="parent"):
        await sn.prepare("default", "a", "b\tc")
    with pytest.raises(InvalidArgument, match="snapshotter"):
        NamespacedSnapshotter(sn.store, "bad/name", sn.backend)
    await sn.prepare("default", "extract-123 sha256:" + "a" * 64)  # containerd's unpack keys have a space


async def test_namespace_with_snapshots_cannot_be_deleted(
    sn: NamespacedSnapshotter, store: MetadataStore
) -> None:
    await sn.prepare("busy", "k")
    with pytest.raises(FailedPrecondition) as info:
        await store.namespaces.delete("busy")
    assert str(info.value) == 'namespace "busy" must be empty, but it still has snapshots'
    await sn.remove("busy", "k")
    await store.namespaces.delete("busy")


async def test_view_is_a_snapshotter(sn: NamespacedSnapshotter, store: MetadataStore) -> None:
    await store.leases.create("k8s.io", "l")
    view = sn.namespace("k8s.io", lease="l")
    assert isinstance(view, Snapshotter)
    await view.prepare("a")
    await view.commit("b", "a")
    await view.view("v", "b")
    assert [i.name async for i in view.walk()] == ["b", "v"]
    assert (await view.stat("b")).kind is Kind.COMMITTED
    assert sorted(r.id for r in await store.leases.list_resources("k8s.io", "l")) == ["b", "v"]
    await view.remove("v")
    await view.cleanup()
    assert sn.backend.cleanups == 1  # type: ignore[attr-defined]
    await view.close()
