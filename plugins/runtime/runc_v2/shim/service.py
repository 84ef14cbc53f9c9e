"""The containerd.task.v2.Task service of the shim, driving runc.

One shim serves the tasks created through it; each task is one runc container
whose init process is a child of the shim (a subreaper) once ``runc create``
returns. Exit statuses come from :class:`~.reaper.Reaper`; the service never
waits on processes itself.

Scope of this slice: init processes only (no exec), no terminal, no stdin,
rootfs already in the bundle (mounts in CreateTaskRequest.rootfs are refused),
stdout/stderr are plain file paths (or ``file://`` URIs) appended to.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import betterproto.lib.google.protobuf as pb
import structlog

from daemon.errors import (
    AlreadyExists,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    Unimplemented,
)
from plugins.runtime.runc_v2.shim.reaper import Exit, Reaper
from protos.containerd.task.v2 import (
    ConnectRequest,
    ConnectResponse,
    CreateTaskRequest,
    CreateTaskResponse,
    DeleteRequest,
    DeleteResponse,
    KillRequest,
    PidsRequest,
    PidsResponse,
    ShutdownRequest,
    StartRequest,
    StartResponse,
    StateRequest,
    StateResponse,
    WaitRequest,
    WaitResponse,
)
from protos.containerd.v1.types import ProcessInfo, Status

log = structlog.get_logger(__name__)

VERSION = "berth-shim-runc-v2 0.1"

RUNC = "runc"


@dataclass
class Task:
    id: str
    bundle: str
    pid: int
    stdout: str
    stderr: str
    status: Status = Status.CREATED
    exit_status: int = 0
    exited_at: datetime | None = None
    exited: asyncio.Event = field(default_factory=asyncio.Event)


class TaskService:
    """Handlers of containerd.task.v2.Task (bound with daemon.ttrpc.services.bind).

    ``runc_root`` is runc's ``--root`` (state of the containers); ``on_shutdown``
    is called once Shutdown decides the shim should exit.
    """

    def __init__(self, reaper: Reaper, runc_root: str, on_shutdown: Callable[[], None]) -> None:
        self._reaper = reaper
        self._runc_root = runc_root
        self._on_shutdown = on_shutdown
        self._tasks: dict[str, Task] = {}
        reaper.subscribe(self._on_exit)

    # -- Task service -------------------------------------------------------

    async def create(self, request: CreateTaskRequest) -> CreateTaskResponse:
        if not request.id:
            raise InvalidArgument("create: id must not be empty")
        if request.id in self._tasks:
            raise AlreadyExists(f"task {request.id!r}: already exists")
        if not request.bundle:
            raise InvalidArgument(f"task {request.id!r}: bundle must not be empty")
        bundle = Path(request.bundle)
        if not (bundle / "config.json").is_file():
            raise InvalidArgument(f"task {request.id!r}: bundle {request.bundle!r} has no config.json")
        if request.rootfs:
            raise Unimplemented(f"task {request.id!r}: rootfs mounts are not supported yet")
        if request.terminal:
            raise Unimplemented(f"task {request.id!r}: terminal is not supported yet")
        if request.stdin:
            raise Unimplemented(f"task {request.id!r}: stdin is not supported yet")
        if request.checkpoint:
            raise Unimplemented(f"task {request.id!r}: restore from checkpoint is not supported")
        pid_file = bundle / "init.pid"
        stdout = await asyncio.to_thread(_open_output, request.stdout)
        try:
            stderr = await asyncio.to_thread(_open_output, request.stderr)
        except BaseException:
            os.close(stdout)
            raise
        try:
            status, _ = await self._reaper.run(
                [
                    *self._runc("--log", str(bundle / "log.json"), "--log-format", "json", "create"),
                    *("--bundle", str(bundle), "--pid-file", str(pid_file), request.id),
                ],
                stdout=stdout,
                stderr=stderr,
            )
        finally:
            os.close(stdout)
            os.close(stderr)
        if status != 0:
            raise Internal(
                f"task {request.id!r}: runc create: {await asyncio.to_thread(_runc_error, bundle)}"
            )
        pid = int((await asyncio.to_thread(pid_file.read_text)).strip())
        task = Task(request.id, str(bundle), pid, request.stdout, request.stderr)
        self._tasks[task.id] = task
        early = self._reaper.take(pid)
        if early is not None:
            self._exited(task, early)
        log.info("shim.create", id=task.id, pid=pid)
        return CreateTaskResponse(pid=pid)

    async def start(self, request: StartRequest) -> StartResponse:
        task = self._task(request.id, request.exec_id)
        if task.status != Status.CREATED:
            raise FailedPrecondition(f"task {task.id!r}: cannot start a task in state {task.status.name}")
        await self._check(task, "start", self._runc("start", task.id))
        if task.status == Status.CREATED:
            task.status = Status.RUNNING
        log.info("shim.start", id=task.id, pid=task.pid)
        return StartResponse(pid=task.pid)

    async def state(self, request: StateRequest) -> StateResponse:
        task = self._task(request.id, request.exec_id)
        response = StateResponse(
            id=task.id,
            bundle=task.bundle,
            pid=task.pid,
            status=task.status,
            stdout=task.stdout,
            stderr=task.stderr,
            exit_status=task.exit_status,
        )
        if task.exited_at is not None:
            response.exited_at = task.exited_at
        return response

    async def kill(self, request: KillRequest) -> pb.Empty:
        task = self._task(request.id, request.exec_id)
        if task.status == Status.STOPPED:
            raise NotFound(f"task {task.id!r}: process already finished")
        if request.signal <= 0:
            raise InvalidArgument(f"task {task.id!r}: signal must be positive, got {request.signal}")
        args = ["kill", *(["--all"] if request.all else []), task.id, str(request.signal)]
        try:
            await self._check(task, "kill", self._runc(*args))
        except Internal:
            if task.status == Status.STOPPED:  # it exited while runc looked for it
                raise NotFound(f"task {task.id!r}: process already finished") from None
            raise
        log.info("shim.kill", id=task.id, signal=request.signal)
        return pb.Empty()

    async def wait(self, request: WaitRequest) -> WaitResponse:
        task = self._task(request.id, request.exec_id)
        await task.exited.wait()
        assert task.exited_at is not None
        return WaitResponse(exit_status=task.exit_status, exited_at=task.exited_at)

    async def delete(self, request: DeleteRequest) -> DeleteResponse:
        task = self._task(request.id, request.exec_id)
        if task.status == Status.RUNNING:
            raise FailedPrecondition(f"task {task.id!r}: cannot delete a running task, kill it first")
        # runc deletes a created container by killing its init: its exit comes through the reaper.
        await self._check(task, "delete", self._runc("delete", "--force", task.id))
        await task.exited.wait()
        del self._tasks[task.id]
        assert task.exited_at is not None
        log.info("shim.delete", id=task.id, exit_status=task.exit_status)
        return DeleteResponse(pid=task.pid, exit_status=task.exit_status, exited_at=task.exited_at)

    async def pids(self, request: PidsRequest) -> PidsResponse:
        task = self._task(request.id, "")
        if task.status == Status.STOPPED:
            return PidsResponse()
        output = await self._check(task, "ps", self._runc("ps", "--format", "json", task.id))
        try:
            pids = json.loads(output) or []
        except ValueError as exc:
            raise Internal(f"task {task.id!r}: runc ps: unparseable output {output[:200]!r}") from exc
        return PidsResponse(processes=[ProcessInfo(pid=int(pid)) for pid in pids])

    async def connect(self, request: ConnectRequest) -> ConnectResponse:
        task = self._tasks.get(request.id)
        return ConnectResponse(shim_pid=os.getpid(), task_pid=task.pid if task else 0, version=VERSION)

    async def shutdown(self, request: ShutdownRequest) -> pb.Empty:
        """Exit the shim once it holds no task (or at once with ``now``), as upstream.

        The exit is scheduled after this call, so the caller still gets its reply.
        """
        if self._tasks and not request.now:
            log.info("shim.shutdown_refused", tasks=len(self._tasks))
            return pb.Empty()
        log.info("shim.shutdown", now=request.now)
        asyncio.get_running_loop().call_soon(self._on_shutdown)
        return pb.Empty()

    # -- internals ----------------------------------------------------------

    def _task(self, task_id: str, exec_id: str) -> Task:
        if not task_id:
            raise InvalidArgument("id must not be empty")
        task = self._tasks.get(task_id)
        if task is None:
            raise NotFound(f"task {task_id!r}: not found")
        if exec_id:
            raise NotFound(f"task {task_id!r}: exec {exec_id!r}: not found")
        return task

    def _runc(self, *args: str) -> list[str]:
        return [RUNC, "--root", self._runc_root, *args]

    async def _check(self, task: Task, what: str, argv: list[str]) -> str:
        status, output = await self._reaper.run(argv)
        text = output.decode(errors="replace")
        if status != 0:
            message = text.strip().splitlines()[-1] if text.strip() else f"exit status {status}"
            raise Internal(f"task {task.id!r}: runc {what}: {message}")
        return text

    def _on_exit(self, ended: Exit) -> None:
        for task in self._tasks.values():
            if task.pid == ended.pid and not task.exited.is_set():
                self._reaper.take(ended.pid)
                self._exited(task, ended)

    def _exited(self, task: Task, ended: Exit) -> None:
        task.status = Status.STOPPED
        task.exit_status = ended.status
        task.exited_at = ended.at
        task.exited.set()
        log.info("shim.exit", id=task.id, pid=ended.pid, status=ended.status)


def _open_output(target: str) -> int:
    """An fd for a task's stdout/stderr: a file path or file:// URI (appended to), or /dev/null."""
    if not target:
        return os.open(os.devnull, os.O_WRONLY)
    path = target.removeprefix("file://")
    if "://" in path:
        raise Unimplemented(f"io {target!r}: only file paths and file:// URIs are supported")
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)


def _runc_error(bundle: Path) -> str:
    """The last error runc logged to the bundle's log.json, for messages to the caller."""
    message = "unknown error"
    with contextlib.suppress(OSError):
        for line in (bundle / "log.json").read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                entry = json.loads(line)
                if isinstance(entry, dict) and entry.get("level") in ("error", "fatal"):
                    message = str(entry.get("msg", message))
    return message
