"""CRI container logs written by the shim itself: the ``crilog://`` stdio URI.

kubelet reads a container's output from a file in its own format, one entry a
line::

    2026-11-21T07:40:01.123456789Z stdout F hello

containerd writes that file from the daemon, so a daemon that is down (or
slow) stops the container on its next write once the pipe is full, and the
lines in flight at a crash are lost. berth's shim writes it instead: berthd
names the file in the Create/Exec request as ``crilog:///abs/path/0.log``
(stdout and stderr the same path; for a terminal, stdout only) and is no
longer on the path of a single byte.

The format follows containerd's ``pkg/cri/io/logger.go`` to the letter:

* a line ends at ``\\n``; a ``\\r`` right before it is dropped with it (a
  terminal writes ``\\r\\n``), a ``\\r`` anywhere else is kept;
* a line longer than ``max_line`` bytes (16384 unless the URI says
  ``?max_line=N``; ``N <= 0`` never splits) becomes entries of ``max_line``
  bytes tagged ``P`` and a last one tagged ``F``; an empty line is an ``F``
  entry with no text;
* an unterminated last line (at EOF) is written tagged ``P``, as containerd
  does: kubelet joins ``P`` entries without adding a newline, so ``kubectl
  logs`` gives back the bytes the process wrote;
* the timestamp is UTC with nine fraction digits (containerd trims trailing
  zeros and uses local time; kubelet parses both with RFC3339Nano), taken once
  per read from the pipe, so it never goes backwards within a stream.

This module holds the pure parts (URI, splitter, timestamps) and the file
(:class:`LogFile`: appends, reopen for rotation); the pipe-reading copy lives
with the other copies in :mod:`.stdio`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import time
from dataclasses import dataclass
from urllib.parse import parse_qs, quote, unquote, urlsplit

import structlog

from daemon.errors import FailedPrecondition, InvalidArgument

log = structlog.get_logger(__name__)

SCHEME = "crilog"
PREFIX = f"{SCHEME}://"
DEFAULT_MAX_LINE = 16384
FILE_MODE = 0o640
STREAMS = ("stdout", "stderr")


@dataclass(frozen=True)
class Target:
    """What a ``crilog://`` URI names: the file and the split length (``<= 0``: no split)."""

    path: str
    max_line: int = DEFAULT_MAX_LINE


def is_crilog(uri: str) -> bool:
    return uri.startswith(PREFIX)


def uri(path: str, max_line: int = DEFAULT_MAX_LINE) -> str:
    """The ``crilog://`` URI of an absolute ``path`` (quoted: a ``?`` or ``%`` in it survives)."""
    query = "" if max_line == DEFAULT_MAX_LINE else f"?max_line={max_line}"
    return f"{PREFIX}{quote(path)}{query}"


def parse(value: str) -> Target:
    """The target of ``crilog:///abs/path[?max_line=N]``; InvalidArgument naming what is wrong."""
    parts = urlsplit(value)
    if parts.scheme != SCHEME:
        raise InvalidArgument(f"io {value!r}: not a {PREFIX} URI")
    if parts.netloc:
        raise InvalidArgument(f"io {value!r}: a {PREFIX} URI has no host, write {PREFIX}/abs/path")
    path = unquote(parts.path)
    if not path.startswith("/") or path.endswith("/"):
        raise InvalidArgument(f"io {value!r}: the log path must be an absolute file path")
    if "\0" in path:
        raise InvalidArgument(f"io {value!r}: the log path contains a NUL byte")
    max_line = DEFAULT_MAX_LINE
    for key, values in parse_qs(parts.query, keep_blank_values=True, strict_parsing=False).items():
        if key != "max_line":
            raise InvalidArgument(f"io {value!r}: unknown query parameter {key!r} (only max_line)")
        try:
            max_line = int(values[-1])
        except ValueError:
            raise InvalidArgument(f"io {value!r}: max_line must be an integer, got {values[-1]!r}") from None
    return Target(os.path.normpath(path), max_line)


class Clock:
    """RFC 3339 timestamps with nanoseconds in UTC, the date part formatted once a second."""

    def __init__(self) -> None:
        self._second = -1
        self._prefix = b""

    def stamp(self, ns: int | None = None) -> bytes:
        if ns is None:
            ns = time.time_ns()
        second, fraction = divmod(ns, 1_000_000_000)
        if second != self._second:
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)).encode()
            self._second = second
        return b"%s.%09dZ" % (self._prefix, fraction)


class LineSplitter:
    """One stream's bytes -> CRI entries (see the module doc for the rules).

    ``feed`` returns the entries of every line the data completes (and the
    ``P`` entries of a pending line once it exceeds ``max_line``); the rest is
    kept for the next call. ``finish`` (at EOF) returns the pending part as
    ``P`` entries. Bytes are passed through untouched: no decoding.
    """

    def __init__(self, stream: str, max_line: int = DEFAULT_MAX_LINE) -> None:
        if stream not in STREAMS:
            raise ValueError(f"stream must be one of {STREAMS}, got {stream!r}")
        self._stream = stream.encode()
        self._max = max_line
        self._pending = b""

    @property
    def pending(self) -> int:
        """How many bytes of an unfinished line are held back."""
        return len(self._pending)

    def feed(self, data: bytes, stamp: bytes) -> bytes:
        full = b"%s %s F " % (stamp, self._stream)
        partial = b"%s %s P " % (stamp, self._stream)
        limit = self._max
        buf = self._pending + data if self._pending else data
        out: list[bytes] = []
        start = 0
        while (newline := buf.find(b"\n", start)) >= 0:
            end = newline - 1 if newline > start and buf[newline - 1] == 0x0D else newline
            if limit > 0:
                while end - start > limit:
                    out += (partial, buf[start : start + limit], b"\n")
                    start += limit
            out += (full, buf[start:end], b"\n")
            start = newline + 1
        rest = buf[start:]
        if limit > 0:
            # A trailing \r may be the first half of a \r\n: it does not count yet (containerd unreads it).
            while len(rest) - rest.endswith(b"\r") > limit:
                out += (partial, rest[:limit], b"\n")
                rest = rest[limit:]
        self._pending = rest
        return b"".join(out)

    def finish(self, stamp: bytes) -> bytes:
        rest, self._pending = self._pending, b""
        if not rest:
            return b""
        partial = b"%s %s P " % (stamp, self._stream)
        step = self._max if self._max > 0 else len(rest)
        return b"".join(partial + rest[i : i + step] + b"\n" for i in range(0, len(rest), step))


def open_file(path: str, what: str, *, reopen: bool = False) -> int:
    """An ``O_APPEND | O_CREAT`` fd on ``path`` (mode 0640); the parent directory must exist.

    Errors name ``what`` (the URI) and the path: InvalidArgument at create,
    FailedPrecondition at reopen (the request was fine, the directory went away).
    """
    error = FailedPrecondition if reopen else InvalidArgument
    try:
        return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
    except FileNotFoundError:
        parent = os.path.dirname(path)
        if not os.path.isdir(parent):
            raise error(f"io {what!r}: log directory {parent!r} does not exist") from None
        raise error(f"io {what!r}: cannot open {path!r}: no such file or directory") from None
    except IsADirectoryError:
        raise error(f"io {what!r}: {path!r} is a directory") from None
    except OSError as exc:
        raise error(f"io {what!r}: cannot open {path!r}: {exc.strerror}") from None


class LogFile:
    """One open CRI log file, shared by the streams that name it (stdout and stderr).

    Each :meth:`write` is a batch of whole entries and goes out in one
    ``write(2)`` (O_APPEND: entries of two streams never interleave) from a
    worker thread, so a slow disk holds up this container's output, never the
    shim's event loop. A lock orders writes and :meth:`reopen`: every batch
    lands either in the old file or, whole, in the new one.

    A failed write is logged (once per errno) and dropped; the streams keep
    draining, as containerd does, so the container never blocks on a full disk.
    """

    def __init__(self, uri: str, target: Target, fd: int) -> None:
        self.uri = uri
        self.target = target
        self._fd = fd
        self._lock = asyncio.Lock()
        self._users = 0
        self._last_errno = 0
        #: bytes lost to write errors
        self.dropped = 0

    @classmethod
    def open(cls, uri: str) -> LogFile:
        """Parse and open ``uri`` (blocking: call in a thread)."""
        target = parse(uri)
        return cls(uri, target, open_file(target.path, uri))

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def acquire(self) -> None:
        """A stream starts writing here; :meth:`release` when it ended."""
        self._users += 1

    def release(self) -> None:
        self._users -= 1
        if self._users <= 0:
            self.close()

    async def write(self, data: bytes) -> None:
        async with self._lock:
            if self._fd < 0:
                self.dropped += len(data)
                return
            # The thread writes to its own dup: a close (or reopen) meanwhile never hands it a reused fd.
            await asyncio.to_thread(self._write_all, os.dup(self._fd), data)

    def _write_all(self, fd: int, data: bytes) -> None:
        try:
            self._write_view(fd, memoryview(data))
        finally:
            os.close(fd)

    def _write_view(self, fd: int, view: memoryview) -> None:
        while view:
            try:
                written = os.write(fd, view)
            except InterruptedError:
                continue
            except OSError as exc:
                self.dropped += len(view)
                if exc.errno != self._last_errno:
                    self._last_errno = exc.errno or 0
                    log.warning("shim.crilog_write_failed", path=self.target.path, error=exc.strerror)
                return
            view = view[written:]
        if self._last_errno:
            log.info("shim.crilog_write_recovered", path=self.target.path, dropped=self.dropped)
            self._last_errno = 0

    async def reopen(self) -> None:
        """Close the file and open its path again (kubelet renamed it to rotate it).

        The new file is opened first: if that fails, the error is raised and
        writing goes on into the old one, as containerd's ReopenContainerLog.
        """
        async with self._lock:
            if self._fd < 0:
                return  # every stream ended: nothing more will be written
            fd = await asyncio.to_thread(open_file, self.target.path, self.uri, reopen=True)
            old, self._fd = self._fd, fd
            with contextlib.suppress(OSError):
                os.close(old)
        log.info("shim.crilog_reopen", path=self.target.path)

    def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            try:
                os.close(fd)
            except OSError as exc:
                if exc.errno != errno.EBADF:
                    log.warning("shim.crilog_close_failed", path=self.target.path, error=exc.strerror)
