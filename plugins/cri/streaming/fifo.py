"""berthd's ends of the FIFOs an exec's stdio goes through (the shim opens the other ends ``O_RDWR``).

* :class:`FifoReader` (stdout, stderr): opened ``O_RDONLY`` plus a placeholder
  writer of our own, because a FIFO without writers reads as EOF and the
  process opens its end only once started. :meth:`FifoReader.writers_done`
  drops the placeholder once the process exited; EOF then comes when the last
  real writer (the process, or a child that inherited the fd) is gone.
* :class:`FifoWriter` (stdin): opened ``O_RDWR`` so opening never blocks and
  never fails for want of a reader; writes wait for room with ``add_writer``.
  :meth:`FifoWriter.close` is the end of input on our side (the caller then
  asks the shim for CloseIO).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os

CHUNK = 64 << 10


def _wake(ready: asyncio.Future[None]) -> None:
    if not ready.done():
        ready.set_result(None)


class FifoReader:
    def __init__(self, path: str) -> None:
        self.path = path
        self._fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        self._placeholder: int | None = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        self._loop = asyncio.get_running_loop()
        self._closed = False

    def writers_done(self) -> None:
        if self._placeholder is not None:
            os.close(self._placeholder)
            self._placeholder = None

    async def read(self) -> bytes:
        """Up to CHUNK bytes; ``b""`` at EOF (all writers gone) or after :meth:`close`."""
        while not self._closed:
            try:
                return os.read(self._fd, CHUNK)
            except BlockingIOError:
                pass
            ready: asyncio.Future[None] = self._loop.create_future()
            self._loop.add_reader(self._fd, _wake, ready)
            try:
                await ready
            finally:
                self._loop.remove_reader(self._fd)
        return b""

    def close(self) -> None:
        self.writers_done()
        if not self._closed:
            self._closed = True
            os.close(self._fd)


class FifoWriter:
    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: int | None = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        self._loop = asyncio.get_running_loop()

    async def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            if self._fd is None:
                raise BrokenPipeError(errno.EPIPE, f"stdin FIFO {self.path}: closed")
            try:
                n = os.write(self._fd, view)
                view = view[n:]
                continue
            except BlockingIOError:
                pass
            ready: asyncio.Future[None] = self._loop.create_future()
            fd = self._fd
            self._loop.add_writer(fd, _wake, ready)
            try:
                await ready
            finally:
                self._loop.remove_writer(fd)

    def close(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None
