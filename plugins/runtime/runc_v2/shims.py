"""Starting, connecting to and supervising shims (containerd's runtime v2 bootstrap).

A shim is started by running ``<binary> -namespace NS -address ADDR
-publish-binary BIN -id ID [-debug] start`` in the task's bundle, with
TTRPC_ADDRESS (where it forwards events), GRPC_ADDRESS and NAMESPACE in its
environment; it prints ``unix:///path`` once it serves. A shim that already
serves the bundle's group prints the same address (grouping is the shim's
decision: containerd's reads the bundle's annotations). berth's own shim can
instead be forked by the zygote (:mod:`.shim.zygote`), which answers the same.

``<binary> ... delete`` in the bundle cleans up after a shim that died:
force-deletes the runc container, unmounts the rootfs, prints a
DeleteResponse (status 137).

Supervision: :class:`Shim` watches the shim process through a pidfd, so a
shim killed with SIGKILL is noticed at once, whether berthd started it or
found it after a restart (the shim is never berthd's child: it daemonizes).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sys
from collections.abc import Callable, Coroutine, Mapping
from pathlib import Path
from typing import Any, TypeVar

import structlog

from daemon.errors import BerthError, DeadlineExceeded, FailedPrecondition, Unavailable
from daemon.ttrpc import TtrpcClient
from daemon.ttrpc.services import TASK_METHODS, TASK_SERVICE
from protos.containerd.task.v2 import ConnectRequest, ConnectResponse, DeleteResponse

log = structlog.get_logger("berth.runtime.shims")

M = TypeVar("M")

#: ttrpc metadata naming the namespace, as containerd's clients send it.
NAMESPACE_KEY = "containerd-namespace-ttrpc"
BOOTSTRAP_TIMEOUT = 30.0
CONNECT_TIMEOUT = 5.0


def _unix_path(address: str) -> str:
    return address.removeprefix("unix://")


class Shim:
    """One connected shim: its ttrpc client, its pid, the tasks it serves, and whether it is gone.

    ``on_gone`` is called once when the shim process ends (or its connection
    is lost for good) and is not a deliberate :meth:`close`.
    """

    def __init__(
        self,
        *,
        namespace: str,
        address: str,
        binary: str,
        client: TtrpcClient,
        pid: int,
        on_gone: Callable[[Shim], Coroutine[Any, Any, None]],
    ) -> None:
        self.namespace = namespace
        self.address = address
        self.binary = binary
        self.client = client
        self.pid = pid
        #: the group it serves (a pod, or the id of its one task): it is reused for that group
        self.group = ""
        #: started ahead of its group's first task (prepare_shim): it has a group directory
        self.prepared = False
        self.tasks: set[str] = set()
        self.gone = asyncio.Event()
        self._on_gone = on_gone
        self._closing = False
        self._pidfd = -1
        self._watch: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"<Shim {self.namespace} pid={self.pid} {self.address}>"

    @classmethod
    async def connect(
        cls,
        *,
        namespace: str,
        address: str,
        binary: str,
        on_gone: Callable[[Shim], Coroutine[Any, Any, None]],
        timeout: float = CONNECT_TIMEOUT,  # noqa: ASYNC109 - bounds connect and the Connect call together
    ) -> Shim:
        """Connect to ``address`` and ask the shim its pid (Connect); Unavailable if nobody answers."""
        client = await TtrpcClient.connect(_unix_path(address))
        try:
            reply = await client.call(
                TASK_SERVICE,
                "Connect",
                ConnectRequest(),
                ConnectResponse,
                timeout=timeout,
                metadata={NAMESPACE_KEY: namespace},
            )
        except BaseException:
            await _close_quietly(client)
            raise
        shim = cls(
            namespace=namespace,
            address=address,
            binary=binary,
            client=client,
            pid=reply.shim_pid,
            on_gone=on_gone,
        )
        shim._supervise()
        return shim

    async def call(
        self,
        method: str,
        request: Any,
        response_cls: type[M],
        *,
        timeout: float | None = None,  # noqa: ASYNC109 - it travels to the shim as the call's deadline
    ) -> M:
        """Call ``containerd.task.v2.Task/<method>``; errors keep their codes, a gone shim is Unavailable."""
        assert TASK_METHODS[method][1] is response_cls, method
        if self.gone.is_set():
            raise Unavailable(f"shim {self.address} (pid {self.pid}): gone")
        return await self.client.call(
            TASK_SERVICE,
            method,
            request,
            response_cls,
            timeout=timeout,
            metadata={NAMESPACE_KEY: self.namespace},
        )

    def _supervise(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            self._pidfd = os.pidfd_open(self.pid) if self.pid > 0 else -1
        except ProcessLookupError:
            self._pidfd = -1
            loop.call_soon(self._ended, "process not found")
            return
        except OSError:  # no pidfd (old kernel): the connection's end is the signal
            self._pidfd = -1
        if self._pidfd >= 0:
            loop.add_reader(self._pidfd, self._ended, "process exited")
        else:
            self._watch = asyncio.create_task(self._watch_connection())

    async def _watch_connection(self) -> None:
        while not self.client.closed:
            try:
                await self.call("Connect", ConnectRequest(), ConnectResponse, timeout=CONNECT_TIMEOUT)
            except Unavailable:
                break
            except BerthError:
                pass
            await asyncio.sleep(1.0)
        self._ended("connection lost")

    def _unwatch_pidfd(self) -> None:
        if self._pidfd >= 0:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = -1

    def _ended(self, why: str) -> None:
        self._unwatch_pidfd()
        if self.gone.is_set():
            return
        self.gone.set()
        if self._closing:
            return
        log.warning("shim.gone", namespace=self.namespace, pid=self.pid, address=self.address, why=why)
        asyncio.get_running_loop().create_task(self._on_gone(self))

    async def wait_gone(self, timeout: float) -> bool:  # noqa: ASYNC109 - returns whether it ended in time
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self.gone.wait()
        return self.gone.is_set()

    def expect_exit(self) -> None:
        """The shim is being shut down on purpose: its end is not reported as a loss."""
        self._closing = True

    async def close(self) -> None:
        """Stop supervising and close the connection (the shim process is left alone)."""
        self._closing = True
        if self._watch is not None:
            self._watch.cancel()
        self._unwatch_pidfd()
        await _close_quietly(self.client)


async def _close_quietly(client: TtrpcClient) -> None:
    # TtrpcClient.close() may raise CancelledError when the peer closed first
    # (its receiver shares the transport's close waiter); only our own cancellation counts.
    try:
        await client.close()
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise


def remove_stale_socket(address: str) -> None:
    """Remove a dead shim's socket file (a killed shim cannot); blocking. Left alone if something answers."""
    path = _unix_path(address)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(path)
        except FileNotFoundError:
            return
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(path)


def resolve_binary(name: str) -> str:
    """The shim executable for ``runtime_binary``: a path, a name on PATH, or berth's own beside Python."""
    if not name:
        name = "berth-shim-runc-v2"
    if os.sep in name:
        return name
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    from shutil import which

    found = which(name)
    if found is None:
        raise FailedPrecondition(f"runtime_binary {name!r}: not found on PATH nor beside {sys.executable}")
    return found


def bootstrap_env(
    *, namespace: str, address: str, ttrpc_address: str, extra: Mapping[str, str]
) -> dict[str, str]:
    return {
        **os.environ,
        **extra,
        "TTRPC_ADDRESS": ttrpc_address,
        "GRPC_ADDRESS": address,
        "NAMESPACE": namespace,
    }


def _argv(
    binary: str,
    *,
    namespace: str,
    id: str,  # noqa: A002 - the flag's name
    address: str,
    publish_binary: str,
    debug: bool,
) -> list[str]:
    return [
        binary,
        *("-namespace", namespace, "-address", address, "-publish-binary", publish_binary, "-id", id),
        *(["-debug"] if debug else []),
    ]


async def bootstrap_start(
    binary: str,
    *,
    bundle: Path,
    namespace: str,
    id: str,  # noqa: A002
    address: str,
    ttrpc_address: str,
    publish_binary: str,
    debug: bool = False,
    stdin: bytes = b"",
    env: Mapping[str, str] | None = None,
) -> str:
    """Run ``<binary> ... start`` in ``bundle``; the address it prints (``unix:///...``).

    A shim that fails to start is FailedPrecondition carrying what it printed.
    """
    argv = [
        *_argv(
            binary, namespace=namespace, id=id, address=address, publish_binary=publish_binary, debug=debug
        ),
        "start",
    ]
    out, err, code = await _run(
        argv,
        bundle,
        stdin,
        bootstrap_env(namespace=namespace, address=address, ttrpc_address=ttrpc_address, extra=env or {}),
    )
    text = out.decode(errors="replace").strip()
    if code != 0 or not text:
        why = err.decode(errors="replace").strip() or text or f"exit status {code}"
        raise FailedPrecondition(f"task {id!r}: shim {binary} start failed: {why}")
    address_line = text.splitlines()[-1].strip()
    if not address_line.startswith("unix://"):
        raise FailedPrecondition(
            f"task {id!r}: shim {binary} start printed {address_line!r}, not a unix:// address"
        )
    return address_line


async def bootstrap_delete(
    binary: str,
    *,
    bundle: Path,
    namespace: str,
    id: str,  # noqa: A002
    address: str,
    ttrpc_address: str,
    publish_binary: str,
    env: Mapping[str, str] | None = None,
) -> DeleteResponse:
    """Run ``<binary> ... delete`` in ``bundle`` (after a shim died); its DeleteResponse."""
    argv = [
        *_argv(
            binary, namespace=namespace, id=id, address=address, publish_binary=publish_binary, debug=False
        ),
        *("-bundle", str(bundle)),
        "delete",
    ]
    out, err, code = await _run(
        argv,
        bundle,
        b"",
        bootstrap_env(namespace=namespace, address=address, ttrpc_address=ttrpc_address, extra=env or {}),
    )
    if code != 0:
        why = err.decode(errors="replace").strip() or f"exit status {code}"
        raise FailedPrecondition(f"task {id!r}: shim {binary} delete failed: {why}")
    if err.strip():
        log.info("shim.delete_output", id=id, bundle=str(bundle), stderr=err.decode(errors="replace").strip())
    try:
        return DeleteResponse().parse(out)
    except Exception as exc:  # betterproto raises assorted types
        raise FailedPrecondition(f"task {id!r}: shim {binary} delete: unparseable answer: {exc}") from exc


async def _run(argv: list[str], cwd: Path, stdin: bytes, env: Mapping[str, str]) -> tuple[bytes, bytes, int]:
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            cwd=cwd,
            env=dict(env),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
    except OSError as exc:
        raise FailedPrecondition(f"shim {argv[0]}: cannot run: {exc.strerror or exc}") from exc
    try:
        async with asyncio.timeout(BOOTSTRAP_TIMEOUT):
            out, err = await proc.communicate(stdin)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise DeadlineExceeded(f"shim {argv[0]} {argv[-1]}: no answer after {BOOTSTRAP_TIMEOUT}s") from None
    assert proc.returncode is not None
    return out, err, proc.returncode
