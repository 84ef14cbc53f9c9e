"""Attach over either transport: the container's stdio until it exits (see :mod:`.exec` for the loop)."""

from __future__ import annotations

from plugins.cri.streaming.backend import StreamBackend
from plugins.cri.streaming.exec import CommandConnection, run_command
from plugins.cri.streaming.streams import ProcessIO
from protos.runtime import v1 as cri


async def serve_attach(conn: CommandConnection, backend: StreamBackend, request: cri.AttachRequest) -> None:
    async def action(io: ProcessIO) -> int:
        return await backend.attach(request.container_id, io)

    await run_command(conn, action, "attach", request.container_id)
