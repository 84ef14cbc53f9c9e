"""The shim fork server ("zygote"): a shim start costs a fork, not a Python start-up.

A freshly exec'd Python shim pays the interpreter start and ~170 ms of imports
(asyncio, betterproto, the protos, structlog) and ~30 MB of private memory per
pod. The zygote pays them once: it imports everything a shim runs, freezes the
GC (so collections do not dirty the shared pages) and then forks one child per
shim. The children share the imported pages copy-on-write.

Server (``python -m plugins.runtime.runc_v2.shim.lean zygote -socket PATH -state
DIR -parent PID``, spawned by :meth:`ZygoteClient.spawn`; ``-m .zygote`` works too
but then cannot keep ssl out, see :mod:`.lean`):

* dies with its parent (``PR_SET_PDEATHSIG``), so a restarted berthd spawns a
  new one; the shims it forked never die with it: each is a session leader
  whose parent becomes init (or the nearest subreaper) when the zygote goes;
* while waiting it runs no event loop and no thread (a fork copies only the
  calling thread, so a lock held by another would stay locked in the child):
  a plain ``select`` over the listening socket, its clients, the children's
  ready pipes and a SIGCHLD wakeup pipe (it reaps its children);
* prints ``ready`` on stdout once it listens.

Protocol, on a unix socket: each message is a 4-byte big-endian length and a
JSON object. Requests carry a ``seq`` echoed in the reply (replies to
concurrent requests may come in any order):

* ``{"op": "start", "seq", "namespace", "id", "address", "ttrpc_address",
  "bundle", "debug"}`` -> ``{"seq", "address": "unix:///..."}`` or
  ``{"seq", "error": "..."}``: the semantics of the ``start`` bootstrap
  (grouping by the bundle's annotations, reuse of a live shim of the group,
  ``address`` and ``shim.pid`` written into the bundle);
* ``{"op": "exit", "seq"}`` -> ``{"seq"}``, then the zygote exits.

The child closes the zygote's fds, resets its signal dispositions, becomes a
session leader with stdio to the shim log, changes to the bundle and runs
:func:`.main.run` exactly as an exec'd shim; it writes one byte on its ready
pipe once its socket listens, and the zygote answers the client then.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import select
import signal
import socket
import struct
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from daemon.errors import FailedPrecondition, Unavailable
from plugins.runtime.runc_v2.shim.main import (
    START_TIMEOUT,
    Layout,
    ShimOptions,
    answers,
    running_pid,
    serve_forked,
    shim_identity,
    write_bundle_files,
)

log = structlog.get_logger(__name__)

PR_SET_PDEATHSIG = 1
SOCKET_NAME = "zygote.sock"
_HEADER = struct.Struct(">I")
MAX_MESSAGE = 1 << 20

#: What a forked shim runs, imported before the first fork so every shim shares the pages.
SHIM_MODULES = (
    "asyncio",
    "concurrent.futures.thread",  # asyncio.to_thread's executor, first used after the fork
    "ctypes",
    "datetime",
    "betterproto",
    "structlog",
    "daemon.errors",
    "daemon.logs",
    "daemon.ttrpc",
    "daemon.ttrpc.services",
    "daemon.typeurl",
    "protos.containerd.events",
    "protos.containerd.task.v2",
    "protos.containerd.types",
    "plugins.runtime.runc_v2.shim.publisher",
    "plugins.runtime.runc_v2.shim.reaper",
    "plugins.runtime.runc_v2.shim.service",
)


def encode(message: dict[str, Any]) -> bytes:
    data = json.dumps(message).encode()
    return _HEADER.pack(len(data)) + data


# -- server --------------------------------------------------------------------


@dataclass
class _Starting:
    """A forked shim that has not said it listens yet, and who waits for it."""

    pid: int
    ready_fd: int
    layout: Layout
    deadline: float
    waiters: list[tuple[socket.socket, int, str]] = field(default_factory=list)  # (client, seq, bundle)


class ZygoteServer:
    def __init__(self, path: str, state: str, *, debug: bool = False) -> None:
        """``debug``: the log level the zygote configured (its children keep it when theirs is the same)."""
        self._path = path
        self._state = state
        self._debug = debug
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._clients: dict[socket.socket, bytearray] = {}
        self._starting: dict[Path, _Starting] = {}  # by shim socket
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._exit = False

    def listen(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path)
        self._listener.bind(self._path)
        os.chmod(self._path, 0o600)
        self._listener.listen(64)
        # SIGCHLD only wakes select up; no work happens in the handler.
        signal.signal(signal.SIGCHLD, lambda _signum, _frame: None)
        signal.set_wakeup_fd(self._wake_w)

    def serve(self) -> None:
        try:
            while not self._exit:
                self._step()
        finally:
            self._listener.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path)

    def _step(self) -> None:
        readable: list[Any] = [self._listener, self._wake_r, *self._clients]
        readable.extend(s.ready_fd for s in self._starting.values())
        now = time.monotonic()
        timeout = min((s.deadline - now for s in self._starting.values()), default=None)
        ready, _, _ = select.select(readable, [], [], None if timeout is None else max(timeout, 0.0))
        for item in ready:
            if item is self._listener:
                client, _ = self._listener.accept()
                self._clients[client] = bytearray()
            elif item == self._wake_r:
                self._reap()
            elif isinstance(item, socket.socket):
                self._on_client(item)
            else:
                self._on_ready(item)
        now = time.monotonic()
        for starting in list(self._starting.values()):
            if starting.deadline <= now:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(starting.pid, signal.SIGKILL)
                self._settle(starting, ok=False, reason=f"no answer in {START_TIMEOUT}s")

    def _reap(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while os.read(self._wake_r, 512):
                pass
        while True:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return

    def _on_client(self, client: socket.socket) -> None:
        buf = self._clients[client]
        try:
            data = client.recv(65536)
        except OSError:
            data = b""
        if not data:
            self._drop(client)
            return
        buf += data
        while len(buf) >= _HEADER.size:
            (size,) = _HEADER.unpack_from(buf)
            if size > MAX_MESSAGE:
                self._drop(client)
                return
            if len(buf) < _HEADER.size + size:
                return
            raw = bytes(buf[_HEADER.size : _HEADER.size + size])
            del buf[: _HEADER.size + size]
            self._on_request(client, raw)

    def _on_request(self, client: socket.socket, raw: bytes) -> None:
        seq = -1
        try:
            request = json.loads(raw)
            seq = int(request.get("seq", -1))
            op = request.get("op")
            if op == "exit":
                self._exit = True
                self._reply(client, {"seq": seq})
            elif op == "start":
                self._start(client, seq, request)
            else:
                self._reply(client, {"seq": seq, "error": f"zygote: unknown op {op!r}"})
        except Exception as exc:  # noqa: BLE001 - a bad request fails alone, the zygote goes on
            self._reply(client, {"seq": seq, "error": f"zygote: {type(exc).__name__}: {exc}"})

    def _start(self, client: socket.socket, seq: int, request: dict[str, Any]) -> None:
        bundle = str(request["bundle"])
        task_id = str(request["id"])
        if not task_id or not request.get("namespace"):
            raise ValueError("namespace and id must not be empty")
        options = ShimOptions(
            namespace=str(request["namespace"]),
            id=shim_identity(bundle, task_id),
            address=str(request.get("address", "")),
            ttrpc_address=str(request.get("ttrpc_address", "")),
            state=self._state,
            debug=bool(request.get("debug", False)),
        )
        layout = Layout.of(options)
        starting = self._starting.get(layout.socket)
        if starting is not None:  # the group's shim is being forked: answer with it
            starting.waiters.append((client, seq, bundle))
            return
        if answers(layout.socket):
            address = f"unix://{layout.socket}"
            write_bundle_files(bundle, address, running_pid(layout))
            self._reply(client, {"seq": seq, "address": address})
            return
        layout.prepare()
        read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the shim-to-be: never returns
            self._forget_in_child()
            serve_forked(
                options, bundle, layout.log_file, write_fd, configure_logs=options.debug != self._debug
            )
        os.close(write_fd)
        self._starting[layout.socket] = _Starting(
            pid, read_fd, layout, time.monotonic() + START_TIMEOUT, [(client, seq, bundle)]
        )
        log.debug("zygote.fork", id=options.id, pid=pid)

    def _forget_in_child(self) -> None:
        """Detach the zygote's socket objects so no finaliser closes an fd number the shim reuses."""
        signal.set_wakeup_fd(-1)
        self._listener.detach()
        for client in self._clients:
            client.detach()

    def _on_ready(self, fd: int) -> None:
        starting = next(s for s in self._starting.values() if s.ready_fd == fd)
        try:
            ok = os.read(fd, 1) == b"1"
        except OSError:
            ok = False
        self._settle(starting, ok=ok, reason=f"shim exited before listening, see {starting.layout.log_file}")

    def _settle(self, starting: _Starting, *, ok: bool, reason: str) -> None:
        del self._starting[starting.layout.socket]
        os.close(starting.ready_fd)
        address = f"unix://{starting.layout.socket}"
        for client, seq, bundle in starting.waiters:
            if not ok:
                self._reply(client, {"seq": seq, "error": reason})
                continue
            try:
                write_bundle_files(bundle, address, running_pid(starting.layout) or starting.pid)
            except OSError as exc:
                self._reply(client, {"seq": seq, "error": f"bundle {bundle}: {exc}"})
            else:
                self._reply(client, {"seq": seq, "address": address})

    def _reply(self, client: socket.socket, message: dict[str, Any]) -> None:
        if client not in self._clients:
            return  # it went away while its shim started
        try:
            client.sendall(encode(message))
        except OSError:
            self._drop(client)

    def _drop(self, client: socket.socket) -> None:
        self._clients.pop(client, None)
        client.close()


def warm_messages() -> int:
    """Build betterproto's per-class metadata of every message class a shim may use, before the fork.

    betterproto builds a class's field tables and resolved type hints on its
    first serialisation and caches them on the class: built in each shim after
    the fork they would be private pages of every shim, built here they are
    shared. The classes are those of the loaded ``protos.*`` modules, the ttrpc
    envelopes and ``google.protobuf.Any``/``Empty``. Returns how many were warmed.
    """
    import betterproto
    import betterproto.lib.google.protobuf as pb

    modules = [m for name, m in sorted(sys.modules.items()) if m is not None and name.startswith("protos.")]
    modules.append(sys.modules["daemon.ttrpc.frame"])
    classes: dict[type[betterproto.Message], None] = {pb.Any: None, pb.Empty: None}
    for module in modules:
        for value in vars(module).values():
            if (
                isinstance(value, type)
                and issubclass(value, betterproto.Message)
                and value.__module__ == module.__name__
            ):
                classes[value] = None
    for cls in classes:
        cls().parse(bytes(cls()))
    return len(classes)


def die_with_parent(parent: int) -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"prctl(PR_SET_PDEATHSIG): {os.strerror(code)}")
    if os.getppid() != parent:  # the parent died before the prctl: nobody to serve
        sys.exit(0)


def server_main(argv: list[str] | None = None) -> None:
    import gc
    import importlib

    parser = argparse.ArgumentParser(prog="berth-shim-zygote", allow_abbrev=False)
    parser.add_argument("-socket", required=True)
    parser.add_argument("-state", required=True)
    parser.add_argument("-parent", type=int, required=True)
    parser.add_argument("-debug", action="store_true")
    args = parser.parse_args(argv)
    die_with_parent(args.parent)
    from daemon import logs
    from plugins.runtime.runc_v2.shim import lean

    lean.trim()  # a no-op when started through lean, as spawn does
    logs.configure("debug" if args.debug else "info", "json", sys.stderr)
    for module in SHIM_MODULES:
        importlib.import_module(module)
    warm_messages()
    # Also run the event loop's set-up code once (no thread, its fds closed): its first run
    # in every child would otherwise write into ~0.2 MB of code and objects shared with us.
    asyncio.new_event_loop().close()
    gc.collect()
    gc.freeze()
    server = ZygoteServer(args.socket, args.state, debug=args.debug)
    server.listen()
    print("ready", flush=True)
    log.info("zygote.serve", socket=args.socket, pid=os.getpid())
    server.serve()
    log.info("zygote.exit")


# -- client --------------------------------------------------------------------


class ZygoteClient:
    """berthd's end: spawns the zygote and asks it for shims (:meth:`start_shim`)."""

    def __init__(
        self, proc: asyncio.subprocess.Process, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """Use :meth:`spawn`."""
        self._proc = proc
        self._reader = reader
        self._writer = writer
        self._seq = 0
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._error: Exception | None = None
        self._receiver = asyncio.create_task(self._receive(), name="zygote-recv")

    @property
    def pid(self) -> int:
        return self._proc.pid

    @classmethod
    async def spawn(cls, state: Path, *, debug: bool = False) -> ZygoteClient:
        """Start a zygote forking shims on ``state`` (their -state) and connect to it.

        Unavailable if it does not come up within START_TIMEOUT (its stderr is berthd's).
        """
        await asyncio.to_thread(state.mkdir, parents=True, exist_ok=True, mode=0o711)
        path = state / SOCKET_NAME
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "plugins.runtime.runc_v2.shim.lean",
            "zygote",
            *("-socket", str(path), "-state", str(state), "-parent", str(os.getpid())),
            *(["-debug"] if debug else []),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
        )
        assert proc.stdout is not None
        try:
            async with asyncio.timeout(START_TIMEOUT):
                line = await proc.stdout.readline()
            if line != b"ready\n":
                raise Unavailable(f"shim zygote exited with status {await proc.wait()} before it was ready")
            reader, writer = await asyncio.open_unix_connection(str(path))
        except BaseException as exc:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            if isinstance(exc, TimeoutError):
                raise Unavailable(f"shim zygote: not ready within {START_TIMEOUT}s") from None
            raise
        log.info("zygote.spawned", pid=proc.pid, socket=str(path))
        return cls(proc, reader, writer)

    async def start_shim(
        self,
        *,
        namespace: str,
        id: str,  # noqa: A002 - the bootstrap's -id
        address: str,
        ttrpc_address: str,
        bundle: str,
        debug: bool = False,
    ) -> str:
        """Same semantics and answer as the ``start`` bootstrap: ``unix:///...``.

        FailedPrecondition if the shim could not start (the message names its
        log), Unavailable if the zygote is gone.
        """
        reply = await self._call(
            {
                "op": "start",
                "namespace": namespace,
                "id": id,
                "address": address,
                "ttrpc_address": ttrpc_address,
                "bundle": bundle,
                "debug": debug,
            }
        )
        if "error" in reply:
            raise FailedPrecondition(f"shim {namespace}/{id}: {reply['error']}")
        return str(reply["address"])

    async def close(self) -> None:
        """Make the zygote exit and wait for it; the shims it forked keep running."""
        if self._error is None:
            with contextlib.suppress(Unavailable, TimeoutError):
                async with asyncio.timeout(5):
                    await self._call({"op": "exit"})
        self._fail(Unavailable("shim zygote: client closed"))
        self._receiver.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._receiver
        self._writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self._writer.wait_closed()
        try:
            async with asyncio.timeout(5):
                await self._proc.wait()
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                self._proc.kill()
            await self._proc.wait()

    async def _call(self, request: dict[str, Any]) -> dict[str, Any]:
        if self._error is not None:
            raise self._error
        self._seq += 1
        seq = self._seq
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[seq] = future
        try:
            self._writer.write(encode({**request, "seq": seq}))
            await self._writer.drain()
            return await future
        except (ConnectionError, OSError) as exc:
            raise Unavailable(f"shim zygote: {exc}") from exc
        finally:
            self._pending.pop(seq, None)

    async def _receive(self) -> None:
        reason = "shim zygote: connection closed"
        try:
            while True:
                (size,) = _HEADER.unpack(await self._reader.readexactly(_HEADER.size))
                reply = json.loads(await self._reader.readexactly(size))
                future = self._pending.get(int(reply.get("seq", -1)))
                if future is not None and not future.done():
                    future.set_result(reply)
        except asyncio.IncompleteReadError:
            pass
        except (ConnectionError, OSError, ValueError) as exc:
            reason = f"shim zygote: {exc}"
        self._fail(Unavailable(reason))

    def _fail(self, error: Exception) -> None:
        if self._error is None:
            self._error = error
        for future in self._pending.values():
            if not future.done():
                future.set_exception(self._error)


if __name__ == "__main__":
    server_main()
