"""SPDY sessions over a socketpair: streams, flow control, half-close, reset, PING, GOAWAY, bad peers."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import pytest

from daemon.errors import FailedPrecondition
from daemon.streaming.errors import ProtocolError, SessionClosedError, StreamResetError
from daemon.streaming.spdy.frames import (
    FLAG_FIN,
    DataFrame,
    Frame,
    FrameReader,
    GoAway,
    GoAwayStatus,
    Ping,
    RstStatus,
    RstStream,
    Settings,
    SynReply,
    SynStream,
    WindowUpdate,
    encode_frame,
)
from daemon.streaming.spdy.headers import HeaderDeflater, Headers
from daemon.streaming.spdy.session import DEFAULT_WINDOW, Session
from daemon.streaming.spdy.stream import Stream


async def until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll with a deadline, for states no event announces (a window reaching zero)."""
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.001)


async def connection_pair() -> tuple[
    tuple[asyncio.StreamReader, asyncio.StreamWriter], tuple[asyncio.StreamReader, asyncio.StreamWriter]
]:
    a, b = socket.socketpair()
    return await asyncio.open_connection(sock=a), await asyncio.open_connection(sock=b)


@pytest.fixture
async def sessions() -> AsyncIterator[tuple[Session, Session]]:
    (cr, cw), (sr, sw) = await connection_pair()
    client, server = Session(cr, cw, client=True), Session(sr, sw, client=False)
    await client.start()
    await server.start()
    try:
        yield client, server
    finally:
        await client.close()
        await server.close()


@dataclass
class RawPeer:
    """A hand-driven client: writes chosen frames, reads what the session answers."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    frames: FrameReader
    deflater: HeaderDeflater

    async def send(self, *frames: Frame) -> None:
        for frame in frames:
            self.writer.write(encode_frame(frame, self.deflater))
        await self.writer.drain()

    async def recv(self) -> Frame | None:
        """The next frame that is not flow-control bookkeeping (SETTINGS, WINDOW_UPDATE)."""
        async with asyncio.timeout(5):
            while True:
                frame = await self.frames.read()
                if not isinstance(frame, Settings | WindowUpdate):
                    return frame


@pytest.fixture
async def raw() -> AsyncIterator[tuple[RawPeer, Session]]:
    (cr, cw), (sr, sw) = await connection_pair()
    server = Session(sr, sw, client=False)
    await server.start()
    peer = RawPeer(cr, cw, FrameReader(cr), HeaderDeflater())
    try:
        yield peer, server
    finally:
        cw.close()
        await server.close()


async def open_pair(client: Session, server: Session, **headers: str) -> tuple[Stream, Stream]:
    """Client opens a stream, server accepts and replies; both ends returned."""
    opening = asyncio.create_task(client.open_stream(Headers(headers)))
    theirs = await server.accept()
    await theirs.reply(Headers({"x-ok": "1"}))
    return await opening, theirs


async def read_to_eof(stream: Stream) -> bytes:
    out = bytearray()
    while chunk := await stream.read():
        out += chunk
    return bytes(out)


async def test_several_streams_carry_data_concurrently(sessions: tuple[Session, Session]) -> None:
    client, server = sessions

    async def echo_server() -> None:
        async with asyncio.TaskGroup() as group:
            for _ in range(5):
                stream = await server.accept()
                await stream.reply()
                group.create_task(echo(stream))

    async def echo(stream: Stream) -> None:
        data = await read_to_eof(stream)
        await stream.write(stream.headers["streamtype"].encode() + b":" + data)
        await stream.close()

    async def one(i: int) -> bytes:
        stream = await client.open_stream(Headers({"streamtype": f"s{i}"}))
        assert stream.id % 2 == 1
        await stream.write(bytes([i]) * (100_000 + i))
        await stream.close()
        return await read_to_eof(stream)

    acceptor = asyncio.create_task(echo_server())
    results = await asyncio.gather(*(one(i) for i in range(5)))
    await acceptor
    for i, result in enumerate(results):
        assert result == f"s{i}:".encode() + bytes([i]) * (100_000 + i)
    await until(lambda: not client._streams and not server._streams)  # fully closed streams are dropped


async def test_reply_headers_reach_the_opener(sessions: tuple[Session, Session]) -> None:
    mine, theirs = await open_pair(*sessions, streamtype="error")
    assert theirs.headers == Headers({"streamtype": "error"})
    assert await mine.wait_reply() == Headers({"x-ok": "1"})
    with pytest.raises(FailedPrecondition):
        await theirs.reply()  # only once


async def test_writer_stalls_at_the_window_until_window_update(sessions: tuple[Session, Session]) -> None:
    client, server = sessions
    mine, theirs = await open_pair(client, server)
    assert client.enforcing_flow_control  # the server's SETTINGS proved it speaks flow control
    payload = bytes(range(256)) * 1024  # 256 KiB, four windows
    writing = asyncio.create_task(mine.write(payload))
    await until(lambda: mine.send_window == 0)
    assert not writing.done()
    assert len(theirs._buf) == DEFAULT_WINDOW  # exactly one window crossed the wire
    received = bytearray()
    while len(received) < len(payload):
        received += await theirs.read()
    await asyncio.wait_for(writing, 5)
    assert bytes(received) == payload


async def test_a_peer_without_flow_control_is_not_throttled(raw: tuple[RawPeer, Session]) -> None:
    # moby/spdystream (kubectl, kubelet) sends no SETTINGS and no WINDOW_UPDATE.
    peer, server = raw
    await peer.send(SynStream(1, Headers({"streamtype": "stdout"})))
    stream = await server.accept()
    await stream.reply()
    assert isinstance(await peer.recv(), SynReply)
    payload = b"x" * (5 * DEFAULT_WINDOW)
    writing = asyncio.create_task(stream.write(payload))
    got = bytearray()
    while len(got) < len(payload):
        frame = await peer.recv()
        assert isinstance(frame, DataFrame) and frame.stream_id == 1
        got += frame.data
    await writing
    assert not server.enforcing_flow_control and bytes(got) == payload


async def test_no_window_updates_to_a_peer_without_flow_control(raw: tuple[RawPeer, Session]) -> None:
    # spdystream closes its socket right after the exit status without reading our frames: a
    # WINDOW_UPDATE left unread there turns its close into a TCP reset that can eat our unread output.
    peer, server = raw
    await peer.send(SynStream(1, Headers({"streamtype": "stdin"})))
    stream = await server.accept()
    await stream.reply()
    payload = b"y" * (4 * DEFAULT_WINDOW)
    half = DEFAULT_WINDOW * 2
    await peer.send(DataFrame(1, payload[:half]), DataFrame(1, payload[half:], FLAG_FIN))
    got = bytearray()
    while chunk := await stream.read():
        got += chunk
    assert bytes(got) == payload
    await peer.send(Ping(1))  # a marker: everything the session sent before its PING reply is read below
    seen: list[Frame] = []
    async with asyncio.timeout(5):
        while not isinstance(frame := await peer.frames.read(), Ping):
            assert frame is not None
            seen.append(frame)
    assert not [f for f in seen if isinstance(f, WindowUpdate)], seen


async def test_fin_half_closes_one_direction(sessions: tuple[Session, Session]) -> None:
    client, server = sessions
    mine, theirs = await open_pair(client, server)
    await mine.write(b"stdin data")
    await mine.close()
    assert await read_to_eof(theirs) == b"stdin data"
    assert theirs.remote_closed and not theirs.local_closed
    with pytest.raises(FailedPrecondition):
        await mine.write(b"more")
    await theirs.write(b"still talking")  # the other direction is open
    await theirs.close()
    assert await read_to_eof(mine) == b"still talking"
    await until(lambda: mine.id not in client._streams and theirs.id not in server._streams)


async def test_rst_stream_fails_both_directions(sessions: tuple[Session, Session]) -> None:
    client, server = sessions
    mine, theirs = await open_pair(client, server)
    reading = asyncio.create_task(mine.read())
    await theirs.reset(RstStatus.INTERNAL_ERROR)
    with pytest.raises(StreamResetError) as info:
        await reading
    assert info.value.code == RstStatus.INTERNAL_ERROR and info.value.stream_id == mine.id
    with pytest.raises(StreamResetError):
        await mine.write(b"x")
    with pytest.raises(StreamResetError):
        await theirs.read()


async def test_data_sent_before_a_peer_reset_stays_readable(sessions: tuple[Session, Session]) -> None:
    """containerd writes the exit status on the error stream, then resets it: the status must survive."""
    client, server = sessions
    mine, theirs = await open_pair(client, server)
    await theirs.write(b'{"status":"Success"}')
    await theirs.reset(RstStatus.CANCEL)
    assert await mine.read() == b'{"status":"Success"}'
    with pytest.raises(StreamResetError):
        await mine.read()


async def test_refused_stream_fails_open_stream(sessions: tuple[Session, Session]) -> None:
    client, server = sessions
    opening = asyncio.create_task(client.open_stream(Headers({"streamtype": "bogus"})))
    stream = await server.accept()
    await stream.reset(RstStatus.REFUSED_STREAM)
    with pytest.raises(StreamResetError) as info:
        await opening
    assert info.value.code == RstStatus.REFUSED_STREAM


async def test_ping_round_trips_in_both_directions(sessions: tuple[Session, Session]) -> None:
    client, server = sessions
    async with asyncio.timeout(5):
        assert await client.ping() >= 0
        assert await server.ping() >= 0
        assert await client.ping() >= 0


async def test_goaway_stops_new_streams_but_not_open_ones(sessions: tuple[Session, Session]) -> None:
    client, server = sessions
    mine, theirs = await open_pair(client, server)
    await server.goaway()
    await until(lambda: client.going_away)
    with pytest.raises(SessionClosedError):
        await client.open_stream(Headers({"streamtype": "late"}))
    await theirs.write(b"after goaway")
    await theirs.close()
    assert await read_to_eof(mine) == b"after goaway"


async def test_session_refuses_streams_after_its_goaway(raw: tuple[RawPeer, Session]) -> None:
    peer, server = raw
    await peer.send(SynStream(1, Headers({"streamtype": "a"})))
    await server.accept()
    await server.goaway()
    assert await peer.recv() == GoAway(1, GoAwayStatus.OK)
    await peer.send(SynStream(3, Headers({"streamtype": "b"})))
    assert await peer.recv() == RstStream(3, RstStatus.REFUSED_STREAM)


async def test_stream_id_rules_are_enforced_per_stream(raw: tuple[RawPeer, Session]) -> None:
    peer, server = raw
    await peer.send(SynStream(2, Headers({"streamtype": "even"})))  # the server's parity
    assert await peer.recv() == RstStream(2, RstStatus.PROTOCOL_ERROR)
    await peer.send(
        SynStream(5, Headers({"streamtype": "ok"})), SynStream(3, Headers({"streamtype": "back"}))
    )
    assert await peer.recv() == RstStream(3, RstStatus.PROTOCOL_ERROR)
    accepted = await server.accept()
    assert accepted.id == 5  # the session lived on
    await peer.send(DataFrame(99, b"?"))
    assert await peer.recv() == RstStream(99, RstStatus.INVALID_STREAM)


async def test_peer_pings_are_echoed_and_unknown_frames_ignored(raw: tuple[RawPeer, Session]) -> None:
    peer, _ = raw
    peer.writer.write(b"\x80\x03\x00\x0a\x00\x00\x00\x02hi")  # an unknown control type
    await peer.send(Ping(7))
    assert await peer.recv() == Ping(7)


async def test_malformed_frame_ends_the_session_with_goaway(raw: tuple[RawPeer, Session]) -> None:
    peer, server = raw
    await peer.send(SynStream(1, Headers({"streamtype": "stdin"})))
    stream = await server.accept()
    peer.writer.write(b"\x80\x02\x00\x06\x00\x00\x00\x04\x00\x00\x00\x01")  # version 2 PING
    assert await peer.recv() == GoAway(1, GoAwayStatus.PROTOCOL_ERROR)
    assert await peer.recv() is None  # and the connection is closed
    await server.wait_closed()
    assert isinstance(server.error, ProtocolError)
    with pytest.raises(StreamResetError):
        await stream.read()
    with pytest.raises(SessionClosedError):
        await server.accept()


async def test_connection_loss_fails_open_streams(raw: tuple[RawPeer, Session]) -> None:
    peer, server = raw
    await peer.send(SynStream(1, Headers({"streamtype": "stdin"})), DataFrame(1, b"partial"))
    stream = await server.accept()
    await stream.reply()
    assert await stream.read() == b"partial"
    peer.writer.close()
    with pytest.raises(StreamResetError):
        await asyncio.wait_for(stream.read(), 5)
    with pytest.raises(StreamResetError):
        await stream.write(b"x")


async def test_data_before_fin_survives_connection_loss(raw: tuple[RawPeer, Session]) -> None:
    peer, server = raw
    await peer.send(SynStream(1, Headers({"streamtype": "stdin"})), DataFrame(1, b"all of it", FLAG_FIN))
    stream = await server.accept()
    await until(lambda: stream.remote_closed)
    peer.writer.close()
    await server.wait_closed()
    assert await read_to_eof(stream) == b"all of it"


async def test_a_larger_receive_window_is_granted_for_stream_and_session() -> None:
    (cr, cw), (sr, sw) = await connection_pair()
    window = 1 << 20
    async with (
        Session(cr, cw, client=True, receive_window=window) as client,
        Session(sr, sw, client=False, receive_window=window) as server,
    ):
        mine, theirs = await open_pair(client, server)
        await until(lambda: client.send_window == window and mine.send_window == window)
        payload = b"z" * (3 * window)
        writing = asyncio.create_task(mine.write(payload))
        await until(lambda: len(theirs._buf) == window)  # a whole 1 MiB window before any read
        received = bytearray()
        while len(received) < len(payload):
            received += await theirs.read(window)
        await asyncio.wait_for(writing, 5)
        assert received == payload
