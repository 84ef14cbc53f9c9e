"""Attach's output: follow a container's CRI log file and turn it back into stdout/stderr bytes.

The shim writes every line a container prints as a CRI log entry
(``<RFC3339Nano time> <stdout|stderr> <P|F> <content>\\n``; P marks a partial
line, split at the configured maximum, F the end of a line). Attach reads the
file from its end at the time of attaching, so the client sees what the
container prints from then on, and reverses the framing: an F entry is its
content plus the newline, a P entry its content alone. A rotated file (kubelet
renames it and asks for a reopen) is noticed by its inode and followed from its
start. Reads are small and go to a thread; between them the follower polls the
size, so no inotify is needed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os

import structlog

from plugins.cri.streaming.streams import ByteSink

log = structlog.get_logger("berth.cri.streaming")

POLL_INTERVAL = 0.05
READ_CHUNK = 256 << 10


def parse_entry(line: bytes) -> tuple[str, bytes] | None:
    """``(stream, bytes)`` of one CRI log entry (without its trailing ``\\n``); None if malformed."""
    parts = line.split(b" ", 3)
    if len(parts) < 3 or parts[1] not in (b"stdout", b"stderr"):
        return None
    content = parts[3] if len(parts) == 4 else b""
    if parts[2] == b"F":
        content += b"\n"
    elif parts[2] != b"P":
        return None
    return parts[1].decode(), content


class LogFollower:
    """Follows ``path`` from its current end; :meth:`run` until :meth:`stop`, then drains and returns."""

    def __init__(self, path: str, stdout: ByteSink | None, stderr: ByteSink | None) -> None:
        self.path = path
        self._sinks = {"stdout": stdout, "stderr": stderr}
        self._stop = asyncio.Event()
        self._fd: int | None = None
        self._inode = 0
        self._pending = b""
        self._started = asyncio.Event()

    async def started(self) -> None:
        """Until the follower has its starting offset (output printed later is not missed)."""
        await self._started.wait()

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        try:
            await asyncio.to_thread(self._open, True)
            self._started.set()
            while True:
                stopping = self._stop.is_set()
                got = await self._pump()
                if stopping and not got:
                    return
                if not got:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._stop.wait(), POLL_INTERVAL)
        finally:
            self._started.set()
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def _open(self, at_end: bool) -> None:
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return  # not written yet: looked for again on each poll
        if self._fd is not None:
            os.close(self._fd)
        self._fd = fd
        st = os.fstat(fd)
        self._inode = st.st_ino
        if at_end:
            os.lseek(fd, st.st_size, os.SEEK_SET)
        self._pending = b""

    def _read(self) -> bytes:
        if self._fd is None:
            self._open(False)
            if self._fd is None:
                return b""
        data = os.read(self._fd, READ_CHUNK)
        if data:
            return data
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return b""
        if st.st_ino != self._inode:  # rotated: the old file is done, follow the new one
            self._open(False)
            return os.read(self._fd, READ_CHUNK) if self._fd is not None else b""
        return b""

    async def _pump(self) -> bool:
        data = await asyncio.to_thread(self._read)
        if not data:
            return False
        lines = (self._pending + data).split(b"\n")
        self._pending = lines.pop()
        for line in lines:
            entry = parse_entry(line)
            if entry is None:
                log.debug("attach.bad_log_entry", path=self.path, line=line[:80])
                continue
            sink = self._sinks[entry[0]]
            if sink is not None and entry[1]:
                await sink.write(entry[1])
        return True
