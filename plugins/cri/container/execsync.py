"""ExecSync: a command run in a running container, its output read from two FIFOs (capped).

The manager checks the request and the container's state; :func:`run` does
the exec itself: process spec from the container's, exec/start/wait on the
runtime, SIGKILL at the deadline, the exec and its FIFOs removed whatever happens.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import copy
import errno
import json
import os
import secrets
import shutil
import signal
from pathlib import Path
from typing import Any

from daemon.errors import BerthError, DeadlineExceeded
from daemon.protocols import Opaque, TaskIO, TaskManager
from plugins.cri.container.model import KILL_WAIT, NAMESPACE, PROCESS_TYPE

#: ExecSync output kept per stream; the rest is dropped (kubelet's limit too)
EXEC_OUTPUT_CAP = 16 << 20


async def run(
    tasks: TaskManager,
    container_id: str,
    spec: dict[str, Any],
    cmd: builtins.list[str],
    seconds: int,
    container_dir: Path,
) -> tuple[bytes, bytes, int]:
    """Run ``cmd`` with the process of ``spec``: (stdout, stderr, exit code).

    DeadlineExceeded after ``seconds`` (0: no deadline). The FIFOs live under
    ``container_dir`` (the container's state directory).
    """
    process = copy.deepcopy(spec.get("process") or {})
    process["args"], process["terminal"] = list(cmd), False
    exec_id = secrets.token_hex(16)
    d = container_dir / f"exec-{exec_id}"
    readers = await asyncio.to_thread(_ExecOutput.make, d)
    try:
        readers.watch()
        await tasks.exec(
            NAMESPACE,
            container_id,
            exec_id,
            spec=Opaque(PROCESS_TYPE, json.dumps(process).encode()),
            io=TaskIO(stdout=str(readers.stdout_path), stderr=str(readers.stderr_path)),
        )
        try:
            await tasks.start(NAMESPACE, container_id, exec_id)
            try:
                async with asyncio.timeout(seconds or None):
                    exit_ = await tasks.wait(NAMESPACE, container_id, exec_id)
            except TimeoutError:
                with contextlib.suppress(BerthError):
                    await tasks.kill(NAMESPACE, container_id, exec_id, signal=int(signal.SIGKILL))
                    async with asyncio.timeout(KILL_WAIT):
                        await tasks.wait(NAMESPACE, container_id, exec_id)
                raise DeadlineExceeded(
                    f'failed to exec in container "{container_id}": timeout {seconds}s exceeded'
                ) from None
        finally:
            with contextlib.suppress(BerthError, TimeoutError):
                await tasks.delete_process(NAMESPACE, container_id, exec_id)
        stdout, stderr = readers.finish()
        return stdout, stderr, exit_.exit_status
    finally:
        readers.close()
        await asyncio.to_thread(shutil.rmtree, d, True)


class _ExecOutput:
    """The two FIFOs of an ExecSync and what has been read from them (capped)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.stdout_path = directory / "stdout"
        self.stderr_path = directory / "stderr"
        self._fds: list[int] = []
        self._bufs = [bytearray(), bytearray()]
        self._loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def make(cls, directory: Path) -> _ExecOutput:
        """FIFOs made and opened O_RDWR|O_NONBLOCK (never EOF, never blocks); blocking."""
        out = cls(directory)
        directory.mkdir(parents=True, mode=0o700)
        for path in (out.stdout_path, out.stderr_path):
            os.mkfifo(path, 0o600)
            out._fds.append(os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC))
        return out

    def watch(self) -> None:
        self._loop = asyncio.get_running_loop()
        for i, fd in enumerate(self._fds):
            self._loop.add_reader(fd, self._read, i)

    def _read(self, i: int) -> None:
        while True:
            try:
                data = os.read(self._fds[i], 65536)
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno == errno.EAGAIN:
                    return
                raise
            if not data:
                return
            room = EXEC_OUTPUT_CAP - len(self._bufs[i])
            if room > 0:
                self._bufs[i] += data[:room]

    def finish(self) -> tuple[bytes, bytes]:
        """Everything written so far (the process has exited: what it wrote is in the pipes)."""
        for i in range(len(self._fds)):
            self._read(i)
        return bytes(self._bufs[0]), bytes(self._bufs[1])

    def close(self) -> None:
        for fd in self._fds:
            if self._loop is not None:
                with contextlib.suppress(Exception):
                    self._loop.remove_reader(fd)
            os.close(fd)
        self._fds = []
