"""SPDY/3.1 on the streaming server: taking the connection over from aiohttp, and the exec/attach streams.

aiohttp upgrades only to WebSocket by itself; for ``Upgrade: SPDY/3.1`` the
handler takes the raw connection: it swaps the transport's protocol for an
asyncio stream protocol *before* writing the 101 (the client sends SPDY frames
as soon as it reads the 101, and none of them may reach aiohttp's HTTP parser),
writes the 101 through aiohttp, and runs a :class:`~daemon.streaming.spdy.session.Session`
on the connection. When the connection ends, aiohttp's protocol is told too, so
its bookkeeping (connection count, shutdown) stays right.

:func:`accept_command_streams` does kubelet's stream handshake for exec/attach:
the client opens one stream per ``streamtype`` it needs (error, stdin, stdout,
stderr, resize from v3 on) ``within`` a deadline; :class:`SpdyCommand` wraps them
as a :class:`ProcessIO` and writes the exit status at the end.
"""

from __future__ import annotations

import asyncio
import contextlib

import structlog
from aiohttp import web

from daemon.errors import FailedPrecondition
from daemon.streaming.channel import (
    STREAM_ERROR,
    STREAM_RESIZE,
    STREAM_STDERR,
    STREAM_STDIN,
    STREAM_STDOUT,
    STREAM_TYPE_HEADER,
    ResizeDecoder,
    StreamOptions,
    TerminalSize,
    protocol_version,
    spdy_upgrade_response_headers,
)
from daemon.streaming.errors import ProtocolError, SessionClosedError, StreamResetError
from daemon.streaming.spdy.frames import RstStatus
from daemon.streaming.spdy.session import Session
from daemon.streaming.spdy.stream import Stream
from plugins.cri.streaming.streams import ProcessIO

log = structlog.get_logger("berth.cri.streaming")

#: kubelet's streamCreationTimeout default.
STREAM_CREATION_TIMEOUT = 30.0
READ_LIMIT = 1 << 20
_STREAM_ERRORS = (StreamResetError, SessionClosedError, FailedPrecondition, ConnectionError)


class _TakenOver(asyncio.StreamReaderProtocol):
    """The transport's protocol after the upgrade; tells aiohttp's protocol when the connection ends."""

    def __init__(self, reader: asyncio.StreamReader, previous: asyncio.BaseProtocol) -> None:
        super().__init__(reader)
        self._previous = previous

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        with contextlib.suppress(Exception):
            self._previous.connection_lost(exc)


async def upgrade(request: web.Request, protocol: str | None) -> tuple[web.StreamResponse, Session]:
    """Answer 101 and return the server-side SPDY session on the connection (already started).

    The handler must return the response after the session ended, as aiohttp wants one.
    """
    transport = request.transport
    if transport is None:
        raise ConnectionResetError("spdy upgrade: the client is gone")
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=READ_LIMIT, loop=loop)
    proto = _TakenOver(reader, transport.get_protocol())
    transport.set_protocol(proto)
    proto.connection_made(transport)
    response = web.StreamResponse(status=101, headers=dict(spdy_upgrade_response_headers(protocol)))
    await response.prepare(request)
    writer = asyncio.StreamWriter(transport, proto, reader, loop)
    session = Session(reader, writer, client=False)
    await session.start()
    return response, session


class SpdySink:
    """A ByteSink on an accepted stream: a client that left makes writes no-ops, not errors."""

    def __init__(self, stream: Stream) -> None:
        self._stream = stream

    async def write(self, data: bytes) -> None:
        with contextlib.suppress(*_STREAM_ERRORS):
            await self._stream.write(data)

    async def close(self) -> None:
        with contextlib.suppress(*_STREAM_ERRORS):
            await self._stream.close()


class SpdySource:
    """A ByteSource on an accepted stream: FIN, reset or a lost session all read as end of input."""

    def __init__(self, stream: Stream) -> None:
        self._stream = stream

    async def read(self) -> bytes:
        try:
            return await self._stream.read()
        except _STREAM_ERRORS:
            return b""


async def accept_command_streams(
    session: Session, protocol: str, opts: StreamOptions, within: float = STREAM_CREATION_TIMEOUT
) -> dict[str, Stream]:
    """The client's exec/attach streams by type (ProtocolError on a duplicate; TimeoutError if too few)."""
    allowed = {STREAM_ERROR, STREAM_STDIN, STREAM_STDOUT, STREAM_STDERR}
    if protocol_version(protocol) >= 3:
        allowed.add(STREAM_RESIZE)
    expected = opts.expected_streams(protocol)
    streams: dict[str, Stream] = {}
    async with asyncio.timeout(within):
        while len(streams) < expected:
            stream = await session.accept()
            kind = stream.headers.get(STREAM_TYPE_HEADER, "")
            if kind not in allowed or kind in streams:
                await stream.reset(RstStatus.PROTOCOL_ERROR)
                raise ProtocolError(f"remotecommand: unexpected stream type {kind!r}")
            await stream.reply()
            streams[kind] = stream
    return streams


class SpdyCommand:
    """One exec/attach over SPDY: the client's streams as a ProcessIO, and the closing status."""

    def __init__(self, session: Session, protocol: str, streams: dict[str, Stream], tty: bool) -> None:
        self.session = session
        self.protocol = protocol
        self._streams = streams
        self._resize_task: asyncio.Task[None] | None = None
        resizes: asyncio.Queue[TerminalSize] | None = None
        if STREAM_RESIZE in streams and tty:
            resizes = asyncio.Queue()
            self._resize_task = asyncio.create_task(self._read_resizes(streams[STREAM_RESIZE], resizes))
        self.io = ProcessIO(
            tty=tty,
            stdin=SpdySource(streams[STREAM_STDIN]) if STREAM_STDIN in streams else None,
            stdout=SpdySink(streams[STREAM_STDOUT]) if STREAM_STDOUT in streams else None,
            stderr=SpdySink(streams[STREAM_STDERR]) if STREAM_STDERR in streams else None,
            resizes=resizes,
        )

    @property
    def version(self) -> int:
        return protocol_version(self.protocol)

    async def _read_resizes(self, stream: Stream, queue: asyncio.Queue[TerminalSize]) -> None:
        decoder = ResizeDecoder()
        try:
            while data := await stream.read():
                for size in decoder.feed(data):
                    queue.put_nowait(size)
        except _STREAM_ERRORS:
            pass
        except ProtocolError as exc:
            log.info("spdy.bad_resize", error=str(exc))
            await stream.reset(RstStatus.PROTOCOL_ERROR)

    async def wait_gone(self) -> None:
        # shielded: cancelling this wait must not cancel the session's reader task it awaits
        await asyncio.shield(self.session.wait_closed())

    async def finish(self, status: bytes) -> None:
        """Write the error-stream payload, end every stream we write, hang up once the client is done."""
        error = self._streams.get(STREAM_ERROR)
        if error is not None and status:
            await SpdySink(error).write(status)
        for kind in (STREAM_STDOUT, STREAM_STDERR, STREAM_ERROR):
            if kind in self._streams:
                await SpdySink(self._streams[kind]).close()
        if self._resize_task is not None:
            self._resize_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._resize_task
        await self.session.close(grace=1.0)
