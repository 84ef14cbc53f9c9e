"""A terminal for a container process, through runc's ``--console-socket``.

runc creates the pty inside the container and sends the master to a unix
socket we listen on, as one SCM_RIGHTS message. :func:`receive_console` runs
the runc command and the receive together, so a runc that fails before
sending (bad spec, missing binary) ends the wait instead of hanging it.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import fcntl
import os
import shutil
import socket
import struct
import tempfile
import termios
from collections.abc import Awaitable

#: runc's console message carries a name (the pty path); the fd rides along.
MESSAGE_SIZE = 4096


class ConsoleSocket:
    """A listening unix socket at a short temp path (sun_path is 108 bytes)."""

    def __init__(self) -> None:
        self._dir = tempfile.mkdtemp(prefix="berth-pty-", dir="/tmp")
        self.path = os.path.join(self._dir, "c.sock")
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            self._sock.bind(self.path)
            self._sock.listen(1)
            self._sock.setblocking(False)
        except BaseException:
            self.close()
            raise

    async def receive(self) -> int:
        """Accept runc's connection and return the pty master it sends (close-on-exec)."""
        loop = asyncio.get_running_loop()
        conn, _ = await loop.sock_accept(self._sock)
        with conn:
            conn.setblocking(False)
            while True:
                try:
                    fds = array.array("i")
                    msg, ancdata, _flags, _addr = conn.recvmsg(
                        MESSAGE_SIZE, socket.CMSG_SPACE(fds.itemsize), socket.MSG_CMSG_CLOEXEC
                    )
                except BlockingIOError:
                    await _readable(conn)
                    continue
                for level, kind, data in ancdata:
                    if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                        fds.frombytes(data[: len(data) - (len(data) % fds.itemsize)])
                if fds:
                    for extra in fds[1:]:
                        os.close(extra)
                    return fds[0]
                if not msg:
                    raise ConnectionError("console socket closed without a pty master")

    def close(self) -> None:
        self._sock.close()
        shutil.rmtree(self._dir, ignore_errors=True)


async def _readable(sock: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    future: asyncio.Future[None] = loop.create_future()

    def ready() -> None:
        if not future.done():
            future.set_result(None)

    loop.add_reader(sock.fileno(), ready)
    try:
        await future
    finally:
        loop.remove_reader(sock.fileno())


async def receive_console(console: ConsoleSocket, command: Awaitable[None]) -> int:
    """Run ``command`` (a runc call given ``console.path``) and return the pty master it sent.

    If the command fails, its error propagates and nothing is left open.
    """
    receiving = asyncio.ensure_future(console.receive())
    running = asyncio.ensure_future(command)
    try:
        await asyncio.wait([receiving, running], return_when=asyncio.FIRST_COMPLETED)
        if running.done() and running.exception() is not None:
            receiving.cancel()
            await running  # raises the runc error
        await running  # runc sends the master before it returns, so receiving is done
        return await asyncio.wait_for(receiving, timeout=5.0)
    except BaseException:
        for task in (receiving, running):
            task.cancel()
        if receiving.done() and not receiving.cancelled() and receiving.exception() is None:
            os.close(receiving.result())
        raise


def resize(master: int, *, width: int, height: int) -> None:
    """Set the window size (TIOCSWINSZ): rows = height, columns = width."""
    fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", height, width, 0, 0))


def close_quietly(fd: int | None) -> None:
    if fd is not None:
        with contextlib.suppress(OSError):
            os.close(fd)
