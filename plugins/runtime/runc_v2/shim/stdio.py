"""A container process's stdio: what the client names, opened for runc, and the copies.

The client (berthd, ``ctr``) names each stream in the Create/Exec request:

* ``""``: nothing, the process gets ``/dev/null``;
* a path to a FIFO the client created: the client reads (or writes, for stdin)
  its end; the shim opens the FIFO ``O_RDWR``, which never blocks on a missing
  peer (containerd opens them the same way);
* a path that is not a FIFO, or a ``file://`` URI: a file appended to;
* a ``crilog://`` URI (stdout/stderr only): a CRI log file the shim writes
  itself (:mod:`.crilog`): the process writes into a pipe, a :class:`LogCopy`
  turns what it reads into CRI entries. Nothing of it goes through the client,
  so a client that is gone never blocks the process nor loses a line.

Without a terminal, stdout and stderr are handed to the process as they are
(no copy: the process writes straight into the FIFO or file, and the client
sees EOF once the last writer, the process, is gone). stdin is a pipe fed from
the FIFO by a copy task, because the process must see EOF when the client says
so (CloseIO), and a FIFO held open by the shim never gives one.

With a terminal, the process's stdio is the pty slave; the shim holds the master
(received through runc's console socket) and copies master -> stdout FIFO (or
CRI log, stream ``stdout``) and stdin FIFO -> master.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import stat

import structlog

from daemon.errors import InvalidArgument, Unimplemented
from plugins.runtime.runc_v2.shim.crilog import Clock, LineSplitter, LogFile, is_crilog
from plugins.runtime.runc_v2.shim.runc import Stdio

log = structlog.get_logger(__name__)

CHUNK = 65536
#: How long closing waits for a copy to drain what it already has.
DRAIN_TIMEOUT = 5.0


def open_target(target: str, *, read: bool) -> int:
    """A blocking fd on a stdio target (see the module doc); ``read`` for stdin."""
    if not target:
        return os.open(os.devnull, os.O_RDONLY if read else os.O_WRONLY)
    if is_crilog(target):
        raise InvalidArgument(f"io {target!r}: a crilog:// URI names stdout or stderr, not stdin")
    if target.startswith("file://"):
        path = target.removeprefix("file://")
    elif "://" in target:
        raise Unimplemented(
            f"io {target!r}: only FIFO paths, file paths, file:// and crilog:// URIs are supported"
        )
    else:
        path = target
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        mode = 0
    if stat.S_ISFIFO(mode):
        return os.open(path, os.O_RDWR)
    if read:
        if not mode:
            raise InvalidArgument(f"io {target!r}: stdin does not exist")
        return os.open(path, os.O_RDONLY)
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)


def set_nonblocking(fd: int) -> None:
    os.set_blocking(fd, False)


class _Wake:
    """A future to park a copy on until its fd is ready or it is told to stop."""

    def __init__(self) -> None:
        self.future: asyncio.Future[None] | None = None

    def fire(self) -> None:
        if self.future is not None and not self.future.done():
            self.future.set_result(None)


async def _ready(fd: int, wake: _Wake, *, write: bool = False) -> None:
    loop = asyncio.get_running_loop()
    wake.future = loop.create_future()
    add, remove = (loop.add_writer, loop.remove_writer) if write else (loop.add_reader, loop.remove_reader)
    add(fd, wake.fire)
    try:
        await wake.future
    finally:
        remove(fd)
        wake.future = None


class Copy:
    """Copies ``src`` to ``dst`` (both owned, both made non-blocking) until EOF/EIO or :meth:`stop`.

    :meth:`stop` ends the copy once what ``src`` holds right now has been
    written: how a FIFO that never reads EOF (we hold it open) is finished.
    ``dst`` is closed at the end (the reader then sees EOF), ``src`` too unless
    ``keep_src`` (a pty master is shared by both directions).
    """

    def __init__(self, name: str, src: int, dst: int, *, keep_src: bool = False, keep_dst: bool = False):
        self.name = name
        self.src = src
        self.dst = dst
        self._keep_src = keep_src
        self._keep_dst = keep_dst
        self._stopping = False
        self._wake = _Wake()
        set_nonblocking(src)
        if dst >= 0:
            set_nonblocking(dst)
        self.task = asyncio.get_running_loop().create_task(self._run(), name=f"copy-{name}")

    def stop(self) -> None:
        self._stopping = True
        self._wake.fire()

    async def wait(self, limit: float = DRAIN_TIMEOUT) -> None:
        """Wait for the copy to end; past ``limit`` seconds, cancel it."""
        done, _ = await asyncio.wait([self.task], timeout=limit)
        if not done:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task

    async def _run(self) -> None:
        try:
            while True:
                try:
                    data = os.read(self.src, CHUNK)
                except BlockingIOError:
                    if self._stopping:
                        return
                    await _ready(self.src, self._wake)
                    continue
                except OSError as exc:
                    if exc.errno == errno.EIO:  # pty: the slave side is gone
                        return
                    raise
                if not data:
                    return
                if not await self._write(data):
                    return
        except Exception as exc:  # noqa: BLE001 - a broken copy is logged, never fatal to the shim
            log.warning("shim.copy_failed", copy=self.name, error=str(exc))
        finally:
            try:
                await self._finished()
            except Exception as exc:  # noqa: BLE001 - as above
                log.warning("shim.copy_failed", copy=self.name, error=str(exc))
            finally:
                if not self._keep_src:
                    with contextlib.suppress(OSError):
                        os.close(self.src)
                if not self._keep_dst:
                    with contextlib.suppress(OSError):
                        os.close(self.dst)

    async def _finished(self) -> None:
        """Called once at the end (EOF, stop, error or cancel), before the fds are closed."""

    async def _write(self, data: bytes) -> bool:
        view = memoryview(data)
        while view:
            try:
                written = os.write(self.dst, view)
            except BlockingIOError:
                await _ready(self.dst, _Wake(), write=True)
                continue
            except OSError as exc:
                if exc.errno in (errno.EPIPE, errno.EIO):
                    return False  # the reader (the process, the pty) is gone
                raise
            view = view[written:]
        return True


class LogCopy(Copy):
    """Copies a process's output (a pipe, or a pty master) into a CRI log file as ``stream``'s entries.

    Reading stops only at EOF (every writer of the pipe is gone) or :meth:`stop`;
    the unterminated rest of a line is written at the end (tagged P, see
    :mod:`.crilog`). The process blocks only while the file's write is slow,
    never on anything outside the shim.
    """

    def __init__(self, name: str, src: int, logfile: LogFile, stream: str, *, keep_src: bool = False):
        self.logfile = logfile
        self._splitter = LineSplitter(stream, logfile.target.max_line)
        self._clock = Clock()
        logfile.acquire()
        super().__init__(name, src, -1, keep_src=keep_src, keep_dst=True)

    async def _write(self, data: bytes) -> bool:
        entries = self._splitter.feed(data, self._clock.stamp())
        if entries:
            await self.logfile.write(entries)
        return True

    async def _finished(self) -> None:
        try:
            rest = self._splitter.finish(self._clock.stamp())
            if rest:
                await self.logfile.write(rest)
        finally:
            self.logfile.release()


class ProcessIO:
    """The stdio of one process: fds for runc, copies, and CloseIO.

    Use: ``io = ProcessIO.open(stdin, stdout, stderr, terminal)`` before runc
    create/exec; pass :meth:`for_runc` to runc; :meth:`started` after runc
    returned (closes the shim's copies of what the process now holds), and
    :meth:`attach_console` with the pty master for a terminal. :meth:`close`
    at delete.
    """

    def __init__(self, stdin: str, stdout: str, stderr: str, terminal: bool) -> None:
        self.stdin_path = stdin
        self.stdout_path = stdout
        self.stderr_path = stderr
        self.terminal = terminal
        # fds given to runc (closed in started()), and fds the shim keeps for copies
        self._child: dict[str, int] = {}
        self._stdin_fifo: int | None = None
        self._stdin_pipe_w: int | None = None
        self._stdout_fifo: int | None = None
        self.console: int | None = None
        self.copies: list[Copy] = []
        self._stdin_copy: Copy | None = None
        # crilog:// outputs: the CRI log of each stream, and the read ends of their pipes until started()
        self._logs: dict[str, LogFile] = {}
        self._log_pipes: dict[str, int] = {}

    @classmethod
    def open(cls, stdin: str, stdout: str, stderr: str, terminal: bool) -> ProcessIO:
        """Open every stream (blocking file work: call in a thread)."""
        io = cls(stdin, stdout, stderr, terminal)
        try:
            if stdin:
                io._stdin_fifo = open_target(stdin, read=True)
                if not terminal:
                    read_end, io._stdin_pipe_w = os.pipe()
                    io._child["stdin"] = read_end
            if terminal:
                if is_crilog(stdout):
                    io._open_log("stdout", stdout)
                elif stdout:
                    io._stdout_fifo = open_target(stdout, read=False)
            else:
                for stream, target in (("stdout", stdout), ("stderr", stderr)):
                    if is_crilog(target):
                        io._open_log(stream, target)
                        io._log_pipes[stream], io._child[stream] = os.pipe()
                    else:
                        io._child[stream] = open_target(target, read=False)
        except BaseException:
            io.close_fds()
            raise
        return io

    def _open_log(self, stream: str, uri: str) -> None:
        """The CRI log ``uri`` for ``stream``; stdout and stderr naming the same file share one."""
        for other in self._logs.values():
            if other.uri == uri:
                self._logs[stream] = other
                return
        self._logs[stream] = LogFile.open(uri)

    @property
    def has_logs(self) -> bool:
        """Whether an output of this process is a crilog:// file."""
        return bool(self._logs)

    async def reopen_logs(self) -> None:
        """Reopen every CRI log file of this process (rotation); errors name the file."""
        seen: set[int] = set()
        for logfile in self._logs.values():
            if id(logfile) not in seen:
                seen.add(id(logfile))
                await logfile.reopen()

    def for_runc(self) -> Stdio:
        return Stdio(self._child.get("stdin"), self._child.get("stdout"), self._child.get("stderr"))

    def started(self) -> None:
        """runc has handed our fds to the process: drop the shim's copies, start stdin's copy."""
        for fd in self._child.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self._child.clear()
        for stream, read_end in self._log_pipes.items():
            self.copies.append(LogCopy(f"log-{stream}", read_end, self._logs[stream], stream))
        self._log_pipes.clear()
        if self._stdin_fifo is not None and self._stdin_pipe_w is not None:
            self._stdin_copy = Copy("stdin", self._stdin_fifo, self._stdin_pipe_w)
            self.copies.append(self._stdin_copy)
            self._stdin_fifo = self._stdin_pipe_w = None

    def attach_console(self, master: int) -> None:
        """Copy between the pty ``master`` and the FIFOs (stdout gets the merged output)."""
        self.console = master
        if "stdout" in self._logs:
            self.copies.append(LogCopy("console-log", master, self._logs["stdout"], "stdout", keep_src=True))
        if self._stdout_fifo is not None:
            self.copies.append(Copy("console-out", master, self._stdout_fifo, keep_src=True))
            self._stdout_fifo = None
        if self._stdin_fifo is not None:
            self._stdin_copy = Copy("console-in", self._stdin_fifo, master, keep_dst=True)
            self.copies.append(self._stdin_copy)
            self._stdin_fifo = None

    def close_stdin(self) -> None:
        """CloseIO: the process reads what the client wrote, then EOF."""
        if self._stdin_copy is not None:
            self._stdin_copy.stop()
        for name in ("_stdin_fifo", "_stdin_pipe_w"):
            fd = getattr(self, name)
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
                setattr(self, name, None)

    async def close(self) -> None:
        """Stop the input, let output copies drain (bounded), release every fd."""
        self.close_stdin()
        await asyncio.gather(*(copy.wait() for copy in self.copies))  # each bounded by DRAIN_TIMEOUT
        self.copies.clear()
        self.close_fds()

    def close_fds(self) -> None:
        fds = [
            *self._child.values(),
            *self._log_pipes.values(),
            self._stdin_fifo,
            self._stdin_pipe_w,
            self._stdout_fifo,
            self.console,
        ]
        for fd in fds:
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        for logfile in self._logs.values():
            logfile.close()
        self._child.clear()
        self._log_pipes.clear()
        self._stdin_fifo = self._stdin_pipe_w = self._stdout_fifo = self.console = None
