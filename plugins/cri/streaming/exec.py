"""Exec over either transport, and the run loop attach shares with it.

:func:`run_command` runs the backend call with the client's stdio, watching
the connection meanwhile: if the client goes away first the backend call is
cancelled (the backend then closes the process's stdin, kills it after a grace
and deletes it), else the exit status goes on the error stream as the
negotiated subprotocol wants it (v4+: a JSON Status, older: text on failure
only), and the connection is closed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Protocol

import structlog

from daemon.errors import BerthError, Unavailable
from daemon.streaming.channel import error_stream_payload, failure_status, protocol_version
from plugins.cri.streaming.backend import StreamBackend
from plugins.cri.streaming.streams import ProcessIO
from protos.runtime import v1 as cri

log = structlog.get_logger("berth.cri.streaming")


class CommandConnection(Protocol):
    """What SpdyCommand and WsCommand have in common."""

    io: ProcessIO

    @property
    def protocol(self) -> str: ...

    async def wait_gone(self) -> None: ...

    async def finish(self, status: bytes) -> None: ...


def status_payload(protocol: str, result: int | BaseException) -> bytes:
    if isinstance(result, int):
        return error_stream_payload(protocol, result)
    message = result.message if isinstance(result, BerthError) else str(result)
    if protocol_version(protocol) >= 4:
        return failure_status(message)
    return message.encode()


async def run_command(
    conn: CommandConnection,
    action: Callable[[ProcessIO], Coroutine[object, object, int]],
    what: str,
    target: str,
) -> None:
    work = asyncio.create_task(action(conn.io))
    gone = asyncio.create_task(conn.wait_gone())
    try:
        await asyncio.wait((work, gone), return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:  # the server is stopping
        work.cancel()
        gone.cancel()
        await asyncio.gather(work, gone, return_exceptions=True)
        stopping = Unavailable("streaming server is shutting down")
        await asyncio.shield(conn.finish(status_payload(conn.protocol, stopping)))
        raise
    gone.cancel()
    await asyncio.gather(gone, return_exceptions=True)
    if not work.done():
        log.info(f"{what}.client_gone", target=target)
        work.cancel()
        await asyncio.gather(work, return_exceptions=True)
        await conn.finish(b"")
        return
    result: int | BaseException
    try:
        result = work.result()
    except BerthError as exc:
        log.info(f"{what}.failed", target=target, error=exc.message)
        result = exc
    except Exception as exc:
        log.exception(f"{what}.error", target=target)
        result = exc
    await conn.finish(status_payload(conn.protocol, result))


async def serve_exec(conn: CommandConnection, backend: StreamBackend, request: cri.ExecRequest) -> None:
    async def action(io: ProcessIO) -> int:
        return await backend.exec(request.container_id, list(request.cmd), io)

    await run_command(conn, action, "exec", request.container_id)
