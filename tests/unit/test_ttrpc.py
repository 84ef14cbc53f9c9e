"""ttrpc framing, client and server, against upstream's wire format (containerd/ttrpc)."""

from __future__ import annotations

import asyncio
import os
import re
import socket
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from betterproto.lib.google.protobuf import Empty
from grpclib.const import Status as Code

from daemon.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    NotFound,
    ResourceExhausted,
    Unavailable,
    Unimplemented,
)
from daemon.ttrpc import TtrpcClient, TtrpcServer, request_metadata
from daemon.ttrpc.frame import (
    MESSAGE_LENGTH_MAX,
    Header,
    KeyValue,
    MessageType,
    Request,
    Response,
    decode_header,
    encode_frame,
    encode_header,
    read_frame,
)
from daemon.ttrpc.services import TASK_METHODS, TASK_SERVICE, bind, snake_case
from protos.containerd.task.v2 import KillRequest, StateRequest, StateResponse


class FakeTask:
    """A containerd.task.v2.Task implementation whose behaviour each test steers."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.blocked = asyncio.Event()
        self.cancelled = asyncio.Event()
        self.arrived = 0
        self.all_arrived = asyncio.Event()
        self.expect = 0
        self.metadata: dict[str, list[str]] = {}

    async def state(self, req: StateRequest) -> StateResponse:
        self.metadata = request_metadata()
        if req.id == "missing":
            raise NotFound(f'task "{req.id}": not found')
        if req.id == "bug":
            raise RuntimeError("boom")
        if req.id == "huge":
            return StateResponse(id=req.id, bundle="x" * (MESSAGE_LENGTH_MAX + 1))
        if req.id == "block":
            self.blocked.set()
            try:
                await self.release.wait()
            except asyncio.CancelledError:
                self.cancelled.set()
                raise
        if req.id.startswith("together"):
            self.arrived += 1
            if self.arrived == self.expect:
                self.all_arrived.set()
            await self.all_arrived.wait()
        return StateResponse(id=req.id, bundle=f"/run/{req.id}", pid=42, exec_id=req.exec_id)

    async def kill(self, req: KillRequest) -> Empty:
        return Empty()


@pytest.fixture
def sock(tmp_path: Path) -> Path:
    path = tmp_path / "s.sock"
    assert len(str(path)) < 100, "unix socket path too long for this tmp_path"
    return path


@pytest.fixture
def task() -> FakeTask:
    return FakeTask()


@pytest.fixture
async def server(sock: Path, task: FakeTask) -> AsyncIterator[TtrpcServer]:
    srv = TtrpcServer({TASK_SERVICE: bind(TASK_METHODS, task)})
    await srv.start(sock)
    try:
        yield srv
    finally:
        task.release.set()
        await srv.stop()


@pytest.fixture
async def client(server: TtrpcServer, sock: Path) -> AsyncIterator[TtrpcClient]:
    c = await TtrpcClient.connect(sock)
    try:
        yield c
    finally:
        await c.close()


async def state(client: TtrpcClient, task_id: str, timeout: float | None = None) -> StateResponse:
    return await client.call(TASK_SERVICE, "State", StateRequest(id=task_id), StateResponse, timeout=timeout)


class Raw:
    """A hand-driven connection, to send what our client never would."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, path: Path) -> Raw:
        return cls(*await asyncio.open_unix_connection(str(path)))

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def response(self) -> tuple[int, Response]:
        frame = await asyncio.wait_for(read_frame(self.reader), 5)
        assert frame.header.type == MessageType.RESPONSE
        return frame.header.stream_id, Response().parse(frame.payload)

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()


def state_request(sid: int, task_id: str = "c1", timeout_nano: int = 0) -> bytes:
    req = Request(
        service=TASK_SERVICE,
        method="State",
        payload=bytes(StateRequest(id=task_id)),
        timeout_nano=timeout_nano,
    )
    return encode_frame(sid, MessageType.REQUEST, 0, bytes(req))


# --- framing -------------------------------------------------------------------------------------


def test_header_matches_hand_built_bytes() -> None:
    raw = b"\x00\x00\x01\x02" + b"\x00\x00\x00\x03" + b"\x01" + b"\x04"
    header = Header(length=0x0102, stream_id=3, type=MessageType.REQUEST, flags=0x04)
    assert encode_header(header) == raw
    assert decode_header(raw) == header
    assert decode_header(b"\xff\xff\xff\xff\x80\x00\x00\x01\x03\x03") == Header(
        length=0xFFFFFFFF, stream_id=0x80000001, type=3, flags=3
    )
    with pytest.raises(ValueError, match="10 bytes"):
        decode_header(raw[:9])


def test_frame_and_envelope_wire_bytes() -> None:
    assert encode_frame(5, MessageType.RESPONSE, 0, b"ab") == b"\x00\x00\x00\x02\x00\x00\x00\x05\x02\x00ab"
    # Field numbers of upstream request.proto: service=1, method=2, payload=3, timeout_nano=4, metadata=5.
    req = Request(service="s", method="m", payload=b"p", timeout_nano=1)
    assert bytes(req) == b"\x0a\x01s\x12\x01m\x1a\x01p\x20\x01"
    assert bytes(Request(metadata=[KeyValue(key="k", value="v")])) == b"\x2a\x06\x0a\x01k\x12\x01v"
    # Response: status=1 (google.rpc.Status code=1), payload=2.
    assert bytes(Response().parse(b"\x0a\x02\x08\x05\x12\x01x")) == b"\x0a\x02\x08\x05\x12\x01x"
    assert Response().parse(b"\x0a\x02\x08\x05").status.code == Code.NOT_FOUND.value


def test_frame_size_limit() -> None:
    assert len(encode_frame(1, MessageType.REQUEST, 0, bytes(MESSAGE_LENGTH_MAX))) == MESSAGE_LENGTH_MAX + 10
    with pytest.raises(ResourceExhausted, match="exceed maximum message size"):
        encode_frame(1, MessageType.REQUEST, 0, bytes(MESSAGE_LENGTH_MAX + 1))


def test_task_table_and_binding(task: FakeTask) -> None:
    assert snake_case("CloseIO") == "close_io"
    assert snake_case("ResizePty") == "resize_pty"
    assert TASK_METHODS["State"] == (StateRequest, StateResponse)
    handlers = bind(TASK_METHODS, task)
    assert set(handlers) == {"State", "Kill"}
    assert handlers["State"].request is StateRequest


# --- client and server ---------------------------------------------------------------------------


async def test_state_round_trip(client: TtrpcClient, task: FakeTask) -> None:
    resp = await client.call(
        TASK_SERVICE,
        "State",
        StateRequest(id="c1", exec_id="e1"),
        StateResponse,
        metadata={"containerd-namespace": "k8s.io", "multi": ["a", "b"]},
    )
    assert isinstance(resp, StateResponse)
    assert (resp.id, resp.bundle, resp.pid, resp.exec_id) == ("c1", "/run/c1", 42, "e1")
    assert task.metadata == {"containerd-namespace": ["k8s.io"], "multi": ["a", "b"]}
    assert await client.call(TASK_SERVICE, "Kill", KillRequest(id="c1", signal=9), Empty) == Empty()


async def test_many_concurrent_calls_on_one_connection(client: TtrpcClient, task: FakeTask) -> None:
    # Every handler waits until all have arrived: this only finishes if they run concurrently.
    task.expect = 40
    ids = [f"together-{i}" for i in range(task.expect)]
    results = await asyncio.wait_for(asyncio.gather(*(state(client, i) for i in ids)), 10)
    assert [r.id for r in results] == ids
    assert [r.bundle for r in results] == [f"/run/{i}" for i in ids]


async def test_slow_handler_does_not_block_others(client: TtrpcClient, task: FakeTask, sock: Path) -> None:
    slow = asyncio.create_task(state(client, "block"))
    await asyncio.wait_for(task.blocked.wait(), 5)
    assert (await asyncio.wait_for(state(client, "fast"), 5)).id == "fast"
    async with await TtrpcClient.connect(sock) as other:
        assert (await asyncio.wait_for(state(other, "other"), 5)).id == "other"
    assert not slow.done()
    task.release.set()
    assert (await asyncio.wait_for(slow, 5)).id == "block"


async def test_client_stream_ids_are_odd_and_increase_by_two(sock: Path) -> None:
    seen: list[int] = []

    async def fake_server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for _ in range(3):
            frame = await read_frame(reader)
            seen.append(frame.header.stream_id)
            assert frame.header.type == MessageType.REQUEST and frame.header.flags == 0
            req = Request().parse(frame.payload)
            assert (req.service, req.method) == (TASK_SERVICE, "State")
            payload = bytes(Response(payload=bytes(StateResponse(id=StateRequest().parse(req.payload).id))))
            writer.write(encode_frame(frame.header.stream_id, MessageType.RESPONSE, 0, payload))
        writer.close()

    srv = await asyncio.start_unix_server(fake_server, path=str(sock))
    try:
        async with await TtrpcClient.connect(sock) as c:
            assert [(await state(c, str(i))).id for i in range(3)] == ["0", "1", "2"]
    finally:
        srv.close()
        await srv.wait_closed()
    assert seen == [1, 3, 5]


async def test_unknown_service_or_method_is_unimplemented(client: TtrpcClient) -> None:
    with pytest.raises(Unimplemented, match=r"^service nope\.Svc$"):
        await client.call("nope.Svc", "State", StateRequest(), StateResponse)
    # Pause is in the Task table but FakeTask does not implement it.
    with pytest.raises(Unimplemented, match=r"^method Pause$"):
        await client.call(TASK_SERVICE, "Pause", StateRequest(), Empty)


async def test_handler_errors_map_to_status(client: TtrpcClient) -> None:
    with pytest.raises(NotFound, match=r'^task "missing": not found$'):
        await state(client, "missing")
    with pytest.raises(Internal, match="RuntimeError: boom"):
        await state(client, "bug")
    assert (await state(client, "after")).id == "after"


async def test_client_timeout_is_deadline_exceeded_and_cancels_handler(
    client: TtrpcClient, task: FakeTask
) -> None:
    with pytest.raises(DeadlineExceeded, match="State"):
        await state(client, "block", timeout=0.2)
    # timeout_nano travelled with the request: the server cancelled the handler too.
    await asyncio.wait_for(task.cancelled.wait(), 5)
    assert (await state(client, "after")).id == "after"


async def test_server_honours_timeout_nano(server: TtrpcServer, sock: Path, task: FakeTask) -> None:
    raw = await Raw.open(sock)
    try:
        await raw.send(state_request(1, "block", timeout_nano=100_000_000))
        sid, resp = await raw.response()
        assert sid == 1
        assert resp.status.code == Code.DEADLINE_EXCEEDED.value
        assert "deadline exceeded" in resp.status.message
        assert task.cancelled.is_set()
    finally:
        await raw.close()


async def test_oversize_request_refused_connection_keeps_working(client: TtrpcClient) -> None:
    with pytest.raises(ResourceExhausted, match="exceed maximum message size"):
        await state(client, "x" * (MESSAGE_LENGTH_MAX + 1))
    with pytest.raises(ResourceExhausted, match="exceeds maximum message size"):
        await state(client, "huge")
    assert (await state(client, "after")).id == "after"


async def test_server_discards_oversize_frame_and_answers_on_its_stream(
    server: TtrpcServer, sock: Path
) -> None:
    raw = await Raw.open(sock)
    try:
        size = MESSAGE_LENGTH_MAX + 1
        await raw.send(encode_header(Header(size, 1, MessageType.REQUEST, 0)) + bytes(size))
        sid, resp = await raw.response()
        assert sid == 1 and resp.status.code == Code.RESOURCE_EXHAUSTED.value
        await raw.send(state_request(3, "next"))
        sid, resp = await raw.response()
        assert sid == 3 and resp.status.code == 0
        assert StateResponse().parse(resp.payload).id == "next"
    finally:
        await raw.close()


async def test_protocol_faults_answered_per_stream(server: TtrpcServer, sock: Path) -> None:
    raw = await Raw.open(sock)
    try:
        await raw.send(state_request(2))
        sid, resp = await raw.response()
        assert sid == 2 and resp.status.code == Code.INVALID_ARGUMENT.value
        assert resp.status.message == "StreamID must be odd for client initiated streams"
        await raw.send(state_request(5))
        assert (await raw.response())[1].status.code == 0
        await raw.send(state_request(5))
        sid, resp = await raw.response()
        assert sid == 5 and resp.status.code == Code.INVALID_ARGUMENT.value
        await raw.send(encode_frame(7, MessageType.DATA, 0, b"x"))
        sid, resp = await raw.response()
        assert sid == 7 and resp.status.code == Code.INVALID_ARGUMENT.value
        await raw.send(state_request(9))
        assert (await raw.response())[1].status.code == 0
    finally:
        await raw.close()


async def test_truncated_frame_closes_only_that_connection(
    server: TtrpcServer, sock: Path, client: TtrpcClient
) -> None:
    raw = await Raw.open(sock)
    try:
        # Header announces 100 bytes, 5 arrive, then the peer stops writing.
        await raw.send(encode_header(Header(100, 1, MessageType.REQUEST, 0)) + b"short")
        raw.writer.write_eof()
        assert await asyncio.wait_for(raw.reader.read(), 5) == b""
    finally:
        await raw.close()
    assert (await state(client, "still")).id == "still"


async def test_server_gone_fails_calls_with_unavailable(
    server: TtrpcServer, sock: Path, task: FakeTask
) -> None:
    c = await TtrpcClient.connect(sock)
    try:
        pending = asyncio.create_task(state(c, "block"))
        await asyncio.wait_for(task.blocked.wait(), 5)
        await server.stop()
        with pytest.raises(Unavailable, match=re.escape(str(sock))):
            await asyncio.wait_for(pending, 5)
        with pytest.raises(Unavailable, match=re.escape(str(sock))):
            await state(c, "later")
        assert c.closed
    finally:
        await c.close()
    assert not sock.exists()
    with pytest.raises(Unavailable, match=re.escape(str(sock))):
        await TtrpcClient.connect(sock)


async def test_closed_client_fails_pending_calls(client: TtrpcClient, task: FakeTask) -> None:
    pending = asyncio.create_task(state(client, "block"))
    await asyncio.wait_for(task.blocked.wait(), 5)
    await client.close()
    with pytest.raises(Unavailable, match="client closed"):
        await asyncio.wait_for(pending, 5)


async def test_socket_mode_and_stale_socket(tmp_path: Path, task: FakeTask) -> None:
    path = tmp_path / "s.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()
    srv = TtrpcServer({TASK_SERVICE: bind(TASK_METHODS, task)})
    await srv.start(path)
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        async with await TtrpcClient.connect(path) as c:
            assert (await state(c, "c1")).id == "c1"
    finally:
        await srv.stop()
    regular = tmp_path / "file"
    regular.write_text("keep me")
    with pytest.raises(FailedPrecondition, match="not a socket"):
        await TtrpcServer({}).start(regular)
    assert regular.read_text() == "keep me"


async def test_undecodable_request_is_invalid_argument(server: TtrpcServer, sock: Path) -> None:
    raw = await Raw.open(sock)
    try:
        # service (field 1) holding bytes that are not UTF-8: the envelope cannot be decoded.
        await raw.send(encode_frame(1, MessageType.REQUEST, 0, b"\x0a\x02\xff\xfe"))
        sid, resp = await raw.response()
        assert sid == 1 and resp.status.code == Code.INVALID_ARGUMENT.value
        assert resp.status.message.startswith("unmarshal request error")
        # Same for a Task payload that does not decode as StateRequest.
        bad = Request(service=TASK_SERVICE, method="State", payload=b"\x0a\x02\xff\xfe")
        await raw.send(encode_frame(3, MessageType.REQUEST, 0, bytes(bad)))
        sid, resp = await raw.response()
        assert sid == 3 and resp.status.code == Code.INVALID_ARGUMENT.value
        assert "unmarshal payload" in resp.status.message
        await raw.send(state_request(5))
        assert (await raw.response())[1].status.code == 0
    finally:
        await raw.close()
