"""A TCP proxy on 127.0.0.1 that caps the bytes per second flowing back to its clients: a slower link.

The registry on loopback serves faster than any unpacker writes, so a pull
from it never shows what overlapping download and unpack is worth. Put in
front of the registry, :class:`LinkProxy` makes the download the slower
side, as a real network often is. The cap is shared by every connection (one
link), applies to the server-to-client direction only (requests are small),
and is paced per chunk of at most :data:`CHUNK` bytes.

Use inside the event loop that runs the pulls::

    async with LinkProxy("127.0.0.1", registry_port, bytes_per_s=25e6) as proxy:
        ref = f"127.0.0.1:{proxy.port}/big:latest"
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

CHUNK = 64 << 10


class Pace:
    """One link's schedule: a chunk goes once the link has carried the chunks before it, at ``rate``."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self._free_at = time.monotonic()  # when the link has sent everything handed out so far

    async def take(self, n: int) -> None:
        now = time.monotonic()
        start = max(self._free_at, now)
        self._free_at = start + n / self.rate
        if start > now:
            await asyncio.sleep(start - now)


class LinkProxy:
    """Forwards each accepted connection to ``host:port``; the answers flow at ``bytes_per_s`` at most."""

    def __init__(self, host: str, port: int, bytes_per_s: float) -> None:
        if bytes_per_s <= 0:
            raise ValueError(f"bytes_per_s: expected a rate > 0, got {bytes_per_s}")
        self.host, self.target_port = host, port
        self.pace = Pace(bytes_per_s)
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    async def __aenter__(self) -> LinkProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def __aexit__(self, *exc: object) -> None:
        """Stop accepting, cut every connection, and wait for the handlers to see it.

        Handlers are ended by aborting their sockets, not cancelled: asyncio's
        streams log a cancelled client handler as an error.
        """
        if self._server is not None:
            self._server.close()
        for w in list(self._writers):
            w.transport.abort()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5.0)
        if self._server is not None:
            await self._server.wait_closed()

    async def _accept(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(client_w)
        try:
            upstream_r, upstream_w = await asyncio.open_connection(self.host, self.target_port)
        except OSError:
            client_w.close()
            self._writers.discard(client_w)
            self._tasks.discard(task)
            return
        self._writers.add(upstream_w)
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._pipe(client_r, upstream_w, paced=False))
                tg.create_task(self._pipe(upstream_r, client_w, paced=True))
        except* (OSError, asyncio.IncompleteReadError):
            pass  # a side hung up mid-stream: the connection is over either way
        finally:
            for w in (client_w, upstream_w):
                w.close()
                self._writers.discard(w)
            self._tasks.discard(task)

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, *, paced: bool) -> None:
        while data := await src.read(CHUNK):
            if paced:
                await self.pace.take(len(data))
            dst.write(data)
            await dst.drain()
        with contextlib.suppress(OSError):
            if dst.can_write_eof():
                dst.write_eof()
