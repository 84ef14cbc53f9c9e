"""ttrpc server on a unix socket (the shim side of containerd's task API).

Contract, following containerd/ttrpc server.go:

* every request runs in its own task, so a slow handler never delays others
  on the same or other connections;
* unknown service or method -> UNIMPLEMENTED ("service X" / "method Y");
  a handler's BerthError -> its status and message (daemon.errors.grpc_status);
  anything else -> INTERNAL, logged with its traceback;
* ``timeout_nano`` > 0 bounds the handler; when it expires the handler is
  cancelled and the client gets DEADLINE_EXCEEDED;
* protocol faults of one stream (even or reused stream id, oversized frame,
  undecodable payload) are answered with a status on that stream and the
  connection goes on; a truncated frame or a closed socket ends only that
  connection.

Streaming methods are not implemented: DATA frames are answered with
INVALID_ARGUMENT ("StreamID is no longer active"), as upstream does for data on
a stream it does not know.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import os
import socket
import stat
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import structlog
from grpclib.const import Status as Code

from daemon.errors import DeadlineExceeded, FailedPrecondition, InvalidArgument, Unimplemented, grpc_status
from daemon.ttrpc.frame import (
    MESSAGE_LENGTH_MAX,
    Frame,
    MessageType,
    OversizedMessage,
    Request,
    Response,
    encode_frame,
    read_frame,
)
from protos.google.rpc import Status

log = structlog.get_logger(__name__)

Handler = Callable[[Any], Awaitable[Any]]

_metadata: contextvars.ContextVar[dict[str, list[str]]] = contextvars.ContextVar("ttrpc_metadata")


def request_metadata() -> dict[str, list[str]]:
    """The metadata of the request the calling handler serves (empty outside one)."""
    return _metadata.get({})


@dataclass(frozen=True)
class Method:
    """One served method: the class its request payload decodes to, and the handler.

    The handler returns a betterproto message (its bytes become the response
    payload) or raises.
    """

    request: type[Any]
    handler: Handler


Services = Mapping[str, Mapping[str, Method]]


class TtrpcServer:
    def __init__(self, services: Services) -> None:
        self._services = services
        self._server: asyncio.Server | None = None
        self._path: str | None = None
        self._connections: set[asyncio.Task[None]] = set()

    @property
    def path(self) -> str | None:
        return self._path

    async def start(self, path: str | os.PathLike[str]) -> None:
        """Listen on ``path`` (mode 0600); a stale socket there is replaced.

        The socket is chmod-ed between bind and listen, so no peer can connect
        while it still has the umask's mode. Anything at ``path`` that is not a
        socket is left alone: FailedPrecondition.
        """
        spath = os.fspath(path)
        try:
            st = os.lstat(spath)
        except FileNotFoundError:
            pass
        else:
            if not stat.S_ISSOCK(st.st_mode):
                raise FailedPrecondition(f"ttrpc socket {spath!r}: exists and is not a socket")
            os.unlink(spath)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(spath)
            os.chmod(spath, 0o600)
            sock.listen(128)
            sock.setblocking(False)
            self._server = await asyncio.start_unix_server(self._on_connection, sock=sock)
        except BaseException:
            sock.close()
            raise
        self._path = spath
        log.info("ttrpc.listen", path=spath)

    async def stop(self) -> None:
        """Stop listening, drop every connection (in-flight calls are cancelled), remove the socket."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        await server.wait_closed()
        if self._path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path)
        log.info("ttrpc.stop", path=self._path)

    async def _on_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            await _Connection(self._services, reader, writer).serve()
        finally:
            self._connections.discard(task)


class _Connection:
    def __init__(
        self, services: Services, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self._services = services
        self._reader = reader
        self._writer = writer
        self._write_lock = asyncio.Lock()
        self._calls: set[asyncio.Task[None]] = set()
        self._last_stream_id = 0

    async def serve(self) -> None:
        try:
            while True:
                try:
                    frame = await read_frame(self._reader)
                except OversizedMessage as exc:
                    await self._send_status(exc.header.stream_id, Code.RESOURCE_EXHAUSTED, exc.message)
                    continue
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                await self._on_frame(frame)
        finally:
            for call in list(self._calls):
                call.cancel()
            await asyncio.gather(*self._calls, return_exceptions=True)
            self._writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await self._writer.wait_closed()

    async def _on_frame(self, frame: Frame) -> None:
        sid = frame.header.stream_id
        if frame.header.type == MessageType.DATA:
            await self._send_status(sid, Code.INVALID_ARGUMENT, "StreamID is no longer active")
            return
        if frame.header.type != MessageType.REQUEST:
            return  # upstream ignores unknown types for forward compatibility
        if sid % 2 != 1:
            await self._send_status(
                sid, Code.INVALID_ARGUMENT, "StreamID must be odd for client initiated streams"
            )
            return
        if sid <= self._last_stream_id:
            await self._send_status(
                sid, Code.INVALID_ARGUMENT, "StreamID cannot be re-used and must increment"
            )
            return
        self._last_stream_id = sid
        try:
            request = Request().parse(frame.payload)
        except Exception as exc:  # noqa: BLE001 - betterproto raises assorted types on bad input
            await self._send_status(sid, Code.INVALID_ARGUMENT, f"unmarshal request error: {exc}")
            return
        call = asyncio.create_task(self._call(sid, request))
        self._calls.add(call)
        call.add_done_callback(self._calls.discard)

    async def _call(self, sid: int, request: Request) -> None:
        metadata: dict[str, list[str]] = {}
        for kv in request.metadata:
            metadata.setdefault(kv.key, []).append(kv.value)
        _metadata.set(metadata)
        timeout = request.timeout_nano / 1e9 if request.timeout_nano > 0 else None
        response = Response(status=Status(code=Code.OK.value))
        try:
            method = self._lookup(request.service, request.method)
            try:
                message = method.request().parse(request.payload)
            except Exception as exc:
                raise InvalidArgument(
                    f"{request.service}/{request.method}: unmarshal payload: {exc}"
                ) from exc
            deadline = asyncio.timeout(timeout)
            try:
                async with deadline:
                    result = await method.handler(message)
            except TimeoutError:
                if not deadline.expired():
                    raise  # the handler's own timeout, not the caller's deadline
                raise DeadlineExceeded(
                    f"{request.service}/{request.method}: deadline exceeded after {timeout}s"
                ) from None
            response.payload = bytes(result)
        except Exception as exc:
            code, text = grpc_status(exc)
            if code == Code.INTERNAL:
                log.exception("ttrpc.handler_failed", service=request.service, method=request.method)
            response.status = Status(code=code.value, message=text)
        data = bytes(response)
        if len(data) > MESSAGE_LENGTH_MAX:
            response = Response(
                status=Status(
                    code=Code.RESOURCE_EXHAUSTED.value,
                    message=f"{request.service}/{request.method}: response of {len(data)} bytes exceeds "
                    f"maximum message size of {MESSAGE_LENGTH_MAX}",
                )
            )
            data = bytes(response)
        await self._send(sid, data)

    def _lookup(self, service: str, method: str) -> Method:
        methods = self._services.get(service)
        if methods is None:
            raise Unimplemented(f"service {service}")
        found = methods.get(method)
        if found is None:
            raise Unimplemented(f"method {method}")
        return found

    async def _send_status(self, sid: int, code: Code, message: str) -> None:
        await self._send(sid, bytes(Response(status=Status(code=code.value, message=message))))

    async def _send(self, sid: int, payload: bytes) -> None:
        """Write a response; a peer that went away is not an error of ours."""
        data = encode_frame(sid, MessageType.RESPONSE, 0, payload)
        async with self._write_lock:
            try:
                self._writer.write(data)
                await self._writer.drain()
            except (ConnectionError, OSError) as exc:
                log.debug("ttrpc.send_failed", stream_id=sid, error=str(exc))
