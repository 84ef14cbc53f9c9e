"""A bounded byte pipe from the event loop to one worker thread.

The apply reads the layer on the event loop (it is an aiohttp body or a
content reader) and parses it in a thread (tar and the filesystem block).
The pipe between them holds at most ``limit`` bytes (plus one chunk when a
single chunk is bigger): when the worker falls behind, :meth:`Pipe.put`
waits, the loop stops reading the network, and TCP pushes back on the
registry. The loop itself never blocks: the worker wakes a waiting producer
with ``call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import deque


class SourceClosed(Exception):
    """Raised in the worker when the producer failed or the apply was cancelled."""


class Pipe:
    """One producer on the loop (:meth:`put`, :meth:`close`), one reader thread (:meth:`read`)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, limit: int) -> None:
        self.limit = limit
        #: the most bytes ever buffered at once (for tests and metrics)
        self.high_water = 0
        self._loop = loop
        self._cond = threading.Condition()
        self._chunks: deque[bytes] = deque()
        self._offset = 0  # into the first chunk, already read
        self._buffered = 0
        self._eof = False
        self._failed: str = ""
        self._reader_gone = False
        self._space: asyncio.Future[None] | None = None

    # -- loop side ----------------------------------------------------------

    async def put(self, data: bytes) -> bool:
        """Queue ``data``, waiting while the pipe is full; False if the reader has stopped."""
        while True:
            with self._cond:
                if self._reader_gone:
                    return False
                if self._buffered == 0 or self._buffered + len(data) <= self.limit:
                    self._chunks.append(data)
                    self._buffered += len(data)
                    self.high_water = max(self.high_water, self._buffered)
                    self._cond.notify()
                    return True
                space = self._loop.create_future()
                self._space = space
            await space

    def close(self, failure: str = "") -> None:
        """End of the stream; with ``failure``, the reader raises :class:`SourceClosed` instead."""
        with self._cond:
            self._eof = True
            if failure and not self._failed:
                self._failed = failure
            self._cond.notify_all()

    # -- thread side --------------------------------------------------------

    def read(self, n: int) -> bytes:
        """Up to ``n`` bytes; ``b""`` at the end; blocks while the pipe is empty."""
        with self._cond:
            while not self._chunks or self._failed:
                if self._failed:
                    raise SourceClosed(self._failed)
                if self._eof:
                    return b""
                self._cond.wait()
            head, start = self._chunks[0], self._offset
            if len(head) - start > n:
                chunk = head[start : start + n]
                self._offset += n
            else:
                chunk = head[start:] if start else head
                self._chunks.popleft()
                self._offset = 0
            self._buffered -= len(chunk)
            self._wake_producer()
        return chunk

    def stop_reading(self) -> None:
        """The reader is done (finished or failed): a waiting or later :meth:`put` returns False."""
        with self._cond:
            self._reader_gone = True
            self._chunks.clear()
            self._offset = 0
            self._buffered = 0
            self._wake_producer()

    def _wake_producer(self) -> None:
        space, self._space = self._space, None
        if space is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
                self._loop.call_soon_threadsafe(_resolve, space)


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
