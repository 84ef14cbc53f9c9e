"""What a streaming handler hands a backend: the client's stdio as plain async byte pipes.

The transports (SPDY streams, WebSocket channels) differ; the backends (the
TaskManager one, a test one running host processes) should not care. So a
handler wraps what the client opened into a :class:`ProcessIO`:

* ``stdin``: a :class:`ByteSource`; ``read()`` returns ``b""`` once the client
  ended its input (SPDY FIN, WebSocket v5 close signal) or went away;
* ``stdout``/``stderr``: :class:`ByteSink`; ``write`` never raises because the
  client left (the handler notices that and cancels the backend call), so a
  backend's copy loop needs no transport error handling; ``close`` ends the stream;
* ``resizes``: terminal sizes in the order the client sent them (tty only).

A backend call is cancelled when the client disconnects; it must then clean up
(close the process's input, kill it after a short grace, delete it) before it
lets the CancelledError out.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Protocol

from daemon.streaming.channel import TerminalSize


class ByteSource(Protocol):
    async def read(self) -> bytes:
        """The next chunk; ``b""`` at end of input."""
        ...


class ByteSink(Protocol):
    async def write(self, data: bytes) -> None: ...

    async def close(self) -> None:
        """End the stream (the client reads EOF). Idempotent."""
        ...


@dataclass
class ProcessIO:
    tty: bool = False
    stdin: ByteSource | None = None
    stdout: ByteSink | None = None
    stderr: ByteSink | None = None
    resizes: asyncio.Queue[TerminalSize] | None = None


class QueueSource:
    """A ByteSource fed by a transport's reader task (``feed``, then ``feed_eof``)."""

    def __init__(self) -> None:
        self._queue: asyncio.Queue[bytes] = asyncio.Queue()
        self._eof = False

    def feed(self, data: bytes) -> None:
        if data and not self._eof:
            self._queue.put_nowait(data)

    def feed_eof(self) -> None:
        if not self._eof:
            self._eof = True
            self._queue.put_nowait(b"")

    async def read(self) -> bytes:
        data = await self._queue.get()
        if not data:
            self._queue.put_nowait(b"")  # EOF stays EOF for the next reader
        return data


async def copy(source: ByteSource, sink: ByteSink, *, close: bool = True) -> int:
    """Copy to end of input; bytes copied. Closes ``sink`` at the end unless told not to."""
    total = 0
    try:
        while data := await source.read():
            await sink.write(data)
            total += len(data)
    finally:
        if close:
            await sink.close()
    return total
