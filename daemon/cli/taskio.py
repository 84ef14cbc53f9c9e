"""A task's stdio on the client side: FIFOs, copying, the terminal, signals.

As with ``ctr``, the client owns the FIFOs a task's stdio goes through: it
creates them in a private directory (mode 0700) and passes their paths in
``CreateTaskRequest``; the shim opens the other ends. Copying then runs
between this process's stdin/stdout/stderr and the FIFOs:

* stdout and stderr are read on the event loop. Each FIFO is opened for
  reading *and*, until the task has exited, by a placeholder writer of our
  own: a FIFO without writers reads as end-of-file, and the shim may open its
  end only after ``Create`` returned. Once the task exited
  (:meth:`TaskIO.writers_done`) the placeholder goes, and end-of-file comes
  when the shim has copied everything and closed its end, so no output is lost.
* stdin is copied by a daemon thread with blocking reads (this process's
  stdin may be a file or ``/dev/null``, which epoll refuses). The thread
  opens the FIFO for writing in blocking mode, so nothing is read from our
  stdin, nor written, before the shim has its reading end open (it opens it
  at ``Create`` for a task, at ``Start`` for an exec process; bytes written
  to a FIFO nobody holds open would be lost). At end of
  input it closes its FIFO and calls back (``on_stdin_eof``): the shim holds
  the FIFO open for writing itself, so the process only sees end of input
  once the caller sends ``CloseIO`` (``ctr`` leaves that out, and ``echo hi |
  ctr run ... cat`` never ends).

With a terminal (``-t``) the process gets a pty in the shim; here stdin is
put in raw mode (:class:`RawTerminal`) so keys, Ctrl-C included, reach the
container's pty unchanged, and window changes (SIGWINCH) become
``ResizePty`` calls. Without one, signals sent to ``berth`` are forwarded to
the task through ``Kill`` (:func:`forward_signals`).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import select
import shutil
import signal
import tempfile
import termios
import threading
import tty
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

#: Where FIFO directories go when the caller names none (``ctr`` uses /run/containerd/fifo).
DEFAULT_FIFO_ROOT = "/run/berth/fifo"
CHUNK = 64 << 10
#: Signals ``berth run``/``start``/``exec`` pass on to the task instead of dying of them (``ctr``'s
#: ForwardAllSignals, minus those a terminal process gets for its own reasons).
FORWARDED_SIGNALS = (
    signal.SIGINT,
    signal.SIGTERM,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
)


@dataclass
class Fifos:
    """The FIFO paths of one process's stdio ("" for a stream not wired) in their private directory."""

    directory: Path
    stdin: str = ""
    stdout: str = ""
    stderr: str = ""

    @classmethod
    def create(
        cls, process_id: str, *, stdin: bool = True, stderr: bool = True, root: str | None = None
    ) -> Fifos:
        """Make the FIFOs ``<dir>/<id>-stdin|stdout|stderr`` in a new private directory under ``root``.

        ``root`` defaults to ``$BERTH_FIFO_DIR``, else :data:`DEFAULT_FIFO_ROOT`
        when it can be created, else the system's temporary directory.
        Blocking (mkdir, mkfifo): a handful of syscalls, done inline.
        """
        base = root or os.environ.get("BERTH_FIFO_DIR") or _default_root()
        directory = Path(tempfile.mkdtemp(prefix="io-", dir=base))
        fifos = cls(directory)
        try:
            fifos.stdout = _mkfifo(directory / f"{process_id}-stdout")
            if stdin:
                fifos.stdin = _mkfifo(directory / f"{process_id}-stdin")
            if stderr:
                fifos.stderr = _mkfifo(directory / f"{process_id}-stderr")
        except BaseException:
            fifos.remove()
            raise
        return fifos

    def remove(self) -> None:
        """Delete the FIFOs and their directory (open descriptors stay valid)."""
        shutil.rmtree(self.directory, ignore_errors=True)


def _default_root() -> str:
    try:
        os.makedirs(DEFAULT_FIFO_ROOT, mode=0o700, exist_ok=True)
    except OSError:
        return tempfile.gettempdir()
    return DEFAULT_FIFO_ROOT if os.access(DEFAULT_FIFO_ROOT, os.W_OK | os.X_OK) else tempfile.gettempdir()


def _mkfifo(path: Path) -> str:
    os.mkfifo(path, 0o600)
    return str(path)


def write_all(fd: int, data: bytes) -> None:
    """Write every byte to ``fd``, waiting when it is non-blocking and full.

    Our stdout may be a non-blocking descriptor shared with another process;
    a short wait in ``select`` is then the only way to keep the bytes in order.
    """
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except BlockingIOError:
            select.select([], [fd], [])
            continue
        except BrokenPipeError:
            return  # the reader went away: nothing to deliver to
        view = view[n:]


class _Output:
    """One FIFO (the task's stdout or stderr) copied to one of our descriptors on the event loop."""

    def __init__(self, path: str, target_fd: int) -> None:
        self.target_fd = target_fd
        self.fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        # Opens at once since we are a reader; held until the task exited (see the module docstring).
        self.placeholder: int | None = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        self.done: asyncio.Future[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.done = loop.create_future()
        loop.add_reader(self.fd, self._readable)

    def _readable(self) -> None:
        while True:
            try:
                data = os.read(self.fd, CHUNK)
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno == errno.EINTR:
                    continue
                self._finish()
                return
            if not data:
                self._finish()
                return
            write_all(self.target_fd, data)

    def _finish(self) -> None:
        if self._loop is not None:
            self._loop.remove_reader(self.fd)
        if self.done is not None and not self.done.done():
            self.done.set_result(None)

    def drop_placeholder(self) -> None:
        if self.placeholder is not None:
            os.close(self.placeholder)
            self.placeholder = None

    def close(self) -> None:
        self.drop_placeholder()
        self._finish()
        with contextlib.suppress(OSError):
            os.close(self.fd)


class TaskIO:
    """Copies between this process's stdio and a process's :class:`Fifos`.

    Life cycle: construct (opens the FIFOs; before ``Tasks.Create``, so the
    shim never blocks opening its ends), :meth:`start` (copying begins),
    :meth:`writers_done` once the process exited, :meth:`drain` to wait for
    the last output, :meth:`close`. Without a terminal, stdout and stderr
    stay apart; with one the task has no stderr FIFO.
    """

    def __init__(self, fifos: Fifos, *, stdin_fd: int = 0, stdout_fd: int = 1, stderr_fd: int = 2) -> None:
        self.fifos = fifos
        self._stdin_fd = stdin_fd
        self._outputs: list[_Output] = []
        try:
            if fifos.stdout:
                self._outputs.append(_Output(fifos.stdout, stdout_fd))
            if fifos.stderr:
                self._outputs.append(_Output(fifos.stderr, stderr_fd))
        except BaseException:
            self.close()
            raise

    def start(self, loop: asyncio.AbstractEventLoop, on_stdin_eof: Callable[[], None] | None = None) -> None:
        """Begin copying; ``on_stdin_eof`` runs on ``loop`` once our stdin ended (never if it does not)."""
        for out in self._outputs:
            out.start(loop)
        if self.fifos.stdin:

            def ended() -> None:
                if on_stdin_eof is not None:
                    with contextlib.suppress(RuntimeError):  # the loop is gone: so is the process
                        loop.call_soon_threadsafe(on_stdin_eof)

            threading.Thread(
                target=_copy_stdin,
                args=(self._stdin_fd, self.fifos.stdin, ended),
                name="berth-stdin",
                daemon=True,
            ).start()

    def writers_done(self) -> None:
        """The process exited: from now on end-of-file means the shim delivered everything."""
        for out in self._outputs:
            out.drop_placeholder()

    async def drain(self, seconds: float) -> bool:
        """Wait up to ``seconds`` for end-of-file on every output; False if time ran out."""
        pending = [out.done for out in self._outputs if out.done is not None]
        if not pending:
            return True
        _, still = await asyncio.wait(pending, timeout=seconds)
        return not still

    def close(self) -> None:
        for out in self._outputs:
            out.close()


def _copy_stdin(source: int, path: str, ended: Callable[[], None]) -> None:
    """Thread body: once the shim reads ``path``, our stdin into it until end of input; then ``ended()``."""
    try:
        fifo = os.open(path, os.O_WRONLY | os.O_CLOEXEC)  # blocks until the shim opened its end
    except OSError:
        return
    try:
        while True:
            try:
                data = os.read(source, CHUNK)
            except InterruptedError:
                continue
            except OSError:
                break
            if not data:
                break
            write_all(fifo, data)
    except OSError:
        pass  # the shim closed its end: the process does not read any more
    finally:
        with contextlib.suppress(OSError):
            os.close(fifo)
    ended()


# -- terminal -----------------------------------------------------------------------


class RawTerminal:
    """Our stdin in raw mode for the ``with`` body, as ``ctr run -t`` does; restored afterwards.

    A no-op when stdin is no terminal (``berth run -t`` in a script): the
    container still gets its pty.
    """

    def __init__(self, fd: int = 0) -> None:
        self.fd = fd
        self._saved: list[Any] | None = None

    def __enter__(self) -> RawTerminal:
        if os.isatty(self.fd):
            self._saved = termios.tcgetattr(self.fd)
            tty.setraw(self.fd, termios.TCSANOW)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._saved is not None:
            with contextlib.suppress(termios.error):
                termios.tcsetattr(self.fd, termios.TCSADRAIN, self._saved)
            self._saved = None


def terminal_size() -> tuple[int, int] | None:
    """(columns, rows) of the terminal on stdin or stdout, None when neither is one."""
    for fd in (0, 1):
        try:
            size = os.get_terminal_size(fd)
        except OSError:
            continue
        return size.columns, size.lines
    return None


@contextlib.contextmanager
def on_signals(
    loop: asyncio.AbstractEventLoop, signals: tuple[int, ...], handler: Callable[[int], None]
) -> Iterator[None]:
    """Call ``handler(signum)`` on the loop for each of ``signals`` during the ``with`` body."""
    for sig in signals:
        loop.add_signal_handler(sig, handler, sig)
    try:
        yield
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)


__all__ = [
    "FORWARDED_SIGNALS",
    "Fifos",
    "RawTerminal",
    "TaskIO",
    "on_signals",
    "terminal_size",
    "write_all",
]
