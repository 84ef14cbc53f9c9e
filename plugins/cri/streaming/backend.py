"""What the streaming handlers need from the runtime, and the implementation over berth's tasks.

:class:`StreamBackend` is the seam: the handlers (exec, attach, port-forward)
call it with the client's stdio wrapped as a :class:`ProcessIO`, whatever the
transport. :class:`TaskBackend` implements it the way containerd's CRI does:

* **exec**: an exec process added to the container's task (``TaskManager.exec``,
  OCI process = the container's own spec process with ``args`` replaced and
  ``terminal`` set to the request's tty), stdio through FIFOs berthd creates
  under ``fifo_root/<exec id>/``; copies FIFOs <-> client, ResizePty on
  resize, CloseIO when the client's stdin ends; waits for the exit, drains the
  output (bounded), deletes the exec. If the client goes away the call is
  cancelled: the exec's stdin is closed, and it is SIGKILLed after
  ``kill_grace`` seconds unless it exited by itself, then deleted. Nothing is
  left in the shim either way.
* **attach**: output follows the container's CRI log file (``meta.log_path``)
  from its current end (:mod:`.crilog`); stdin goes into the container's own
  stdin FIFO (the path its task was created with, ``TaskManager.get(...).io.stdin``);
  with ``stdin_once`` in the container config, the end of the client's stdin
  closes the container's stdin (CloseIO). Ends with the container's exit: its
  exit code.
* **port_forward**: a connection to ``127.0.0.1:port`` made inside the sandbox's
  pinned netns (:mod:`.netnsdial`), never through the pod IP.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import signal
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import structlog

from daemon.errors import BerthError, FailedPrecondition, NotFound
from daemon.metadata.containers import ContainerStore
from daemon.protocols import Opaque, TaskIO, TaskManager
from plugins.cri.store import NAMESPACE, CriStore
from plugins.cri.streaming import netnsdial
from plugins.cri.streaming.crilog import LogFollower
from plugins.cri.streaming.fifo import FifoReader, FifoWriter
from plugins.cri.streaming.streams import ByteSource, ProcessIO, copy
from protos.runtime import v1 as cri

log = structlog.get_logger("berth.cri.streaming")

PROCESS_TYPE_URL = "types.containerd.io/opencontainers/runtime-spec/1/Process"
DEFAULT_KILL_GRACE = 2.0
DRAIN_TIMEOUT = 2.0


class StreamBackend(Protocol):
    """The runtime side of the streaming server. Errors: those of :mod:`daemon.errors`."""

    def resolve_container(self, container_id: str) -> str:
        """The full id of a running container (``container_id`` may be a unique prefix).

        NotFound if there is none, FailedPrecondition if it is not running. Synchronous:
        the Exec/Attach RPCs call it (through ``StreamingServer.url``) before minting a token.
        """
        ...

    def resolve_sandbox(self, sandbox_id: str) -> str:
        """The full id of a sandbox that has a network namespace to forward into."""
        ...

    async def exec(self, container_id: str, cmd: Sequence[str], io: ProcessIO) -> int:
        """Run ``cmd`` in the container with ``io``; its exit code. Cancelled: clean up, nothing leaks."""
        ...

    async def attach(self, container_id: str, io: ProcessIO) -> int:
        """Stream the container's stdio until it exits; its exit code."""
        ...

    async def port_forward(
        self, sandbox_id: str, port: int
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A connection to ``port`` on the sandbox's loopback, made inside its netns."""
        ...


# -- shared copying helpers -------------------------------------------------------------


async def finish(tasks: Sequence[asyncio.Task[Any]], within: float) -> None:
    """Let ``tasks`` end by themselves ``within`` seconds, cancel what is left, wait for all."""
    if not tasks:
        return
    _, pending = await asyncio.wait(tasks, timeout=within)
    for task in pending:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


class TaskBackend:
    """:class:`StreamBackend` over berth's :class:`TaskManager` and the CRI store (namespace ``k8s.io``)."""

    def __init__(
        self,
        tasks: TaskManager,
        store: CriStore,
        records: ContainerStore,
        fifo_root: str | os.PathLike[str],
        *,
        namespace: str = NAMESPACE,
        kill_grace: float = DEFAULT_KILL_GRACE,
    ) -> None:
        self._tasks = tasks
        self._store = store
        self._records = records
        self._fifo_root = Path(fifo_root)
        self._ns = namespace
        self.kill_grace = kill_grace

    # -- validation ------------------------------------------------------------------

    def resolve_container(self, container_id: str) -> str:
        c = self._store.container(container_id)
        if c.status.state != "running":
            raise FailedPrecondition(f'container "{c.id}" is not running (state {c.status.state})')
        return c.id

    def resolve_sandbox(self, sandbox_id: str) -> str:
        sb = self._store.sandbox(sandbox_id)
        if sb.status.state != "ready":
            raise FailedPrecondition(f'sandbox "{sb.id}" is not ready (state {sb.status.state})')
        return sb.id

    # -- exec ------------------------------------------------------------------------

    async def _process_spec(self, container_id: str, cmd: Sequence[str], tty: bool) -> bytes:
        record = await self._records.get(self._ns, container_id)
        if record.spec is None:
            raise FailedPrecondition(f'container "{container_id}" has no OCI spec')
        spec = json.loads(record.spec.value)
        process: dict[str, Any] = dict(spec.get("process") or {})
        process["args"] = list(cmd)
        process["terminal"] = tty
        process.pop("consoleSize", None)
        return json.dumps(process).encode()

    async def exec(self, container_id: str, cmd: Sequence[str], io: ProcessIO) -> int:
        self.resolve_container(container_id)
        spec = await self._process_spec(container_id, cmd, io.tty)
        exec_id = secrets.token_hex(16)
        directory = self._fifo_root / exec_id
        paths = {
            name: str(directory / name)
            for name, wanted in (
                ("stdin", io.stdin is not None),
                ("stdout", io.stdout is not None),
                ("stderr", io.stderr is not None and not io.tty),
            )
            if wanted
        }
        await asyncio.to_thread(_make_fifos, directory, list(paths.values()))
        readers: dict[str, FifoReader] = {}
        writer: FifoWriter | None = None
        copies: list[asyncio.Task[Any]] = []
        added = started = exited = False
        try:
            for name in ("stdout", "stderr"):
                if name in paths:
                    readers[name] = FifoReader(paths[name])
            if "stdin" in paths:
                writer = FifoWriter(paths["stdin"])
            task_io = TaskIO(
                stdin=paths.get("stdin", ""),
                stdout=paths.get("stdout", ""),
                stderr=paths.get("stderr", ""),
                terminal=io.tty,
            )
            await self._tasks.exec(
                self._ns, container_id, exec_id, spec=Opaque(PROCESS_TYPE_URL, spec), io=task_io
            )
            added = True
            pid = await self._tasks.start(self._ns, container_id, exec_id)
            started = True
            log.info("exec.start", container=container_id, exec_id=exec_id, pid=pid, tty=io.tty)
            outputs = []
            for name, reader in readers.items():
                sink = io.stdout if name == "stdout" else io.stderr
                assert sink is not None
                outputs.append(asyncio.create_task(copy(reader, sink)))
            copies += outputs
            if writer is not None and io.stdin is not None:
                copies.append(
                    asyncio.create_task(
                        self._feed_stdin(container_id, exec_id, io.stdin, writer, close_io=True)
                    )
                )
            if io.resizes is not None:
                copies.append(asyncio.create_task(self._resize(container_id, exec_id, io)))
            status = await self._tasks.wait(self._ns, container_id, exec_id)
            exited = True
            for reader in readers.values():
                reader.writers_done()
            await finish(outputs, DRAIN_TIMEOUT)
            log.info("exec.exit", container=container_id, exec_id=exec_id, status=status.exit_status)
            return status.exit_status
        finally:
            await asyncio.shield(
                self._cleanup_exec(
                    container_id, exec_id, added, started and not exited, copies, readers, writer, directory
                )
            )

    async def _feed_stdin(
        self, container_id: str, exec_id: str, source: ByteSource, writer: FifoWriter, *, close_io: bool
    ) -> None:
        """Client stdin -> the process's stdin FIFO; at its end our FIFO end closes, then CloseIO if asked."""
        try:
            while data := await source.read():
                await writer.write(data)
        except OSError as exc:
            what = "exec" if exec_id else "attach"
            log.debug(f"{what}.stdin_error", container=container_id, exec_id=exec_id, error=str(exc))
        finally:
            writer.close()
        if close_io:
            with contextlib.suppress(BerthError):
                await self._tasks.close_io(self._ns, container_id, exec_id, stdin=True)

    async def _resize(self, container_id: str, exec_id: str, io: ProcessIO) -> None:
        assert io.resizes is not None
        while True:
            size = await io.resizes.get()
            try:
                await self._tasks.resize_pty(self._ns, container_id, exec_id, size.width, size.height)
            except BerthError as exc:
                log.debug("exec.resize_failed", exec_id=exec_id, error=str(exc))

    async def _cleanup_exec(
        self,
        container_id: str,
        exec_id: str,
        added: bool,
        running: bool,
        copies: list[asyncio.Task[Any]],
        readers: dict[str, FifoReader],
        writer: FifoWriter | None,
        directory: Path,
    ) -> None:
        """Whatever happened: the exec is gone from the shim, our fds are closed, the FIFOs removed."""
        for task in copies:
            task.cancel()
        await asyncio.gather(*copies, return_exceptions=True)
        if writer is not None:
            writer.close()
        if added:
            if running:
                with contextlib.suppress(BerthError):
                    await self._tasks.close_io(self._ns, container_id, exec_id, stdin=True)
                try:
                    await asyncio.wait_for(self._tasks.wait(self._ns, container_id, exec_id), self.kill_grace)
                except (TimeoutError, BerthError):
                    log.info("exec.kill", container=container_id, exec_id=exec_id)
                    with contextlib.suppress(BerthError):
                        await self._tasks.kill(self._ns, container_id, exec_id, signal=signal.SIGKILL)
                    with contextlib.suppress(TimeoutError, BerthError):
                        await asyncio.wait_for(self._tasks.wait(self._ns, container_id, exec_id), 10)
            try:
                await self._tasks.delete_process(self._ns, container_id, exec_id)
            except NotFound:
                pass
            except BerthError as exc:
                log.warning("exec.delete_failed", container=container_id, exec_id=exec_id, error=str(exc))
        for reader in readers.values():
            reader.close()
        await asyncio.to_thread(shutil.rmtree, directory, True)

    # -- attach ----------------------------------------------------------------------

    async def attach(self, container_id: str, io: ProcessIO) -> int:
        c = self._store.container(container_id)
        self.resolve_container(c.id)
        config = cri.ContainerConfig().parse(c.meta.config) if c.meta.config else cri.ContainerConfig()
        state = await self._tasks.get(self._ns, c.id)
        follower = None
        tasks: list[asyncio.Task[Any]] = []
        try:
            if c.meta.log_path and (io.stdout is not None or io.stderr is not None):
                follower = LogFollower(c.meta.log_path, io.stdout, io.stderr if not io.tty else None)
                tasks.append(asyncio.create_task(follower.run()))
                await follower.started()
            if io.stdin is not None:
                if not state.io.stdin:
                    raise FailedPrecondition(f'container "{c.id}" was not created with stdin')
                feed = self._attach_stdin(c.id, state.io.stdin, io.stdin, config.stdin_once)
                tasks.append(asyncio.create_task(feed))
            if io.resizes is not None:
                tasks.append(asyncio.create_task(self._resize(c.id, "", io)))
            status = await self._tasks.wait(self._ns, c.id)
            if follower is not None:
                follower.stop()
            await finish(tasks[:1] if follower is not None else [], DRAIN_TIMEOUT)
            return status.exit_status
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for sink in (io.stdout, io.stderr):
                if sink is not None:
                    await sink.close()

    async def _attach_stdin(self, container_id: str, path: str, source: ByteSource, stdin_once: bool) -> None:
        """The container's own stdin FIFO, opened in the task (a failure ends only the stdin copy)."""
        await self._feed_stdin(container_id, "", source, FifoWriter(path), close_io=stdin_once)

    # -- port-forward ----------------------------------------------------------------

    async def port_forward(
        self, sandbox_id: str, port: int
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        sb = self._store.sandbox(sandbox_id)
        if not sb.meta.netns_path:
            # a host-network pod listens in the host's namespace: its loopback is the host's (as containerd)
            return await asyncio.open_connection("127.0.0.1", port)
        return await netnsdial.connect(sb.meta.netns_path, port)


def _make_fifos(directory: Path, paths: list[str]) -> None:
    directory.mkdir(parents=True, mode=0o700)
    for path in paths:
        os.mkfifo(path, 0o600)
