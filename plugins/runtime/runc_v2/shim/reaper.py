"""Child reaping for the shim: one owner of every ``waitpid``.

The shim is a child subreaper, so container init processes become its children
once ``runc create`` exits. Exit statuses are collected by a single SIGCHLD
handler doing ``waitpid(-1)``; anything else that waited (asyncio's child
watchers, ``subprocess.Popen``) would race it and steal statuses. Hence runc is
started with :func:`os.posix_spawnp` (no Popen object, no hidden waits) and
its exit awaited through :meth:`Reaper.wait`.

Statuses are in containerd's encoding: the exit code, or 128 + signal.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import structlog

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Exit:
    pid: int
    status: int
    at: datetime


def exit_status(waitstatus: int) -> int:
    """containerd's exit status of a raw wait status: the code, or 128 + signal."""
    code = os.waitstatus_to_exitcode(waitstatus)
    return 128 - code if code < 0 else code


class Reaper:
    """Reaps every child of the process; must be installed on the main thread's loop.

    Exits are kept until claimed by :meth:`wait` (a process may exit before
    anyone asks), and every exit is also passed to the ``on_exit`` callbacks,
    which is how the service learns that a container's init is gone.
    """

    def __init__(self) -> None:
        self._exits: dict[int, Exit] = {}
        self._waiters: dict[int, asyncio.Future[Exit]] = {}
        self._subscribers: list[Callable[[Exit], None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None

    def install(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop.add_signal_handler(signal.SIGCHLD, self.reap)
        self.reap()  # children that exited before the handler existed

    def uninstall(self) -> None:
        if self._loop is not None:
            self._loop.remove_signal_handler(signal.SIGCHLD)
            self._loop = None

    def subscribe(self, callback: Callable[[Exit], None]) -> None:
        self._subscribers.append(callback)

    def reap(self) -> None:
        while True:
            try:
                pid, waitstatus = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            ended = Exit(pid, exit_status(waitstatus), datetime.now(UTC))
            log.debug("shim.reaped", pid=pid, status=ended.status)
            waiter = self._waiters.pop(pid, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(ended)
            else:
                self._exits[pid] = ended
            for callback in list(self._subscribers):
                callback(ended)

    async def wait(self, pid: int) -> Exit:
        """The exit of child ``pid`` (already reaped or future); claims it."""
        ended = self._exits.pop(pid, None)
        if ended is not None:
            return ended
        future: asyncio.Future[Exit] = asyncio.get_running_loop().create_future()
        self._waiters[pid] = future
        try:
            return await future
        finally:
            self._waiters.pop(pid, None)

    def take(self, pid: int) -> Exit | None:
        """Claim the already recorded exit of ``pid``, if any, without waiting.

        For processes tracked through :meth:`subscribe`: it drops the record,
        and catches an exit that happened before the subscriber knew the pid.
        """
        return self._exits.pop(pid, None)

    async def run(
        self,
        argv: Sequence[str],
        *,
        stdin: int | None = None,
        stdout: int | None = None,
        stderr: int | None = None,
    ) -> tuple[int, bytes]:
        """Run ``argv`` to completion: (exit status, output).

        Without ``stdout``/``stderr`` fds both go to a pipe whose content is
        returned; given fds are dup-ed into the child (the caller closes them)
        and the output is then empty. stdin defaults to /dev/null.
        """
        read_fd: int | None = None
        opened: list[int] = []
        try:
            if stdin is None:
                stdin = os.open(os.devnull, os.O_RDONLY)
                opened.append(stdin)
            if stdout is None or stderr is None:
                read_fd, write_fd = os.pipe()
                opened.append(write_fd)
                stdout = write_fd if stdout is None else stdout
                stderr = write_fd if stderr is None else stderr
            actions = [
                (os.POSIX_SPAWN_DUP2, stdin, 0),
                (os.POSIX_SPAWN_DUP2, stdout, 1),
                (os.POSIX_SPAWN_DUP2, stderr, 2),
            ]
            pid = os.posix_spawnp(  # noqa: ASYNC221 - spawning only, the wait is async
                argv[0], list(argv), dict(os.environ), file_actions=actions
            )
        except BaseException:
            if read_fd is not None:
                os.close(read_fd)
            raise
        finally:
            for fd in opened:
                os.close(fd)
        output = b""
        if read_fd is not None:
            # Blocking reads in a thread on purpose: the pipe is private to this call.
            output = await asyncio.to_thread(_read_all, read_fd)
        ended = await self.wait(pid)
        return ended.status, output


def _read_all(fd: int) -> bytes:
    chunks: list[bytes] = []
    try:
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)
    return b"".join(chunks)
