"""Reading CRI container log files: ``berth cri logs`` (and the CRI demo).

The shim writes each chunk of a container's output as one line
``<RFC3339Nano> <stdout|stderr> <P|F> <text>``: ``F`` ends a line of the
program's output, ``P`` is a piece of a longer one (split at 16 KiB) that
the next record of the same stream continues. The reader joins the pieces
back into the program's lines, as kubelet does for ``kubectl logs``, so
``--tail N`` counts the program's lines, not records. A record that does not
parse (a torn last line, a foreign file) is skipped, never fatal.

Following (``-f``) reads to the end, then polls: new bytes are read as they
come; a file renamed away by a rotation (ReopenContainerLog) is drained and
the new file at the same path opened; the follow ends once ``is_done()``
says the container exited and the file has been read to its end.
"""

from __future__ import annotations

import asyncio
import os
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

#: How often a follow looks for new bytes and asks whether the container has exited.
POLL_INTERVAL = 0.1
#: Bytes read per call.
READ_CHUNK = 64 << 10
STREAMS = frozenset({"stdout", "stderr"})


@dataclass(frozen=True)
class LogRecord:
    """One line of the file."""

    timestamp: str
    stream: str
    partial: bool
    text: bytes


@dataclass(frozen=True)
class LogMessage:
    """One line of the program's output: its pieces joined, without the newline.

    ``complete`` is False for a message whose last piece was a ``P`` when the
    file ended (the program has not finished the line yet).
    """

    timestamp: str
    stream: str
    text: bytes
    complete: bool = True


def parse_record(line: bytes) -> LogRecord | None:
    """A record from one line (its newline stripped or not); None if it is not in the CRI format."""
    line = line.removesuffix(b"\n")
    parts = line.split(b" ", 3)
    if len(parts) < 3:
        return None
    ts, stream, tag = parts[0], parts[1].decode("ascii", "replace"), parts[2]
    if stream not in STREAMS or tag not in (b"P", b"F") or not ts:
        return None
    return LogRecord(ts.decode("ascii", "replace"), stream, tag == b"P", parts[3] if len(parts) == 4 else b"")


class Assembler:
    """Joins the ``P`` pieces of each stream with the record that ends them."""

    def __init__(self) -> None:
        self._open: dict[str, tuple[str, bytearray]] = {}

    def feed(self, record: LogRecord) -> LogMessage | None:
        """The message ``record`` completes, or None while the line is still in pieces."""
        started = self._open.get(record.stream)
        if record.partial:
            if started is None:
                self._open[record.stream] = (record.timestamp, bytearray(record.text))
            else:
                started[1].extend(record.text)
            return None
        if started is None:
            return LogMessage(record.timestamp, record.stream, record.text)
        del self._open[record.stream]
        started[1].extend(record.text)
        return LogMessage(started[0], record.stream, bytes(started[1]))

    def pending(self) -> list[LogMessage]:
        """Unfinished lines, oldest first (printed as they are when a read ends)."""
        out = [LogMessage(ts, stream, bytes(buf), complete=False) for stream, (ts, buf) in self._open.items()]
        self._open.clear()
        return sorted(out, key=lambda m: m.timestamp)


def messages(lines: Iterable[bytes], assembler: Assembler | None = None) -> Iterator[LogMessage]:
    """The complete messages of ``lines`` (the unfinished ones stay in ``assembler``)."""
    asm = assembler or Assembler()
    for line in lines:
        record = parse_record(line)
        if record is None:
            continue
        msg = asm.feed(record)
        if msg is not None:
            yield msg


def format_message(msg: LogMessage, timestamps: bool) -> bytes:
    prefix = f"{msg.timestamp} ".encode() if timestamps else b""
    return prefix + msg.text + (b"\n" if msg.complete else b"")


def read_messages(path: str, tail: int = -1) -> list[LogMessage]:
    """Every message of the file (or the last ``tail``), unfinished lines included at the end.

    Blocking (reads the file): call it in a thread.
    """
    asm = Assembler()
    keep: deque[LogMessage] = deque(maxlen=tail if tail >= 0 else None)
    with open(path, "rb") as f:
        keep.extend(messages(f, asm))
    keep.extend(asm.pending())
    return list(keep)


Sink = Callable[[LogMessage], None]


class Follower:
    """Reads a log file from the start (or from the last ``tail`` messages) and keeps reading."""

    def __init__(self, path: str, sink: Sink, tail: int = -1) -> None:
        self.path = path
        self.sink = sink
        self.tail = tail
        self._asm = Assembler()
        self._rest = b""
        self._file: BinaryIO | None = None
        self._ino = 0

    def _open(self) -> bool:
        try:
            f = open(self.path, "rb")  # noqa: SIM115 - kept open across polls, closed in close()
        except FileNotFoundError:
            return False
        self._file = f
        self._ino = os.fstat(f.fileno()).st_ino
        return True

    def _first_read(self) -> None:
        """The backlog, cut to the last ``tail`` complete messages."""
        assert self._file is not None
        keep: deque[LogMessage] = deque(maxlen=self.tail if self.tail >= 0 else None)
        data = self._rest + self._file.read()
        lines = data.split(b"\n")
        self._rest = lines.pop()
        keep.extend(messages(lines, self._asm))
        for msg in keep:
            self.sink(msg)

    def _read_new(self) -> None:
        assert self._file is not None
        while True:
            data = self._file.read(READ_CHUNK)
            if not data:
                return
            lines = (self._rest + data).split(b"\n")
            self._rest = lines.pop()
            for msg in messages(lines, self._asm):
                self.sink(msg)

    def _rotated(self) -> bool:
        try:
            return os.stat(self.path).st_ino != self._ino
        except FileNotFoundError:
            return False

    def step(self) -> None:
        """Read what arrived; after a rotation, finish the old file and continue with the new one.

        Blocking (file reads): call it in a thread.
        """
        if self._file is None:
            if not self._open():
                return
            self._first_read()
            return
        self._read_new()
        if self._rotated():
            self._finish_line()
            self._file.close()
            self._file = None
            if self._open():
                self._read_new()

    def _finish_line(self) -> None:
        if self._rest:
            for msg in messages([self._rest], self._asm):
                self.sink(msg)
            self._rest = b""

    def close(self) -> None:
        """Flush a last line without its newline and any unfinished pieces, then close the file."""
        self._finish_line()
        for msg in self._asm.pending():
            self.sink(msg)
        if self._file is not None:
            self._file.close()
            self._file = None

    async def run(self, is_done: Callable[[], Awaitable[bool]], interval: float = POLL_INTERVAL) -> None:
        """Follow until ``is_done()`` is true, then read to the end once more and return."""
        try:
            while True:
                await asyncio.to_thread(self.step)
                if await is_done():
                    await asyncio.to_thread(self.step)
                    return
                await asyncio.sleep(interval)
        finally:
            await asyncio.to_thread(self.close)


__all__ = [
    "Assembler",
    "Follower",
    "LogMessage",
    "LogRecord",
    "format_message",
    "messages",
    "parse_record",
    "read_messages",
]
