"""The Content service of a real berthd: the project's stubs, and Debian's ``ctr`` as a containerd client."""

from __future__ import annotations

import asyncio
import hashlib
import random
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any, TypeVar

import betterproto.lib.google.protobuf as pb
import pytest
from grpclib.client import Channel
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from protos.containerd.services.content.v1 import (
    AbortRequest,
    ContentStub,
    DeleteContentRequest,
    Info,
    InfoRequest,
    ListContentRequest,
    ListStatusesRequest,
    ReadContentRequest,
    StatusRequest,
    UpdateRequest,
    WriteAction,
    WriteContentRequest,
    WriteContentResponse,
)
from protos.containerd.services.leases.v1 import CreateRequest, DeleteRequest, LeasesStub
from tests.integration.conftest import Berthd, ctr_argv, grpc_error, headers, wait_for

T = TypeVar("T")
MiB = 1 << 20


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def content(channel: Channel, ns: str = "default", lease: str = "") -> ContentStub:
    return ContentStub(channel, timeout=20, metadata=headers(ns, lease))


async def lease(channel: Channel, ns: str, lease_id: str) -> None:
    """A lease holding what the test writes: the startup GC must not collect it."""
    await LeasesStub(channel, timeout=10, metadata=headers(ns)).create(CreateRequest(id=lease_id))


async def write_all(stub: ContentStub, reqs: Iterable[WriteContentRequest]) -> list[WriteContentResponse]:
    return [resp async for resp in stub.write(list(reqs))]


def write_requests(
    ref: str, data: bytes, *, chunk: int = MiB, labels: dict[str, str] | None = None, start: int = 0
) -> list[WriteContentRequest]:
    """What containerd's remote writer sends: STAT, WRITEs at their offsets, COMMIT."""
    digest = digest_of(data)
    reqs = [WriteContentRequest(action=WriteAction.STAT, ref=ref, total=len(data), expected=digest)]
    reqs += [
        WriteContentRequest(action=WriteAction.WRITE, offset=o, data=data[o : o + chunk])
        for o in range(start, len(data), chunk)
    ]
    reqs.append(
        WriteContentRequest(
            action=WriteAction.COMMIT, offset=len(data), total=len(data), expected=digest, labels=labels or {}
        )
    )
    return reqs


async def stream_error(stream: AsyncIterator[Any]) -> GRPCError:
    with pytest.raises(GRPCError) as err:
        async for _ in stream:
            pass
    return err.value


async def retry_unavailable(fn: Callable[[], Awaitable[T]], timeout: float = 10.0) -> T:
    """Call ``fn`` until the server stops answering UNAVAILABLE (a ref still locked by a dropped stream)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await fn()
        except GRPCError as exc:
            if exc.status is not Status.UNAVAILABLE or time.monotonic() > deadline:
                raise
        await asyncio.sleep(0.05)


def ctr(
    d: Berthd, *args: str, ns: str = "default", stdin: bytes | None = None
) -> subprocess.CompletedProcess[bytes]:
    """``ctr`` with bytes in and out: blobs go through stdin and stdout unchanged."""
    return subprocess.run(
        ctr_argv(d, *args, ns=ns), input=stdin, capture_output=True, timeout=30, check=False
    )


def startup_gc_done(d: Berthd) -> None:
    """The collection requested at start has run: unreferenced objects made now stay until a delete."""
    wait_for(lambda: "gc.done" in d.log(), what="the startup garbage collection")


# -- write, read, info, list, update, delete ------------------------------------------------------


async def test_write_then_read_info_list_update_delete(channel: Channel) -> None:
    await lease(channel, "c1", "hold")
    cs = content(channel, "c1", "hold")
    data = random.Random(1).randbytes(2 * MiB + 12345)
    digest = digest_of(data)
    resps = await write_all(cs, write_requests("blob-1", data, chunk=700_000, labels={"kind": "test"}))
    stat, *writes, commit = resps
    assert stat.action == WriteAction.STAT and stat.offset == 0 and stat.total == len(data)
    assert stat.started_at.year >= 2024
    assert [w.offset for w in writes] == [700_000, 1_400_000, 2_100_000, len(data)]
    assert commit.action == WriteAction.COMMIT and commit.offset == len(data) and commit.digest == digest

    info = (await cs.info(InfoRequest(digest=digest))).info
    assert (info.digest, info.size, info.labels) == (digest, len(data), {"kind": "test"})
    assert info.created_at.year >= 2024

    chunks = [r async for r in cs.read(ReadContentRequest(digest=digest))]
    assert [c.offset for c in chunks] == [0, MiB, 2 * MiB]  # 1 MiB per response
    assert b"".join(c.data for c in chunks) == data
    part = [r async for r in cs.read(ReadContentRequest(digest=digest, offset=100, size=50))]
    assert [(p.offset, p.data) for p in part] == [(100, data[100:150])]
    tail = [r async for r in cs.read(ReadContentRequest(digest=digest, offset=len(data) - 3, size=99))]
    assert b"".join(t.data for t in tail) == data[-3:]
    err = await stream_error(cs.read(ReadContentRequest(digest=digest, offset=len(data) + 1)))
    assert err.status is Status.OUT_OF_RANGE
    err = await stream_error(cs.read(ReadContentRequest(digest=digest, offset=-1)))
    assert err.status is Status.INVALID_ARGUMENT and "offset" in (err.message or "")

    small = b"small blob"
    await write_all(cs, write_requests("blob-2", small))
    listed = [i.digest async for r in cs.list(ListContentRequest()) for i in r.info]
    assert sorted(listed) == sorted([digest, digest_of(small)])
    only = [
        i.digest async for r in cs.list(ListContentRequest(filters=["labels.kind==test"])) for i in r.info
    ]
    assert only == [digest]
    err = await stream_error(cs.list(ListContentRequest(filters=["labels.kind=="])))
    assert err.status is Status.INVALID_ARGUMENT

    upd = await cs.update(
        UpdateRequest(
            info=Info(digest=digest, labels={"extra": "1", "kind": "ignored"}),
            update_mask=_mask("labels.extra"),
        )
    )
    assert upd.info.labels == {"kind": "test", "extra": "1"}
    replaced = await cs.update(UpdateRequest(info=Info(digest=digest, labels={"only": "me"})))
    assert replaced.info.labels == {"only": "me"}
    err = await grpc_error(cs.update(UpdateRequest(info=Info(digest=digest), update_mask=_mask("size"))))
    assert err.status is Status.INVALID_ARGUMENT and "size" in (err.message or "")

    # another namespace sees none of it
    other = content(channel, "c2")
    err = await grpc_error(other.info(InfoRequest(digest=digest)))
    assert err.status is Status.NOT_FOUND
    assert [r async for r in other.list(ListContentRequest())] == []

    await cs.delete(DeleteContentRequest(digest=digest))
    err = await grpc_error(cs.info(InfoRequest(digest=digest)))
    assert err.status is Status.NOT_FOUND and digest in (err.message or "")
    err = await grpc_error(cs.delete(DeleteContentRequest(digest=digest)))
    assert err.status is Status.NOT_FOUND


def _mask(*paths: str) -> pb.FieldMask:
    return pb.FieldMask(paths=list(paths))


async def test_requests_are_validated_field_by_field(channel: Channel) -> None:
    cs = content(channel, "v1")
    for call, field in [
        (cs.info(InfoRequest(digest="")), "digest"),
        (cs.info(InfoRequest(digest="sha256:nothex")), "digest"),
        (cs.update(UpdateRequest(info=Info(digest=""))), "info.digest"),
        (cs.delete(DeleteContentRequest(digest="md5:00")), "digest"),
        (cs.status(StatusRequest(ref="")), "ref"),
        (cs.abort(AbortRequest(ref="")), "ref"),
    ]:
        err = await grpc_error(call)
        assert err.status is Status.INVALID_ARGUMENT, (field, err)
        assert (err.message or "").startswith(field), (field, err.message)
    err = await stream_error(cs.read(ReadContentRequest(digest=digest_of(b"x"), size=-5)))
    assert err.status is Status.INVALID_ARGUMENT and "size" in (err.message or "")
    err = await stream_error(cs.write([WriteContentRequest(action=WriteAction.STAT)]))
    assert err.status is Status.INVALID_ARGUMENT and "ref" in (err.message or "")
    err = await stream_error(cs.write([WriteContentRequest(ref="r", expected="sha256:short")]))
    assert err.status is Status.INVALID_ARGUMENT and "expected" in (err.message or "")
    err = await stream_error(cs.write([WriteContentRequest(ref="r", total=-1)]))
    assert err.status is Status.INVALID_ARGUMENT and "total" in (err.message or "")
    no_ns = ContentStub(channel, timeout=10)
    err = await grpc_error(no_ns.info(InfoRequest(digest=digest_of(b"x"))))
    assert err.status is Status.FAILED_PRECONDITION and "namespace" in (err.message or "")
    err = await stream_error(content(channel, "v1", "no-such-lease").write(write_requests("r", b"abc")))
    assert err.status is Status.NOT_FOUND and "no-such-lease" in (err.message or "")


# -- ingests: resume, status, abort, conflicts ------------------------------------------------------


async def test_write_resumes_after_a_dropped_stream(channel: Channel, berthd: Berthd) -> None:
    await lease(channel, "r1", "hold")
    cs = content(channel, "r1", "hold")
    data = random.Random(2).randbytes(3 * MiB)
    digest, half = digest_of(data), 1_500_000
    got: list[WriteContentResponse] = []
    written = asyncio.Event()

    async def first_half() -> AsyncIterator[WriteContentRequest]:
        yield WriteContentRequest(action=WriteAction.STAT, ref="resumable", total=len(data), expected=digest)
        yield WriteContentRequest(action=WriteAction.WRITE, offset=0, data=data[:half])
        await asyncio.Event().wait()  # the client goes away before committing

    async def run() -> None:
        async for resp in cs.write(first_half()):
            got.append(resp)
            if len(got) == 2:
                written.set()

    task = asyncio.create_task(run())
    try:
        await asyncio.wait_for(written.wait(), 20)
    finally:
        task.cancel()
    assert got[1].offset == half

    status = (await cs.status(StatusRequest(ref="resumable"))).status
    assert (status.ref, status.offset, status.total, status.expected) == (
        "resumable",
        half,
        len(data),
        digest,
    )
    active = ctr(berthd, "content", "active", ns="r1")
    assert active.returncode == 0, active.stderr
    assert "resumable" in active.stdout.decode()

    # the dropped stream's lock goes with it; then a write at the wrong offset is refused ...
    stat = WriteContentRequest(action=WriteAction.STAT, ref="resumable")
    wrong_offset = WriteContentRequest(action=WriteAction.WRITE, offset=7, data=b"x")
    err = await retry_unavailable(lambda: stream_error(cs.write([stat, wrong_offset])))
    assert err.status is Status.OUT_OF_RANGE and str(half) in (err.message or "")

    # ... and a new stream picks up at the offset STAT reports
    async def resume() -> list[WriteContentResponse]:
        return await write_all(cs, write_requests("resumable", data, chunk=MiB, start=half))

    resps = await retry_unavailable(resume)
    assert resps[0].offset == half and resps[0].total == len(data)
    assert resps[-1].digest == digest and resps[-1].offset == len(data)
    assert b"".join([r.data async for r in cs.read(ReadContentRequest(digest=digest))]) == data
    err = await grpc_error(cs.status(StatusRequest(ref="resumable")))
    assert err.status is Status.NOT_FOUND


async def test_status_list_statuses_abort_and_restart(channel: Channel) -> None:
    await lease(channel, "s1", "hold")
    cs = content(channel, "s1", "hold")
    data = b"0123456789" * 1000
    digest = digest_of(data)
    for ref in ("ingest-a", "ingest-b"):
        await write_all(
            cs,
            [
                WriteContentRequest(action=WriteAction.STAT, ref=ref, total=len(data), expected=digest),
                WriteContentRequest(action=WriteAction.WRITE, offset=0, data=data[:4000]),
            ],
        )
    statuses = (await cs.list_statuses(ListStatusesRequest())).statuses
    assert [(s.ref, s.offset, s.total) for s in statuses] == [
        ("ingest-a", 4000, len(data)),
        ("ingest-b", 4000, len(data)),
    ]
    only = (await cs.list_statuses(ListStatusesRequest(filters=["ref==ingest-b"]))).statuses
    assert [s.ref for s in only] == ["ingest-b"]

    # offset 0 on an ingest holding data starts it over (containerd's rule)
    resps = await write_all(
        cs,
        [
            WriteContentRequest(action=WriteAction.STAT, ref="ingest-b"),
            WriteContentRequest(action=WriteAction.WRITE, offset=0, data=b"fresh"),
        ],
    )
    assert [r.offset for r in resps] == [4000, 5]
    assert resps[1].digest == digest_of(b"fresh")

    await cs.abort(AbortRequest(ref="ingest-a"))
    err = await grpc_error(cs.status(StatusRequest(ref="ingest-a")))
    assert err.status is Status.NOT_FOUND
    err = await grpc_error(cs.abort(AbortRequest(ref="ingest-a")))
    assert err.status is Status.NOT_FOUND
    assert [s.ref for s in (await cs.list_statuses(ListStatusesRequest())).statuses] == ["ingest-b"]


async def test_commit_mismatch_keeps_the_ingest_and_duplicates_already_exist(channel: Channel) -> None:
    await lease(channel, "m1", "hold")
    cs = content(channel, "m1", "hold")
    data = b"payload " * 100
    wrong = digest_of(b"something else")
    err = await stream_error(
        cs.write(
            [
                WriteContentRequest(action=WriteAction.STAT, ref="mismatch"),
                WriteContentRequest(action=WriteAction.COMMIT, offset=0, data=data, expected=wrong),
            ]
        )
    )
    assert err.status is Status.FAILED_PRECONDITION and wrong in (err.message or "")
    status = (await cs.status(StatusRequest(ref="mismatch"))).status
    assert status.offset == len(data)

    await write_all(cs, write_requests("first", data))
    # announcing a blob the namespace has is ALREADY_EXISTS at once (clients treat it as done)
    err = await stream_error(cs.write(write_requests("second", data)))
    assert err.status is Status.ALREADY_EXISTS

    # another namespace writing the same blob shares it: STAT reports it complete
    await lease(channel, "m2", "hold")
    other = content(channel, "m2", "hold")
    resps = await write_all(
        other,
        [
            WriteContentRequest(action=WriteAction.STAT, ref="x", total=len(data), expected=digest_of(data)),
            WriteContentRequest(
                action=WriteAction.COMMIT, offset=len(data), total=len(data), expected=digest_of(data)
            ),
        ],
    )
    assert resps[0].offset == len(data) and resps[1].digest == digest_of(data)
    assert (await other.info(InfoRequest(digest=digest_of(data)))).info.size == len(data)


async def test_a_second_writer_on_the_same_ref_is_unavailable(channel: Channel) -> None:
    await lease(channel, "l1", "hold")
    cs = content(channel, "l1", "hold")
    opened = asyncio.Event()
    release = asyncio.Event()

    async def holding() -> AsyncIterator[WriteContentRequest]:
        yield WriteContentRequest(action=WriteAction.STAT, ref="busy")
        await release.wait()

    async def first() -> None:
        async for _ in cs.write(holding()):
            opened.set()

    task = asyncio.create_task(first())
    try:
        await asyncio.wait_for(opened.wait(), 10)
        err = await stream_error(cs.write([WriteContentRequest(action=WriteAction.STAT, ref="busy")]))
        assert err.status is Status.UNAVAILABLE and "locked" in (err.message or "")
    finally:
        release.set()
        await asyncio.wait_for(task, 10)
    # once the first stream ended, the ref is free again
    resps = await retry_unavailable(
        lambda: write_all(cs, [WriteContentRequest(action=WriteAction.STAT, ref="busy")])
    )
    assert resps[0].offset == 0


# -- ctr --------------------------------------------------------------------------------------------


async def test_ctr_content_ingest_ls_get_label_rm(berthd: Berthd, channel: Channel) -> None:
    startup_gc_done(berthd)
    data = b"hello from ctr\n" * 50
    digest = digest_of(data)
    ingest = ctr(
        berthd,
        "content",
        "ingest",
        "--expected-size",
        str(len(data)),
        "--expected-digest",
        digest,
        "ctr-ref",
        stdin=data,
    )
    assert ingest.returncode == 0, ingest.stderr
    listed = ctr(berthd, "content", "ls").stdout.decode().splitlines()
    assert listed[0].split()[:2] == ["DIGEST", "SIZE"]
    assert any(line.startswith(digest) for line in listed[1:])
    got = ctr(berthd, "content", "get", digest)
    assert got.returncode == 0 and got.stdout == data
    labelled = ctr(berthd, "content", "label", digest, "containerd.io/gc.root=now", "team=a")
    assert labelled.returncode == 0, labelled.stderr
    info = (await content(channel).info(InfoRequest(digest=digest))).info
    assert info.labels == {"containerd.io/gc.root": "now", "team": "a"}
    assert ctr(berthd, "content", "rm", digest).returncode == 0
    assert digest not in ctr(berthd, "content", "ls", "-q").stdout.decode()


async def test_ctr_leases_hold_content_until_removed_with_sync(berthd: Berthd, channel: Channel) -> None:
    made = ctr(berthd, "leases", "create", "--id", "keep", ns="lz")
    assert made.returncode == 0, made.stderr
    held = b"held by a lease"
    await write_all(content(channel, "lz", "keep"), write_requests("held", held))
    # a collection (triggered by a delete) keeps the leased blob
    await lease(channel, "lz", "throwaway")
    await LeasesStub(channel, timeout=10, metadata=headers("lz")).delete(
        DeleteRequest(id="throwaway", sync=True)
    )
    assert digest_of(held) in ctr(berthd, "content", "ls", "-q", ns="lz").stdout.decode()
    assert "keep" in ctr(berthd, "leases", "ls", ns="lz").stdout.decode()
    rm = ctr(berthd, "leases", "rm", "--sync", "keep", ns="lz")
    assert rm.returncode == 0, rm.stderr
    assert ctr(berthd, "content", "ls", "-q", ns="lz").stdout.decode().split() == []
    assert ctr(berthd, "namespaces", "rm", "lz").returncode == 0
