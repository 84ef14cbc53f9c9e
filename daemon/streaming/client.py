"""berth's own streaming client: exec/attach and port-forward over SPDY/3.1 or WebSocket.

Used by the tests, bench/ and ``berth cri exec|attach|port-forward``, against
any server that speaks what kubelet's streaming server speaks (berth's, containerd's)::

    cmd = await connect_command(url, stdin=True, stdout=True, stderr=True)   # SPDY, v4 first
    await cmd.write_stdin(b"hi\\n"); await cmd.close_stdin()
    out = await cmd.read_stdout()                     # b"" at the end of the output
    status = await cmd.wait()                         # ExitStatus(exit_code=0) once the server reported
    await cmd.close()

    result = await run_command(url, stdin=b"input", transport="websocket")  # all of it at once

    async with await connect_portforward(url) as pf:                        # SPDY port-forward
        conn = await pf.open(8080)
        await conn.write(b"GET / HTTP/1.0\\r\\n\\r\\n"); await conn.close_write()
        reply = await conn.read_all()

An HTTP answer other than the upgrade raises: NotFound for 404 (unknown,
used or expired token), InvalidArgument for 400, PermissionDenied for 403
(no common subprotocol), Unavailable otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Literal
from urllib.parse import urlsplit

import aiohttp

from daemon.errors import BerthError, InvalidArgument, NotFound, PermissionDenied, Unavailable
from daemon.streaming.channel import (
    PORT_HEADER,
    PORTFORWARD_PROTOCOL,
    PROTOCOL_V4,
    REQUEST_ID_HEADER,
    SPDY_REMOTECOMMAND_PROTOCOLS,
    STREAM_DATA,
    STREAM_ERROR,
    STREAM_RESIZE,
    STREAM_STDERR,
    STREAM_STDIN,
    STREAM_STDOUT,
    STREAM_TYPE_HEADER,
    ExitStatus,
    TerminalSize,
    check_spdy_upgrade_response,
    parse_error_stream,
    protocol_version,
    spdy_upgrade_request,
)
from daemon.streaming.errors import ProtocolError, SessionClosedError, StreamResetError
from daemon.streaming.spdy.headers import Headers
from daemon.streaming.spdy.session import Session
from daemon.streaming.spdy.stream import Stream
from daemon.streaming.wschannel import (
    CHANNEL_ERROR,
    CHANNEL_RESIZE,
    CHANNEL_STDERR,
    CHANNEL_STDIN,
    CHANNEL_STDOUT,
    WS_PROTOCOLS,
    WS_REMOTECOMMAND_PROTOCOLS,
    WsClose,
    WsData,
    WsProtocol,
    decode_port_prefix,
    decode_ws,
    encode_ws,
    encode_ws_close,
    portforward_ws_channels,
)

Transport = Literal["spdy", "websocket"]
MAX_RESPONSE_HEAD = 64 << 10
_GONE = (StreamResetError, SessionClosedError)


def _http_error(status: int, body: str) -> BerthError:
    text = f"streaming server answered {status}: {body.strip()[:200]}"
    if status == 404:
        return NotFound(text)
    if status == 400:
        return InvalidArgument(text)
    if status == 403:
        return PermissionDenied(text)
    return Unavailable(text)


# -- SPDY upgrade ------------------------------------------------------------------------


async def spdy_connect(url: str, protocols: Sequence[str]) -> tuple[Session, str]:
    """POST ``url`` with ``Upgrade: SPDY/3.1``; the started client session and the chosen subprotocol."""
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise InvalidArgument(f"streaming url {url!r}: expected http://host:port/...")
    port = parts.port or 80
    try:
        reader, writer = await asyncio.open_connection(parts.hostname, port, limit=1 << 20)
    except OSError as exc:
        raise Unavailable(f"streaming server {parts.netloc}: {exc.strerror or exc}") from None
    try:
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        writer.write(spdy_upgrade_request("POST", target, parts.netloc, protocols))
        await writer.drain()
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.LimitOverrunError:
            raise ProtocolError("streaming: response head too large") from None
        except asyncio.IncompleteReadError:
            raise Unavailable(f"streaming server {parts.netloc}: closed the connection") from None
        lines = head.decode("latin-1").split("\r\n")
        try:
            status = int(lines[0].split(" ", 2)[1])
        except (IndexError, ValueError):
            raise ProtocolError(f"streaming: bad status line {lines[0]!r}") from None
        headers = [(k.strip(), v.strip()) for k, _, v in (line.partition(":") for line in lines[1:] if line)]
        if status != 101:
            length_text = dict((k.lower(), v) for k, v in headers).get("content-length", "")
            length = int(length_text) if length_text.isdigit() else 0
            body = b""
            with contextlib.suppress(asyncio.IncompleteReadError, OSError, TimeoutError):
                body = await asyncio.wait_for(reader.readexactly(min(length, 4096)), 5)
            raise _http_error(status, body.decode("utf-8", "replace"))
        protocol = check_spdy_upgrade_response(status, headers, protocols)
        session = Session(reader, writer, client=True)
        await session.start()
        return session, protocol
    except BaseException:
        writer.close()
        raise


# -- exec / attach -----------------------------------------------------------------------


@dataclass(frozen=True)
class CommandResult:
    status: ExitStatus
    stdout: bytes
    stderr: bytes

    @property
    def exit_code(self) -> int | None:
        return self.status.exit_code


class RemoteCommand:
    """A live exec/attach: write stdin, read stdout/stderr, resize, then :meth:`wait` for the status."""

    protocol: str

    async def write_stdin(self, data: bytes) -> None:
        raise NotImplementedError

    async def close_stdin(self) -> None:
        """End of input (SPDY FIN; WebSocket v5 close signal; a no-op for older WebSocket protocols)."""
        raise NotImplementedError

    async def resize(self, width: int, height: int) -> None:
        raise NotImplementedError

    async def read_stdout(self) -> bytes:
        """The next chunk of stdout; ``b""`` at its end."""
        raise NotImplementedError

    async def read_stderr(self) -> bytes:
        raise NotImplementedError

    async def wait(self) -> ExitStatus:
        """Until the server reported the end (the error stream's end); the exit status."""
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> RemoteCommand:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class SpdyCommand(RemoteCommand):
    def __init__(self, session: Session, protocol: str, streams: dict[str, Stream]) -> None:
        self.session = session
        self.protocol = protocol
        self._streams = streams

    @classmethod
    async def open(
        cls, session: Session, protocol: str, *, stdin: bool, stdout: bool, stderr: bool, tty: bool
    ) -> SpdyCommand:
        wanted = [STREAM_ERROR]
        wanted += [name for name, on in ((STREAM_STDIN, stdin), (STREAM_STDOUT, stdout)) if on]
        if stderr and not tty:
            wanted.append(STREAM_STDERR)
        if tty and protocol_version(protocol) >= 3:
            wanted.append(STREAM_RESIZE)
        streams: dict[str, Stream] = {}
        for name in wanted:  # opened back to back, replies awaited together: one round trip
            streams[name] = await session.open_stream(Headers({STREAM_TYPE_HEADER: name}), wait_reply=False)
        await asyncio.gather(*(s.wait_reply() for s in streams.values()))
        # the client never writes on the error stream: half-close it now, or a server that waits
        # for both directions to end (containerd's) resets it, racing the exit status it sent
        with contextlib.suppress(*_GONE):
            await streams[STREAM_ERROR].close()
        return cls(session, protocol, streams)

    def _stream(self, name: str) -> Stream:
        stream = self._streams.get(name)
        if stream is None:
            raise InvalidArgument(f"remotecommand: no {name} stream was asked for")
        return stream

    async def write_stdin(self, data: bytes) -> None:
        await self._stream(STREAM_STDIN).write(data)

    async def close_stdin(self) -> None:
        with contextlib.suppress(*_GONE):
            await self._stream(STREAM_STDIN).close()

    async def resize(self, width: int, height: int) -> None:
        if STREAM_RESIZE in self._streams:
            await self._streams[STREAM_RESIZE].write(TerminalSize(width, height).encode())

    async def _read(self, name: str) -> bytes:
        try:
            return await self._stream(name).read()
        except _GONE:
            return b""

    async def read_stdout(self) -> bytes:
        return await self._read(STREAM_STDOUT)

    async def read_stderr(self) -> bytes:
        return await self._read(STREAM_STDERR)

    async def wait(self) -> ExitStatus:
        error = self._streams[STREAM_ERROR]
        data = b""
        try:
            while chunk := await error.read():
                data += chunk
        except _GONE as exc:
            if not data:
                return ExitStatus(None, f"connection lost before the exit status: {exc}")
        return parse_error_stream(self.protocol, data)

    async def close(self) -> None:
        await self.session.close()


async def _take(queue: asyncio.Queue[bytes]) -> bytes:
    """The next chunk a reader task queued; ``b""`` (the end) stays queued for the next caller."""
    data = await queue.get()
    if not data:
        queue.put_nowait(b"")
    return data


class _WsClient:
    """One client WebSocket and the task reading it; subclasses set up their state, then call this."""

    def __init__(
        self, http: aiohttp.ClientSession, ws: aiohttp.ClientWebSocketResponse, protocol: WsProtocol
    ) -> None:
        self._http = http
        self._ws = ws
        self._proto = protocol
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        raise NotImplementedError

    async def _send(self, channel: int, data: bytes) -> None:
        message = encode_ws(self._proto, channel, data)
        if isinstance(message, str):
            await self._ws.send_str(message)
        else:
            await self._ws.send_bytes(message)

    async def close(self) -> None:
        await self._ws.close()
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader
        await self._http.close()


class WsCommand(_WsClient, RemoteCommand):
    def __init__(
        self, http: aiohttp.ClientSession, ws: aiohttp.ClientWebSocketResponse, protocol: WsProtocol
    ):
        self.subprotocol = protocol.name
        self.protocol = protocol.remotecommand_protocol
        self._queues: dict[int, asyncio.Queue[bytes]] = {
            CHANNEL_STDOUT: asyncio.Queue(),
            CHANNEL_STDERR: asyncio.Queue(),
        }
        self._error = b""
        self._done = asyncio.Event()
        super().__init__(http, ws, protocol)

    async def _read(self) -> None:
        try:
            async for msg in self._ws:
                if msg.type not in (aiohttp.WSMsgType.BINARY, aiohttp.WSMsgType.TEXT):
                    continue
                frame = decode_ws(self._proto, msg.data)
                if isinstance(frame, WsData) and frame.data:
                    if frame.channel == CHANNEL_ERROR:
                        self._error += frame.data
                    elif frame.channel in self._queues:
                        self._queues[frame.channel].put_nowait(frame.data)
                elif isinstance(frame, WsClose) and frame.channel in self._queues:
                    self._queues[frame.channel].put_nowait(b"")
        finally:
            for queue in self._queues.values():
                queue.put_nowait(b"")
            self._done.set()

    async def write_stdin(self, data: bytes) -> None:
        await self._send(CHANNEL_STDIN, data)

    async def close_stdin(self) -> None:
        if self._proto.close_signal:
            await self._ws.send_bytes(encode_ws_close(self._proto, CHANNEL_STDIN))

    async def resize(self, width: int, height: int) -> None:
        await self._send(CHANNEL_RESIZE, TerminalSize(width, height).encode())

    async def read_stdout(self) -> bytes:
        return await _take(self._queues[CHANNEL_STDOUT])

    async def read_stderr(self) -> bytes:
        return await _take(self._queues[CHANNEL_STDERR])

    async def wait(self) -> ExitStatus:
        await self._done.wait()
        return parse_error_stream(self.protocol, self._error)


async def _ws_connect(
    url: str, protocols: Sequence[str]
) -> tuple[aiohttp.ClientSession, aiohttp.ClientWebSocketResponse, WsProtocol]:
    http = aiohttp.ClientSession()
    try:
        try:
            ws = await http.ws_connect(url, protocols=tuple(protocols), autoping=True, max_msg_size=4 << 20)
        except aiohttp.WSServerHandshakeError as exc:
            raise _http_error(exc.status, exc.message) from None
        except aiohttp.ClientError as exc:
            raise Unavailable(f"streaming server {url}: {exc}") from None
        chosen = ws.protocol or ""
        if chosen not in WS_PROTOCOLS or (chosen and chosen not in protocols):
            await ws.close()
            raise ProtocolError(f"websocket: server chose subprotocol {chosen!r}, which we did not offer")
        return http, ws, WS_PROTOCOLS[chosen]
    except BaseException:
        await http.close()
        raise


async def connect_command(
    url: str,
    *,
    stdin: bool = False,
    stdout: bool = True,
    stderr: bool = True,
    tty: bool = False,
    transport: Transport = "spdy",
    protocols: Sequence[str] | None = None,
) -> RemoteCommand:
    """Connect to an exec/attach URL; the streams asked for must match what the CRI request said."""
    if transport == "spdy":
        session, protocol = await spdy_connect(url, protocols or SPDY_REMOTECOMMAND_PROTOCOLS)
        try:
            return await SpdyCommand.open(
                session, protocol, stdin=stdin, stdout=stdout, stderr=stderr, tty=tty
            )
        except BaseException:
            await session.close()
            raise
    http, ws, proto = await _ws_connect(url, protocols or WS_REMOTECOMMAND_PROTOCOLS)
    return WsCommand(http, ws, proto)


async def run_command(
    url: str,
    stdin: bytes | None = None,
    *,
    stdout: bool = True,
    stderr: bool = True,
    tty: bool = False,
    transport: Transport = "spdy",
    protocols: Sequence[str] | None = None,
) -> CommandResult:
    """Connect, send ``stdin`` (then end it), collect all output and the exit status."""
    cmd = await connect_command(
        url,
        stdin=stdin is not None,
        stdout=stdout,
        stderr=stderr and not tty,
        tty=tty,
        transport=transport,
        protocols=protocols,
    )
    async with cmd:

        async def feed() -> None:
            if stdin is not None:
                if stdin:
                    await cmd.write_stdin(stdin)
                await cmd.close_stdin()

        async def drain(read: bool, reader: str) -> bytes:
            if not read:
                return b""
            out = bytearray()
            while chunk := await getattr(cmd, reader)():
                out += chunk
            return bytes(out)

        _, out, err = await asyncio.gather(
            feed(), drain(stdout, "read_stdout"), drain(stderr and not tty, "read_stderr")
        )
        status = await cmd.wait()
    return CommandResult(status, out, err)


# -- port-forward ------------------------------------------------------------------------


class PortConnection:
    """One forwarded connection (SPDY data + error stream pair)."""

    def __init__(self, port: int, data: Stream, error: Stream) -> None:
        self.port = port
        self._data = data
        self._error = error

    async def write(self, data: bytes) -> None:
        await self._data.write(data)

    async def close_write(self) -> None:
        with contextlib.suppress(*_GONE):
            await self._data.close()

    async def read(self) -> bytes:
        try:
            return await self._data.read()
        except _GONE:
            return b""

    async def read_all(self) -> bytes:
        out = bytearray()
        while chunk := await self.read():
            out += chunk
        return bytes(out)

    async def error(self) -> str:
        """What the server wrote on the error stream (read to its end); "" if all went well."""
        data = b""
        with contextlib.suppress(*_GONE):
            while chunk := await self._error.read():
                data += chunk
        return data.decode("utf-8", "replace")

    async def close(self) -> None:
        await self.close_write()
        with contextlib.suppress(*_GONE):
            await self._error.close()


class PortForward:
    """A SPDY port-forward session: any number of connections to any ports of the pod."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self._ids = itertools.count()

    async def open(self, port: int) -> PortConnection:
        request_id = str(next(self._ids))
        headers = {PORT_HEADER: str(port), REQUEST_ID_HEADER: request_id}
        error = await self.session.open_stream(Headers({STREAM_TYPE_HEADER: STREAM_ERROR, **headers}))
        data = await self.session.open_stream(Headers({STREAM_TYPE_HEADER: STREAM_DATA, **headers}))
        await error.close()  # the client never writes on the error stream (client-go closes it too)
        return PortConnection(port, data, error)

    async def close(self) -> None:
        await self.session.close()

    async def __aenter__(self) -> PortForward:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()


async def connect_portforward(url: str) -> PortForward:
    session, _ = await spdy_connect(url, (PORTFORWARD_PROTOCOL,))
    return PortForward(session)


class WsPortForward(_WsClient):
    """Port-forward over WebSocket: one connection per port named in the URL's ``port`` query."""

    def __init__(
        self,
        http: aiohttp.ClientSession,
        ws: aiohttp.ClientWebSocketResponse,
        proto: WsProtocol,
        ports: list[int],
    ):
        self.ports = ports
        self._data: dict[int, asyncio.Queue[bytes]] = {i: asyncio.Queue() for i in range(len(ports))}
        self._errors: dict[int, bytes] = {i: b"" for i in range(len(ports))}
        self._prefixed: set[int] = set()
        super().__init__(http, ws, proto)

    async def _read(self) -> None:
        try:
            async for msg in self._ws:
                if msg.type not in (aiohttp.WSMsgType.BINARY, aiohttp.WSMsgType.TEXT):
                    continue
                frame = decode_ws(self._proto, msg.data)
                if not isinstance(frame, WsData):
                    continue
                index, is_error = divmod(frame.channel, 2)
                if index not in self._data:
                    continue
                payload = frame.data
                if frame.channel not in self._prefixed:  # the server's first message: the port
                    self._prefixed.add(frame.channel)
                    decode_port_prefix(payload)
                    payload = payload[2:]
                if is_error:
                    self._errors[index] += payload
                elif payload:
                    self._data[index].put_nowait(payload)
        finally:
            for queue in self._data.values():
                queue.put_nowait(b"")

    async def write(self, index: int, data: bytes) -> None:
        await self._send(portforward_ws_channels(index)[0], data)

    async def read(self, index: int) -> bytes:
        """The next chunk from the ``index``-th port; ``b""`` once the server closed the socket."""
        return await _take(self._data[index])

    def error(self, index: int) -> str:
        return self._errors[index].decode("utf-8", "replace")


async def connect_portforward_ws(
    url: str, ports: Sequence[int], protocols: Sequence[str] = ()
) -> WsPortForward:
    query = "&".join(f"port={p}" for p in ports)
    http, ws, proto = await _ws_connect(f"{url}?{query}", protocols or (PROTOCOL_V4,))
    return WsPortForward(http, ws, proto, list(ports))
