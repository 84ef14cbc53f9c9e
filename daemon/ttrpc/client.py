"""ttrpc client: many unary calls multiplexed on one unix-socket connection.

Follows containerd/ttrpc client.go: stream ids are odd, start at 1 and grow
by 2; a call's timeout travels as ``timeout_nano`` so the server gives up too.
A lost connection fails every pending and later call with Unavailable naming
the socket; reconnecting is the caller's decision (a shim that died is not
silently replaced).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import structlog
from grpclib.const import Status as Code

from daemon.errors import BerthError, DeadlineExceeded, Internal, Unavailable, from_grpc_status
from daemon.ttrpc.frame import (
    KeyValue,
    MessageType,
    OversizedMessage,
    Request,
    Response,
    encode_frame,
    read_frame,
)

log = structlog.get_logger(__name__)

M = TypeVar("M")

_MAX_STREAM_ID = 0xFFFFFFFF


class TtrpcClient:
    def __init__(self, path: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Use :meth:`connect`; this wraps an already open connection."""
        self._path = path
        self._reader = reader
        self._writer = writer
        self._next_id = 1
        self._pending: dict[int, asyncio.Future[Response]] = {}
        self._write_lock = asyncio.Lock()
        self._error: BerthError | None = None
        self._receiver = asyncio.create_task(self._receive(), name=f"ttrpc-recv {path}")

    @classmethod
    async def connect(cls, path: str | os.PathLike[str]) -> TtrpcClient:
        spath = os.fspath(path)
        try:
            reader, writer = await asyncio.open_unix_connection(spath)
        except OSError as exc:
            raise Unavailable(f"ttrpc {spath}: connect: {exc.strerror or exc}") from exc
        return cls(spath, reader, writer)

    @property
    def path(self) -> str:
        return self._path

    @property
    def closed(self) -> bool:
        return self._error is not None

    async def call(
        self,
        service: str,
        method: str,
        request: Any,
        response_cls: type[M],
        *,
        timeout: float | None = None,  # noqa: ASYNC109 - it also travels to the server as timeout_nano
        metadata: Mapping[str, str | Sequence[str]] | None = None,
    ) -> M:
        """Call ``service/method`` and decode the reply as ``response_cls``.

        A non-OK status is raised as the matching daemon.errors class
        (from_grpc_status); the local ``timeout`` raises DeadlineExceeded; an
        oversized request raises ResourceExhausted before anything is sent.
        """
        if self._error is not None:
            raise self._error
        sid = self._next_id
        if sid > _MAX_STREAM_ID:
            raise Unavailable(f"ttrpc {self._path}: stream ids exhausted, reconnect")
        self._next_id += 2
        kvs: list[KeyValue] = []
        for key, values in (metadata or {}).items():
            for value in [values] if isinstance(values, str) else values:
                kvs.append(KeyValue(key=key, value=value))
        envelope = Request(
            service=service,
            method=method,
            payload=bytes(request),
            timeout_nano=int(timeout * 1e9) if timeout is not None and timeout > 0 else 0,
            metadata=kvs,
        )
        data = encode_frame(sid, MessageType.REQUEST, 0, bytes(envelope))
        future: asyncio.Future[Response] = asyncio.get_running_loop().create_future()
        self._pending[sid] = future
        deadline = asyncio.timeout(timeout)
        try:
            async with deadline:
                await self._write(data)
                response = await future
        except TimeoutError:
            if not deadline.expired():
                raise
            raise DeadlineExceeded(f"ttrpc {service}/{method}: deadline exceeded after {timeout}s") from None
        finally:
            self._pending.pop(sid, None)
        if response.status.code != Code.OK.value:
            try:
                code = Code(response.status.code)
            except ValueError:
                code = Code.UNKNOWN
            raise from_grpc_status(code, response.status.message)
        try:
            return response_cls().parse(response.payload)  # type: ignore[no-any-return,attr-defined]
        except Exception as exc:
            raise Internal(f"ttrpc {service}/{method}: unmarshal response: {exc}") from exc

    async def close(self) -> None:
        """Close the connection; pending calls fail with Unavailable."""
        self._fail(Unavailable(f"ttrpc {self._path}: client closed"))
        if not self._receiver.done():
            self._receiver.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._receiver
        await self._close_writer()

    async def __aenter__(self) -> TtrpcClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _write(self, data: bytes) -> None:
        async with self._write_lock:
            if self._error is not None:
                raise self._error
            try:
                self._writer.write(data)
                await self._writer.drain()
            except (ConnectionError, OSError) as exc:
                err = Unavailable(f"ttrpc {self._path}: connection lost: {exc}")
                self._fail(err)
                raise err from exc

    async def _receive(self) -> None:
        reason = "connection closed by peer"
        try:
            while True:
                try:
                    frame = await read_frame(self._reader)
                except OversizedMessage as exc:
                    self._settle_error(exc.header.stream_id, exc)
                    continue
                if frame.header.type != MessageType.RESPONSE:
                    continue  # no streaming calls: DATA frames have no taker
                future = self._pending.get(frame.header.stream_id)
                if future is None or future.done():
                    continue  # the caller gave up (timeout, cancel)
                try:
                    future.set_result(Response().parse(frame.payload))
                except Exception as exc:  # noqa: BLE001 - betterproto raises assorted types on bad input
                    future.set_exception(Internal(f"ttrpc {self._path}: unmarshal response: {exc}"))
        except asyncio.IncompleteReadError:
            pass
        except (ConnectionError, OSError) as exc:
            reason = f"connection lost: {exc}"
        except Exception as exc:
            log.exception("ttrpc.client_receive_failed", path=self._path)
            reason = f"protocol error: {exc}"
        self._fail(Unavailable(f"ttrpc {self._path}: {reason}"))
        # Close without waiting: waiting here would share the transport's close
        # waiter with close(), and cancelling this task would cancel it for both.
        self._writer.close()

    def _settle_error(self, sid: int, exc: BerthError) -> None:
        future = self._pending.get(sid)
        if future is not None and not future.done():
            future.set_exception(exc)

    def _fail(self, err: BerthError) -> None:
        if self._error is None:
            self._error = err
            log.debug("ttrpc.client_closed", path=self._path, reason=str(err))
        for future in self._pending.values():
            if not future.done():
                future.set_exception(self._error)

    async def _close_writer(self) -> None:
        self._writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self._writer.wait_closed()
