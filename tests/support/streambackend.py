"""A TaskManager stand-in running host processes, for driving the streaming server's TaskBackend.

:class:`HostTasks` implements the part of :class:`daemon.protocols.TaskManager`
that streaming uses (exec, start, wait, close_io, resize_pty, kill,
delete_process, get) with real processes on the host, and opens the FIFOs
exactly as berth's shim does, by reusing the shim's own stdio code
(:class:`plugins.runtime.runc_v2.shim.stdio.ProcessIO`): no terminal -> the
process writes straight into the stdout/stderr FIFOs and reads a pipe fed from
the stdin FIFO (CloseIO ends it); terminal -> a pty whose master is copied to
and from the FIFOs. So the production :class:`TaskBackend` runs unchanged on
top of it, and tests see real EOFs, exits, signals and pids.

:func:`make_store` builds a CriStore holding fake CRI containers/sandboxes
(nothing persisted) plus the container records TaskBackend reads specs from.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import signal
import struct
import termios
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

from daemon.errors import AlreadyExists, FailedPrecondition, NotFound
from daemon.metadata.containers import Container, ContainerStore, Runtime, TypedValue
from daemon.protocols import NO_IO, ExitStatus, Opaque, ProcessState, TaskIO, TaskManager, TaskStatus
from plugins.cri.store import ContainerMeta, ContainerStatus, CriStore, Entry, SandboxMeta, SandboxStatus
from plugins.runtime.runc_v2.shim.stdio import ProcessIO as ShimIO


@dataclass
class HostProcess:
    container_id: str
    exec_id: str
    args: list[str]
    io: TaskIO
    shim_io: ShimIO | None = None
    proc: asyncio.subprocess.Process | None = None
    master: int | None = None
    exited: asyncio.Event = field(default_factory=asyncio.Event)
    exit_status: int = 0
    exited_at: datetime | None = None
    reaper: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc is not None else 0


class HostTasks:
    """Processes by (container id, exec id); ``""`` is a container's init process."""

    def __init__(self) -> None:
        self.procs: dict[tuple[str, str], HostProcess] = {}
        self.started_pids: list[int] = []

    def as_task_manager(self) -> TaskManager:
        return cast(TaskManager, self)

    def _get(self, container_id: str, exec_id: str) -> HostProcess:
        try:
            return self.procs[(container_id, exec_id)]
        except KeyError:
            raise NotFound(f"process {container_id}/{exec_id or 'init'} not found") from None

    def live_execs(self) -> list[HostProcess]:
        return [p for (_, e), p in self.procs.items() if e]

    async def add(self, container_id: str, exec_id: str, args: list[str], io: TaskIO) -> None:
        if (container_id, exec_id) in self.procs:
            raise AlreadyExists(f"process {container_id}/{exec_id} exists")
        self.procs[(container_id, exec_id)] = HostProcess(container_id, exec_id, args, io)

    async def exec(
        self, namespace: str, container_id: str, exec_id: str, *, spec: Opaque, io: TaskIO = NO_IO
    ) -> None:
        process = json.loads(spec.value)
        assert process["terminal"] == io.terminal
        await self.add(container_id, exec_id, list(process["args"]), io)

    async def start(self, namespace: str, container_id: str, exec_id: str = "") -> int:
        p = self._get(container_id, exec_id)
        p.shim_io = await asyncio.to_thread(ShimIO.open, p.io.stdin, p.io.stdout, p.io.stderr, p.io.terminal)
        try:
            return await self._spawn(p)
        except OSError as exc:  # what runc reports as a failed exec
            await p.shim_io.close()
            raise FailedPrecondition(f"exec {p.args[0]}: {exc.strerror}") from None

    async def _spawn(self, p: HostProcess) -> int:
        assert p.shim_io is not None
        if p.io.terminal:
            master, slave = os.openpty()
            try:
                p.proc = await asyncio.create_subprocess_exec(
                    *p.args, stdin=slave, stdout=slave, stderr=slave, start_new_session=True
                )
            finally:
                os.close(slave)
            p.master = master
            p.shim_io.attach_console(master)
        else:
            fds = p.shim_io.for_runc()
            p.proc = await asyncio.create_subprocess_exec(
                *p.args,
                stdin=fds.stdin if fds.stdin is not None else asyncio.subprocess.DEVNULL,
                stdout=fds.stdout if fds.stdout is not None else asyncio.subprocess.DEVNULL,
                stderr=fds.stderr if fds.stderr is not None else asyncio.subprocess.DEVNULL,
                start_new_session=True,
            )
            p.shim_io.started()
        self.started_pids.append(p.proc.pid)
        p.reaper = asyncio.create_task(self._reap(p))
        return p.proc.pid

    async def _reap(self, p: HostProcess) -> None:
        assert p.proc is not None and p.shim_io is not None
        code = await p.proc.wait()
        for copy in p.shim_io.copies:  # output drains before the exit is reported, as in the shim
            if copy is not p.shim_io._stdin_copy:
                await copy.wait()
        p.exit_status = 128 - code if code < 0 else code
        p.exited_at = datetime.now(UTC)
        p.exited.set()

    async def wait(self, namespace: str, container_id: str, exec_id: str = "") -> ExitStatus:
        p = self._get(container_id, exec_id)
        await p.exited.wait()
        assert p.exited_at is not None
        return ExitStatus(p.pid, p.exit_status, p.exited_at)

    async def close_io(self, namespace: str, container_id: str, exec_id: str, *, stdin: bool) -> None:
        p = self._get(container_id, exec_id)
        if stdin and p.shim_io is not None:
            p.shim_io.close_stdin()

    async def resize_pty(
        self, namespace: str, container_id: str, exec_id: str, width: int, height: int
    ) -> None:
        p = self._get(container_id, exec_id)
        if p.master is None:
            raise FailedPrecondition("no terminal")
        fcntl.ioctl(p.master, termios.TIOCSWINSZ, struct.pack("HHHH", height, width, 0, 0))

    async def kill(
        self,
        namespace: str,
        container_id: str,
        exec_id: str = "",
        *,
        signal: int,
        all: bool = False,  # noqa: A002
    ) -> None:
        p = self._get(container_id, exec_id)
        if p.proc is not None and p.proc.returncode is None:
            p.proc.send_signal(signal)

    async def delete_process(self, namespace: str, container_id: str, exec_id: str) -> ExitStatus:
        p = self._get(container_id, exec_id)
        if p.proc is not None and not p.exited.is_set():
            raise FailedPrecondition(f"process {exec_id} is running")
        if p.shim_io is not None:
            await p.shim_io.close()
        del self.procs[(container_id, exec_id)]
        return ExitStatus(p.pid, p.exit_status, p.exited_at or datetime.now(UTC))

    async def get(self, namespace: str, container_id: str, exec_id: str = "") -> ProcessState:
        p = self._get(container_id, exec_id)
        status = TaskStatus.STOPPED if p.exited.is_set() else TaskStatus.RUNNING
        return ProcessState(container_id, exec_id, p.pid, status, p.io, p.exit_status, p.exited_at)

    async def shutdown(self) -> None:
        """Kill (by pid) and reap everything still running; tests call it in teardown."""
        for p in list(self.procs.values()):
            if p.proc is not None and p.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.proc.pid, signal.SIGKILL)
            if p.reaper is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(p.reaper, 5)
            if p.shim_io is not None:
                await p.shim_io.close()
        self.procs.clear()


class FakeRecords:
    """The ``get`` of a ContainerStore: container records with an OCI spec."""

    def __init__(self) -> None:
        self.records: dict[str, Container] = {}

    def add(self, container_id: str, process: dict[str, Any]) -> None:
        spec = json.dumps({"ociVersion": "1.1.0", "process": process}).encode()
        self.records[container_id] = Container(
            id=container_id,
            runtime=Runtime(name="io.containerd.runc.v2"),
            spec=TypedValue("types.containerd.io/opencontainers/runtime-spec/1/Spec", spec),
        )

    async def get(self, namespace: str, id_: str) -> Container:
        try:
            return self.records[id_]
        except KeyError:
            raise NotFound(f"container {id_} not found") from None

    def as_store(self) -> ContainerStore:
        return cast(ContainerStore, self)


def make_store(root: Path, records: FakeRecords) -> CriStore:
    return CriStore(records.as_store(), root)


def add_container(
    store: CriStore,
    records: FakeRecords,
    container_id: str,
    *,
    state: str = "running",
    log_path: str = "",
    stdin_once: bool = False,
) -> None:
    from protos.runtime import v1 as cri

    config = bytes(cri.ContainerConfig(stdin=True, stdin_once=stdin_once))
    meta = ContainerMeta(
        id=container_id, name=container_id, sandbox_id="sb", config=config, log_path=log_path
    )
    store.containers[container_id] = Entry(meta, ContainerStatus(state=state))
    records.add(
        container_id, {"args": ["true"], "env": ["PATH=/usr/bin:/bin"], "cwd": "/", "terminal": False}
    )


def add_sandbox(store: CriStore, sandbox_id: str, netns_path: str) -> None:
    store.sandboxes[sandbox_id] = Entry(
        SandboxMeta(id=sandbox_id, name=sandbox_id, config=b"", netns_path=netns_path),
        SandboxStatus(state="ready"),
    )
