"""WebSocket on the streaming server: subprotocol negotiation and the exec/attach channels.

aiohttp does the WebSocket framing (a malformed frame closes the connection
with 1002 and ends our reader); :mod:`daemon.streaming.wschannel` does what is
inside the frames. Exec/attach channels: 0 stdin, 1 stdout, 2 stderr, 3 error,
4 resize. As kubelet does, the server first sends an empty message on the
lowest channel it will write (stdout, else stderr, else error) to tell the
client the streams are ready. Without ``v5.channel.k8s.io`` the client cannot
end stdin on its own; its input ends when the connection does.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence

import structlog
from aiohttp import WSCloseCode, WSMsgType, web

from daemon.streaming.channel import ResizeDecoder, StreamOptions, TerminalSize
from daemon.streaming.errors import ProtocolError
from daemon.streaming.wschannel import (
    CHANNEL_ERROR,
    CHANNEL_RESIZE,
    CHANNEL_STDERR,
    CHANNEL_STDIN,
    CHANNEL_STDOUT,
    WsClose,
    WsData,
    WsProtocol,
    decode_ws,
    encode_ws,
    encode_ws_close,
    negotiate_ws_protocol,
)
from plugins.cri.streaming.streams import ProcessIO, QueueSource

log = structlog.get_logger("berth.cri.streaming")

MAX_MESSAGE = 4 << 20


async def accept(
    request: web.Request, allowed: Sequence[str]
) -> tuple[web.WebSocketResponse, WsProtocol] | web.Response:
    """Complete the WebSocket handshake with a subprotocol we allow, or a 400 naming what we accept."""
    offered = request.headers.getall("Sec-WebSocket-Protocol", [])
    protocol = negotiate_ws_protocol(offered, allowed)
    if protocol is None:
        return web.Response(
            status=400,
            text=f"websocket: none of the offered subprotocols is supported; use one of {list(allowed)}",
        )
    ws = web.WebSocketResponse(protocols=(protocol.name,) if protocol.name else (), max_msg_size=MAX_MESSAGE)
    await ws.prepare(request)
    return ws, protocol


class WsChannels:
    """Sends on channels of one WebSocket (serialized); a closed socket makes sends no-ops."""

    def __init__(self, ws: web.WebSocketResponse, protocol: WsProtocol) -> None:
        self.ws = ws
        self.protocol = protocol
        self._lock = asyncio.Lock()

    async def send(self, channel: int, data: bytes) -> None:
        message = encode_ws(self.protocol, channel, data)
        async with self._lock:
            if self.ws.closed:
                return
            with contextlib.suppress(ConnectionError, RuntimeError):
                if isinstance(message, str):
                    await self.ws.send_str(message)
                else:
                    await self.ws.send_bytes(message)

    async def send_close(self, channel: int) -> None:
        if not self.protocol.close_signal:
            return
        async with self._lock:
            if not self.ws.closed:
                with contextlib.suppress(ConnectionError, RuntimeError):
                    await self.ws.send_bytes(encode_ws_close(self.protocol, channel))


class WsSink:
    def __init__(self, channels: WsChannels, channel: int) -> None:
        self._channels = channels
        self._channel = channel
        self._closed = False

    async def write(self, data: bytes) -> None:
        if not self._closed:
            await self._channels.send(self._channel, data)

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            await self._channels.send_close(self._channel)


class WsCommand:
    """One exec/attach over WebSocket: the channels as a ProcessIO, and the closing status."""

    def __init__(self, ws: web.WebSocketResponse, protocol: WsProtocol, opts: StreamOptions) -> None:
        self.channels = WsChannels(ws, protocol)
        self._stdin = QueueSource() if opts.stdin else None
        self._resizes: asyncio.Queue[TerminalSize] | None = asyncio.Queue() if opts.tty else None
        self._gone = asyncio.Event()
        self.io = ProcessIO(
            tty=opts.tty,
            stdin=self._stdin,
            stdout=WsSink(self.channels, CHANNEL_STDOUT) if opts.stdout else None,
            stderr=WsSink(self.channels, CHANNEL_STDERR) if opts.stderr else None,
            resizes=self._resizes,
        )
        self._opts = opts
        self._reader = asyncio.create_task(self._read())

    @property
    def version(self) -> int:
        return self.channels.protocol.version

    @property
    def protocol(self) -> str:
        """The remotecommand protocol whose error-stream semantics apply."""
        return self.channels.protocol.remotecommand_protocol

    async def ready(self) -> None:
        first = (
            CHANNEL_STDOUT if self._opts.stdout else CHANNEL_STDERR if self._opts.stderr else CHANNEL_ERROR
        )
        await self.channels.send(first, b"")

    async def _read(self) -> None:
        ws = self.channels.ws
        decoder = ResizeDecoder()
        try:
            async for msg in ws:
                if msg.type not in (WSMsgType.BINARY, WSMsgType.TEXT):
                    continue
                frame = decode_ws(self.channels.protocol, msg.data)
                if isinstance(frame, WsClose):
                    if frame.channel == CHANNEL_STDIN and self._stdin is not None:
                        self._stdin.feed_eof()
                elif isinstance(frame, WsData):
                    if frame.channel == CHANNEL_STDIN and self._stdin is not None:
                        self._stdin.feed(frame.data)
                    elif frame.channel == CHANNEL_RESIZE and self._resizes is not None:
                        for size in decoder.feed(frame.data):
                            self._resizes.put_nowait(size)
        except ProtocolError as exc:
            log.info("ws.protocol_error", error=str(exc))
            await ws.close(code=WSCloseCode.PROTOCOL_ERROR, message=str(exc)[:120].encode())
        finally:
            if self._stdin is not None:
                self._stdin.feed_eof()
            self._gone.set()

    async def wait_gone(self) -> None:
        await self._gone.wait()

    async def finish(self, status: bytes) -> None:
        if status:
            await self.channels.send(CHANNEL_ERROR, status)
        for sink in (self.io.stdout, self.io.stderr):
            if sink is not None:
                await sink.close()
        with contextlib.suppress(ConnectionError, RuntimeError):
            await self.channels.ws.close()
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader
