"""The pre-encoded List path answers byte-for-byte what the message path would, for every filter."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any, cast

import pytest

from plugins.cri.container.manager import ContainerManager
from plugins.cri.container.rpc import ContainerRpcs
from plugins.cri.sandbox.manager import SandboxManager
from plugins.cri.sandbox.rpc import SandboxRpcs
from plugins.cri.store import (
    ContainerMeta,
    ContainerStatus,
    CriContainer,
    CriStore,
    Entry,
    Sandbox,
    SandboxMeta,
    SandboxStatus,
)
from plugins.cri.wirecache import EncodedEntries, join_field1, preencoded, varint
from protos.runtime import v1 as cri

STATES = ("created", "running", "exited", "unknown")


class Rpcs(ContainerRpcs, SandboxRpcs):
    """The two List mixins over real managers (nothing else of them is touched)."""


def sandbox(i: int) -> Sandbox:
    config = cri.PodSandboxConfig(
        metadata=cri.PodSandboxMetadata(name=f"pod{i}", namespace="ns", uid=f"uid{i}", attempt=i % 2),
        labels={"app": "a" if i % 2 else "b", "i": str(i)},
        annotations={"note": "x" * i},
    )
    return Entry(
        SandboxMeta(id=f"{i:02d}" + "f" * 62, name=f"pod{i}", config=bytes(config), runtime_handler="runc"),
        SandboxStatus(state="ready" if i % 3 else "notready", created_at=1_700_000_000_000_000_000 - i),
        dict(config.labels),
        dict(config.annotations),
    )


def container(i: int, sandbox_id: str) -> CriContainer:
    config = cri.ContainerConfig(
        metadata=cri.ContainerMetadata(name=f"c{i}", attempt=i % 3),
        image=cri.ImageSpec(image="busybox:latest", annotations={"a": "b"} if i % 2 else {}),
        labels={"app": "a" if i % 2 else "b", "i": str(i)},
        annotations={"k": "v" * (i * 40)},  # some entries longer than 127 bytes: 2-byte varints
    )
    return Entry(
        ContainerMeta(
            id=f"{i:02d}" + "e" * 62,
            name=f"c{i}",
            sandbox_id=sandbox_id,
            config=bytes(config),
            image_ref="sha256:" + "1" * 64,
        ),
        ContainerStatus(state=STATES[i % 4], created_at=1_700_000_000_000_000_000 + i),
        dict(config.labels),
        dict(config.annotations),
    )


@pytest.fixture
def rpcs(tmp_path: Path) -> Rpcs:
    store = CriStore(cast(Any, None), tmp_path)
    sandboxes = [sandbox(i) for i in range(7)]
    for sb in sandboxes:
        store.sandboxes[sb.id] = sb
    for i in range(13):
        c = container(i, sandboxes[i % 3].id)
        store.containers[c.id] = c
    none = cast(Any, None)
    out = Rpcs()
    out.containers = ContainerManager(
        store=store,
        tasks=none,
        images=none,
        records=none,
        snapshotter=none,
        leases=none,
        bus=none,
        state=tmp_path,
    )
    out.sandbox_manager = SandboxManager(store, none, none, none, state_dir=tmp_path)
    return out


def container_filters(rpcs: Rpcs) -> list[cri.ContainerFilter | None]:
    ids = list(rpcs.containers.store.containers)
    pods = list(rpcs.containers.store.sandboxes)
    out: list[cri.ContainerFilter | None] = [None, cri.ContainerFilter()]
    for id_, pod, state, labels in itertools.product(
        ["", ids[0], ids[5][:2], "zz"],
        ["", pods[1], pods[2][:3], "zz"],
        [None, *cri.ContainerState],
        [{}, {"app": "a"}, {"app": "b", "i": "4"}, {"nope": "x"}],
    ):
        f = cri.ContainerFilter(id=id_, pod_sandbox_id=pod, label_selector=labels)
        if state is not None:
            f.state = cri.ContainerStateValue(state=state)
        out.append(f)
    return out


def sandbox_filters(rpcs: Rpcs) -> list[cri.PodSandboxFilter]:
    ids = list(rpcs.containers.store.sandboxes)
    out = [cri.PodSandboxFilter()]
    for id_, state, labels in itertools.product(
        ["", ids[0], ids[4][:2], "zz"],
        [None, *cri.PodSandboxState],
        [{}, {"app": "a"}, {"app": "b", "i": "4"}, {"nope": "x"}],
    ):
        f = cri.PodSandboxFilter(id=id_, label_selector=labels)
        if state is not None:
            f.state = cri.PodSandboxStateValue(state=state)
        out.append(f)
    return out


def wire(msg: Any) -> Any:
    """The request as the server sees it: encoded by a client and parsed (filters' presence included)."""
    return type(msg)().parse(bytes(msg))


async def test_list_containers_equals_message_path_for_every_filter(rpcs: Rpcs) -> None:
    nonempty = 0
    for f in container_filters(rpcs):
        req = cri.ListContainersRequest() if f is None else wire(cri.ListContainersRequest(filter=f))
        fast = await rpcs.list_containers(req)
        expected = cri.ListContainersResponse(containers=rpcs.containers.select(req.filter))
        assert bytes(fast) == bytes(expected)
        decoded = cri.ListContainersResponse().parse(bytes(fast))
        assert decoded.containers == expected.containers
        nonempty += bool(expected.containers)
    assert nonempty > 30  # the filters do select something


async def test_list_pod_sandbox_equals_message_path_for_every_filter(rpcs: Rpcs) -> None:
    nonempty = 0
    for f in sandbox_filters(rpcs):
        req = wire(cri.ListPodSandboxRequest(filter=f))
        fast = await rpcs.list_pod_sandbox(req)
        expected = cri.ListPodSandboxResponse(items=rpcs._list(req.filter))
        assert bytes(fast) == bytes(expected)
        assert cri.ListPodSandboxResponse().parse(bytes(fast)).items == expected.items
        nonempty += bool(expected.items)
    assert nonempty > 10


async def test_stream_variants_chunk_the_same_entries(rpcs: Rpcs, monkeypatch: pytest.MonkeyPatch) -> None:
    import plugins.cri.container.rpc as crpc
    import plugins.cri.sandbox.rpc as srpc

    monkeypatch.setattr(crpc, "STREAM_CHUNK", 5)
    monkeypatch.setattr(srpc, "STREAM_CHUNK", 3)
    chunks = [bytes(r) async for r in rpcs.stream_containers(cri.StreamContainersRequest())]
    assert len(chunks) == 3  # 13 containers in 5s
    got = [c for b in chunks for c in cri.StreamContainersResponse().parse(b).containers]
    assert got == rpcs.containers.select(None)
    pods = [bytes(r) async for r in rpcs.stream_pod_sandboxes(cri.StreamPodSandboxesRequest())]
    assert len(pods) == 3  # 7 pods in 3s
    items = [p for b in pods for p in cri.StreamPodSandboxesResponse().parse(b).pod_sandboxes]
    assert items == rpcs._list(cri.PodSandboxFilter())
    none = cri.StreamContainersRequest(filter=cri.ContainerFilter(id="zz"))
    empty = [bytes(r) async for r in rpcs.stream_containers(none)]
    assert empty == [b""]  # one response, empty


async def test_state_change_reencodes_only_that_entry(rpcs: Rpcs) -> None:
    mgr = rpcs.containers
    await rpcs.list_containers(cri.ListContainersRequest())
    assert mgr.wire.encoded == 13
    await rpcs.list_containers(cri.ListContainersRequest())
    assert mgr.wire.encoded == 13  # all cached
    c = next(iter(mgr.store.containers.values()))
    c.status.state = "exited"
    resp = cri.ListContainersResponse().parse(bytes(await rpcs.list_containers(cri.ListContainersRequest())))
    assert mgr.wire.encoded == 14
    assert resp.containers[0].state == cri.ContainerState.CONTAINER_EXITED
    assert resp.containers == mgr.select(None)

    sm = rpcs.sandbox_manager
    await rpcs.list_pod_sandbox(cri.ListPodSandboxRequest())
    sb = next(s for s in sm.store.sandboxes.values() if s.status.state == "ready")
    before = sm.wire.encoded
    sb.status.state = "notready"
    items = cri.ListPodSandboxResponse().parse(
        bytes(await rpcs.list_pod_sandbox(cri.ListPodSandboxRequest()))
    )
    assert sm.wire.encoded == before + 1
    assert next(p for p in items.items if p.id == sb.id).state == cri.PodSandboxState.SANDBOX_NOTREADY


def test_varint_and_join() -> None:
    assert [varint(n) for n in (0, 1, 127, 128, 300, 16384)] == [
        b"\x00",
        b"\x01",
        b"\x7f",
        b"\x80\x01",
        b"\xac\x02",
        b"\x80\x80\x01",
    ]
    items = [cri.PodSandbox(id="a" * n) for n in (0, 1, 200)]
    assert join_field1(bytes(i) for i in items) == bytes(cri.ListPodSandboxResponse(items=items))
    msg = preencoded(cri.ListPodSandboxResponse, [])
    assert isinstance(msg, cri.ListPodSandboxResponse)
    assert msg.SerializeToString() == b""


def test_cache_keeps_until_version_changes() -> None:
    cache = EncodedEntries()
    built = []

    def build() -> cri.PodSandbox:
        built.append(1)
        return cri.PodSandbox(id="x")

    first = cache.get("x", ("ready",), build)
    assert cache.get("x", ("ready",), build) is first
    assert len(built) == 1
    cache.get("x", ("notready",), build)
    assert len(built) == 2
    cache.forget("x")
    assert len(cache) == 0
