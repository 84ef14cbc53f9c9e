"""Port-forward over SPDY (``portforward.k8s.io``) and WebSocket.

SPDY: per forwarded connection the client opens an ``error`` and a ``data``
stream carrying the same ``port`` and ``requestid`` headers; once both are
there, a connection to the port is made inside the pod's netns (the backend's
:meth:`port_forward`) and bytes are copied both ways: the client's FIN on the
data stream half-closes the TCP connection, the pod's EOF ends the data stream.
A failure to connect is written as text on that pair's error stream (kubelet's
wording), the session lives on. Any number of pairs, on any ports, run at once.

WebSocket: the ports come from the ``port`` query parameter; port i uses
channels 2i (data) and 2i+1 (error), each first carrying the port (u16 LE)
from the server; one TCP connection per port. The socket closes once every
port's connection has ended.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field

import structlog
from aiohttp import WSMsgType, web

from daemon.errors import BerthError
from daemon.streaming.channel import (
    PORT_HEADER,
    REQUEST_ID_HEADER,
    STREAM_DATA,
    STREAM_ERROR,
    STREAM_TYPE_HEADER,
)
from daemon.streaming.errors import ProtocolError, SessionClosedError
from daemon.streaming.spdy.frames import RstStatus
from daemon.streaming.spdy.session import Session
from daemon.streaming.spdy.stream import Stream
from daemon.streaming.wschannel import (
    WsData,
    WsProtocol,
    decode_ws,
    encode_port_prefix,
    portforward_ws_channels,
)
from plugins.cri.streaming.backend import StreamBackend
from plugins.cri.streaming.spdy import SpdySink, SpdySource
from plugins.cri.streaming.streams import ByteSink, ByteSource, QueueSource
from plugins.cri.streaming.websocket import WsChannels, WsSink

log = structlog.get_logger("berth.cri.streaming")

CHUNK = 64 << 10


async def forward(
    backend: StreamBackend,
    sandbox_id: str,
    port: int,
    source: ByteSource,
    sink: ByteSink,
    report_error: ByteSink,
) -> None:
    """One forwarded connection: client (source/sink) <-> ``port`` inside the sandbox's netns."""
    try:
        reader, writer = await backend.port_forward(sandbox_id, port)
    except BerthError as exc:
        log.info("portforward.connect_failed", sandbox=sandbox_id, port=port, error=exc.message)
        await report_error.write(
            f"error forwarding port {port} to pod {sandbox_id}, uid : {exc.message}".encode()
        )
        await report_error.close()
        await sink.close()
        return

    async def upstream() -> None:
        try:
            while data := await source.read():
                writer.write(data)
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()
        except (ConnectionError, OSError):
            pass

    async def downstream() -> None:
        try:
            while data := await reader.read(CHUNK):
                await sink.write(data)
        except (ConnectionError, OSError):
            pass
        finally:
            await sink.close()

    up = asyncio.create_task(upstream())
    try:
        await downstream()
        # The pod ended its side: kubelet then tears the pair down; give the client's last bytes a moment.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(up), 1.0)
    finally:
        up.cancel()
        await asyncio.gather(up, return_exceptions=True)
        writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await writer.wait_closed()
        await report_error.close()


# -- SPDY ------------------------------------------------------------------------------


@dataclass
class _Pair:
    port: int
    data: Stream | None = None
    error: Stream | None = None
    started: bool = field(default=False)


def _port_of(stream: Stream) -> int:
    value = stream.headers.get(PORT_HEADER, "")
    if not value.isdigit() or not 1 <= int(value) <= 0xFFFF:
        raise ProtocolError(f"port-forward: stream {stream.id}: bad port header {value!r}")
    return int(value)


async def serve_spdy(session: Session, backend: StreamBackend, sandbox_id: str) -> None:
    """Serve every stream pair the client opens until the session ends."""
    pairs: dict[str, _Pair] = {}
    tasks: set[asyncio.Task[None]] = set()
    try:
        while True:
            try:
                stream = await session.accept()
            except SessionClosedError:
                return
            kind = stream.headers.get(STREAM_TYPE_HEADER, "")
            request_id = stream.headers.get(REQUEST_ID_HEADER, "")
            try:
                if kind not in (STREAM_DATA, STREAM_ERROR):
                    raise ProtocolError(f"port-forward: unexpected stream type {kind!r}")
                port = _port_of(stream)
                pair = pairs.setdefault(request_id, _Pair(port))
                if pair.port != port or getattr(pair, kind) is not None:
                    raise ProtocolError(f"port-forward: request {request_id!r}: second {kind} stream")
            except ProtocolError as exc:
                log.info("portforward.bad_stream", error=str(exc))
                await stream.reset(RstStatus.PROTOCOL_ERROR)
                continue
            await stream.reply()
            setattr(pair, kind, stream)
            if pair.data is not None and pair.error is not None:
                del pairs[request_id]
                task = asyncio.create_task(
                    forward(
                        backend,
                        sandbox_id,
                        pair.port,
                        SpdySource(pair.data),
                        SpdySink(pair.data),
                        SpdySink(pair.error),
                    )
                )
                tasks.add(task)
                task.add_done_callback(tasks.discard)
    finally:
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await session.close()


# -- WebSocket -------------------------------------------------------------------------


async def _all(tasks: list[asyncio.Task[None]]) -> None:
    await asyncio.gather(*tasks, return_exceptions=True)


async def serve_websocket(
    ws: web.WebSocketResponse, protocol: WsProtocol, backend: StreamBackend, sandbox_id: str, ports: list[int]
) -> None:
    channels = WsChannels(ws, protocol)
    sources: dict[int, QueueSource] = {}
    tasks = []
    for index, port in enumerate(ports):
        data_ch, error_ch = portforward_ws_channels(index)
        prefix = encode_port_prefix(port)
        await channels.send(data_ch, prefix)
        await channels.send(error_ch, prefix)
        sources[data_ch] = source = QueueSource()
        sink, error_sink = WsSink(channels, data_ch), WsSink(channels, error_ch)
        tasks.append(asyncio.create_task(forward(backend, sandbox_id, port, source, sink, error_sink)))

    async def read() -> None:
        try:
            async for msg in ws:
                if msg.type not in (WSMsgType.BINARY, WSMsgType.TEXT):
                    continue
                frame = decode_ws(protocol, msg.data)
                if isinstance(frame, WsData) and frame.channel in sources:
                    sources[frame.channel].feed(frame.data)
        except ProtocolError as exc:
            log.info("ws.protocol_error", error=str(exc))
        finally:
            for source in sources.values():
                source.feed_eof()

    reader = asyncio.create_task(read())
    try:
        # Every port's connection ended, or the client went away (then the rest is cancelled).
        all_done = asyncio.ensure_future(_all(tasks))
        await asyncio.wait([all_done, reader], return_when=asyncio.FIRST_COMPLETED)
        all_done.cancel()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        with contextlib.suppress(ConnectionError, RuntimeError):
            await ws.close()
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
