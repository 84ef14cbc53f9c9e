"""The containerd.task.v2.Task service of the shim, driving runc (containerd 1.6's runc shim, in Python).

One shim serves the tasks created through it (a pod's containers). Each task
is one runc container whose init, and every exec process, becomes a child of
the shim (a subreaper) once runc returns. Exit statuses come from
:class:`~.reaper.Reaper`; the service never waits on processes itself.

The pieces: :mod:`.runc` (the command line, runc's errors), :mod:`.stdio`
(FIFOs, files, stdin copy, CloseIO), :mod:`.console` (pty through runc's
console socket), :mod:`.cgroups` (Stats, cleanup, OOM), :mod:`.rootfs`
(CreateTaskRequest.rootfs), :mod:`.process` (state).

Events go out through ``publish(topic, event)`` (it queues, never blocks) in
containerd's order: /tasks/create, /tasks/start, /tasks/exec-added,
/tasks/exec-started, /tasks/paused, /tasks/resumed, /tasks/oom, /tasks/exit
(an init's exit only after the exits of its execs, which are killed when it
dies), /tasks/delete.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import betterproto
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
from daemon.typeurl import pack_any
from plugins.runtime.runc_v2.shim import cgroups
from plugins.runtime.runc_v2.shim.console import ConsoleSocket, receive_console, resize
from plugins.runtime.runc_v2.shim.process import Container, Process
from plugins.runtime.runc_v2.shim.reaper import Exit, Reaper
from plugins.runtime.runc_v2.shim.rootfs import mount_rootfs, unmount_rootfs
from plugins.runtime.runc_v2.shim.runc import DEFAULT_BINARY, Runc, RuncError
from plugins.runtime.runc_v2.shim.stdio import ProcessIO
from protos.berth.shim.v1 import ReopenLogRequest
from protos.containerd.events import (
    TaskCreate,
    TaskDelete,
    TaskExecAdded,
    TaskExecStarted,
    TaskExit,
    TaskIo,
    TaskOom,
    TaskPaused,
    TaskResumed,
    TaskStart,
)
from protos.containerd.runc.v1 import Options, ProcessDetails
from protos.containerd.task.v2 import (
    CloseIoRequest,
    ConnectRequest,
    ConnectResponse,
    CreateTaskRequest,
    CreateTaskResponse,
    DeleteRequest,
    DeleteResponse,
    ExecProcessRequest,
    KillRequest,
    PauseRequest,
    PidsRequest,
    PidsResponse,
    ResizePtyRequest,
    ResumeRequest,
    ShutdownRequest,
    StartRequest,
    StartResponse,
    StateRequest,
    StateResponse,
    StatsRequest,
    StatsResponse,
    UpdateTaskRequest,
    WaitRequest,
    WaitResponse,
)
from protos.containerd.v1.types import ProcessInfo, Status

log = structlog.get_logger(__name__)

VERSION = "berth-shim-runc-v2 0.2"

#: The runc binary when the request names none (main.py's ``delete`` uses it too).
RUNC = DEFAULT_BINARY

OPTIONS_TYPE = "containerd.runc.v1.Options"
#: containerd's rule for exec ids (identifiers.Validate); they also name files in the bundle.
EXEC_ID = re.compile(r"^[A-Za-z0-9]+(?:[._-](?:[A-Za-z0-9]+))*$")
EXEC_ID_MAX = 76

Publish = Callable[[str, betterproto.Message], None]


def _no_publish(topic: str, event: betterproto.Message) -> None:
    log.debug("shim.event_dropped", topic=topic)


class TaskService:
    """Handlers of containerd.task.v2.Task (bound with daemon.ttrpc.services.bind).

    ``runc_root`` is runc's ``--root`` when the request's options name none
    (else ``<options.root>/<namespace>``, as containerd's shim does);
    ``on_shutdown`` is called once Shutdown decides the shim should exit;
    ``publish(topic, event)`` enqueues a task event for berthd and never blocks.
    ``namespace`` defaults to $NAMESPACE, else the last part of ``runc_root``
    (berth's layout is ``<state>/runc/<namespace>``).
    """

    def __init__(
        self,
        reaper: Reaper,
        runc_root: str,
        on_shutdown: Callable[[], None],
        publish: Publish | None = None,
        *,
        namespace: str = "",
    ) -> None:
        self._reaper = reaper
        self._runc_root = runc_root
        self._on_shutdown = on_shutdown
        self._publish = publish or _no_publish
        self._namespace = namespace or os.environ.get("NAMESPACE", "") or Path(runc_root).name
        self._containers: dict[str, Container] = {}
        self._creating: set[str] = set()
        self._background: set[asyncio.Task[None]] = set()
        reaper.subscribe(self._on_exit)

    # -- Task service: the init -----------------------------------------------

    async def create(self, request: CreateTaskRequest) -> CreateTaskResponse:
        cid = request.id
        if not cid:
            raise InvalidArgument("create: id must not be empty")
        if cid in self._containers or cid in self._creating:
            raise AlreadyExists(f"task {cid!r}: already exists")
        if not request.bundle:
            raise InvalidArgument(f"task {cid!r}: bundle must not be empty")
        if request.checkpoint:
            raise Unimplemented(f"task {cid!r}: restore from checkpoint is not supported")
        bundle = Path(request.bundle)
        options = _options(request.options, cid)
        runc = Runc(
            self._reaper,
            root=os.path.join(options.root, self._namespace) if options.root else self._runc_root,
            bundle=str(bundle),
            binary=options.binary_name,
            systemd_cgroup=options.systemd_cgroup,
        )
        self._creating.add(cid)
        try:
            return await self._create(request, bundle, options, runc)
        finally:
            self._creating.discard(cid)

    async def _create(
        self, request: CreateTaskRequest, bundle: Path, options: Options, runc: Runc
    ) -> CreateTaskResponse:
        cid = request.id
        rootfs = bundle / "rootfs"
        io, config = await self._prepare(request, bundle, options)
        try:
            pid_file = bundle / "init.pid"
            await self._spawn(
                io,
                lambda console: runc.create(
                    cid, pid_file=str(pid_file), stdio=io.for_runc(), console_socket=console
                ),
                f"task {cid!r}",
            )
            pid, cgroup = await asyncio.to_thread(_created, pid_file)
        except BaseException:
            await io.close()
            if request.rootfs:
                with contextlib.suppress(Exception):
                    await unmount_rootfs(rootfs)
            raise
        init = Process(cid, "", io, pid=pid)
        container = Container(
            cid,
            bundle,
            runc,
            init,
            rootfs_mounted=bool(request.rootfs),
            host_pid_namespace=not _has_pid_namespace(config),
        )
        self._containers[cid] = container
        if isinstance(cgroup, OSError):  # the init is gone already: its exit is on its way
            log.warning("shim.cgroup_unknown", id=cid, pid=pid, error=str(cgroup))
        else:
            container.cgroup = cgroup
        self._watch_oom(container)
        self._publish(
            "/tasks/create",
            TaskCreate(
                container_id=cid,
                bundle=str(bundle),
                rootfs=list(request.rootfs),
                io=TaskIo(
                    stdin=request.stdin,
                    stdout=request.stdout,
                    stderr=request.stderr,
                    terminal=request.terminal,
                ),
                checkpoint=request.checkpoint,
                pid=pid,
            ),
        )
        early = self._reaper.take(pid)
        if early is not None:
            self._process_exited(container, init, early)
        log.info("shim.create", id=cid, pid=pid, terminal=request.terminal, rootfs=len(request.rootfs))
        return CreateTaskResponse(pid=pid)

    async def _prepare(
        self, request: CreateTaskRequest, bundle: Path, options: Options
    ) -> tuple[ProcessIO, dict[str, Any]]:
        """What runc create needs, independent steps side by side; all or nothing. The stdio and
        the bundle's config.json (read first: a bad one stops the rest of its step).

        ``options.json`` and the rootfs mount (in that order: ``delete`` needs
        the options to find runc) run beside opening the stdio (FIFOs, files,
        CRI log). If one fails, or the call is cancelled, both are let finish
        and whatever was made is undone.
        """
        rootfs = bundle / "rootfs"
        config: dict[str, Any] = {}

        async def mount() -> None:
            nonlocal config
            config = await asyncio.to_thread(
                _config_and_options, bundle, request.id, options, rootfs if request.rootfs else None
            )
            if request.rootfs:
                await mount_rootfs(self._reaper, request.rootfs, rootfs)

        mounting = asyncio.ensure_future(mount())
        opening = asyncio.ensure_future(
            asyncio.to_thread(ProcessIO.open, request.stdin, request.stdout, request.stderr, request.terminal)
        )
        cancelled = False
        try:
            await asyncio.wait([mounting, opening])
        except asyncio.CancelledError:
            cancelled = True  # mount(2) and open(2) cannot be taken back half-way: finish, then undo
            await asyncio.wait([mounting, opening])
        failed = mounting.exception() or opening.exception()
        if not cancelled and failed is None:
            return opening.result(), config
        if opening.exception() is None:
            await opening.result().close()
        if request.rootfs and mounting.exception() is None:
            with contextlib.suppress(Exception):
                await unmount_rootfs(rootfs)
        if cancelled:
            raise asyncio.CancelledError
        assert failed is not None
        raise failed

    async def start(self, request: StartRequest) -> StartResponse:
        container, process = self._process(request.id, request.exec_id)
        if process.exec_id:
            return await self._start_exec(container, process)
        if process.status != Status.CREATED:
            raise FailedPrecondition(
                f"task {container.id!r}: cannot start a task in state {process.status.name}"
            )
        await self._runc_call(container, container.runc.start(container.id))
        if process.status == Status.CREATED:
            process.status = Status.RUNNING
        self._publish("/tasks/start", TaskStart(container_id=container.id, pid=process.pid))
        log.info("shim.start", id=container.id, pid=process.pid)
        return StartResponse(pid=process.pid)

    async def state(self, request: StateRequest) -> StateResponse:
        container, process = self._process(request.id, request.exec_id)
        response = StateResponse(
            id=process.id,
            exec_id=process.exec_id,
            bundle=str(container.bundle),
            pid=process.pid,
            status=process.status,
            stdin=process.io.stdin_path,
            stdout=process.io.stdout_path,
            stderr=process.io.stderr_path,
            terminal=process.io.terminal,
            exit_status=process.exit_status,
        )
        if process.exited_at is not None:
            response.exited_at = process.exited_at
        return response

    async def kill(self, request: KillRequest) -> pb.Empty:
        container, process = self._process(request.id, request.exec_id)
        what = _name(container, process)
        if request.signal <= 0:
            raise InvalidArgument(f"{what}: signal must be positive, got {request.signal}")
        if process.status == Status.STOPPED:
            raise NotFound(f"{what}: process already finished")
        if process.exec_id:
            if process.pid <= 0:
                raise FailedPrecondition(f"{what}: process not started")
            try:
                os.kill(process.pid, request.signal)
            except ProcessLookupError:
                raise NotFound(f"{what}: process already finished") from None
        else:
            try:
                await container.runc.kill(container.id, request.signal, all=request.all)
            except RuncError as exc:
                if process.status == Status.STOPPED or "not running" in str(exc):
                    raise NotFound(f"{what}: process already finished") from None
                raise Internal(f"{what}: {exc}") from None
        log.info("shim.kill", id=container.id, exec_id=process.exec_id, signal=request.signal)
        return pb.Empty()

    async def wait(self, request: WaitRequest) -> WaitResponse:
        _, process = self._process(request.id, request.exec_id)
        await process.exited.wait()
        assert process.exited_at is not None
        return WaitResponse(exit_status=process.exit_status, exited_at=process.exited_at)

    async def delete(self, request: DeleteRequest) -> DeleteResponse:
        container, process = self._process(request.id, request.exec_id)
        if process.exec_id:
            return await self._delete_exec(container, process)
        if process.status in (Status.RUNNING, Status.PAUSED):
            raise FailedPrecondition(
                f"task {container.id!r}: cannot delete a {process.status.name.lower()} task, kill it first"
            )
        try:
            # A created container is deleted by killing its init: its exit comes through the reaper.
            await container.runc.delete(container.id, force=True)
        except RuncError as exc:
            if "does not exist" not in str(exc):
                raise Internal(f"task {container.id!r}: {exc}") from None
        if process.pid > 0:
            await process.exited.wait()
        del self._containers[container.id]
        await self._release(container)
        assert process.exited_at is not None
        self._publish(
            "/tasks/delete",
            TaskDelete(
                container_id=container.id,
                pid=process.pid,
                exit_status=process.exit_status,
                exited_at=process.exited_at,
            ),
        )
        log.info("shim.delete", id=container.id, exit_status=process.exit_status)
        return DeleteResponse(pid=process.pid, exit_status=process.exit_status, exited_at=process.exited_at)

    async def pids(self, request: PidsRequest) -> PidsResponse:
        container, init = self._process(request.id, "")
        if init.status == Status.STOPPED:
            return PidsResponse()
        pids = await self._runc_call(container, container.runc.ps(container.id))
        execs = {p.pid: p.exec_id for p in container.execs.values() if p.pid > 0}
        processes = []
        for pid in pids:
            info = ProcessInfo(pid=pid)
            if pid in execs:
                info.info = pack_any(ProcessDetails(exec_id=execs[pid]))
            processes.append(info)
        return PidsResponse(processes=processes)

    async def pause(self, request: PauseRequest) -> pb.Empty:
        container, init = self._process(request.id, "")
        if init.status != Status.RUNNING:
            raise FailedPrecondition(
                f"task {container.id!r}: cannot pause a task in state {init.status.name}"
            )
        init.status = Status.PAUSING
        try:
            await self._runc_call(container, container.runc.pause(container.id))
        except BaseException:
            if init.status == Status.PAUSING:
                init.status = Status.RUNNING
            raise
        if init.status == Status.PAUSING:
            init.status = Status.PAUSED
        self._publish("/tasks/paused", TaskPaused(container_id=container.id))
        log.info("shim.pause", id=container.id)
        return pb.Empty()

    async def resume(self, request: ResumeRequest) -> pb.Empty:
        container, init = self._process(request.id, "")
        if init.status != Status.PAUSED:
            raise FailedPrecondition(
                f"task {container.id!r}: cannot resume a task in state {init.status.name}"
            )
        await self._runc_call(container, container.runc.resume(container.id))
        if init.status == Status.PAUSED:
            init.status = Status.RUNNING
        self._publish("/tasks/resumed", TaskResumed(container_id=container.id))
        log.info("shim.resume", id=container.id)
        return pb.Empty()

    async def update(self, request: UpdateTaskRequest) -> pb.Empty:
        """``runc update --resources``: the Any's value is the OCI LinuxResources JSON."""
        container, init = self._process(request.id, "")
        if init.status == Status.STOPPED:
            raise FailedPrecondition(f"task {container.id!r}: cannot update a stopped task")
        if not request.resources.value:
            raise InvalidArgument(f"task {container.id!r}: resources must not be empty")
        try:
            resources = json.loads(request.resources.value)
        except ValueError as exc:
            raise InvalidArgument(
                f"task {container.id!r}: resources are not LinuxResources JSON: {exc}"
            ) from None
        if not isinstance(resources, dict):
            raise InvalidArgument(f"task {container.id!r}: resources must be a JSON object")
        path = await asyncio.to_thread(_write_temp, container.bundle, "resources-", request.resources.value)
        try:
            await self._runc_call(container, container.runc.update(container.id, path))
        finally:
            await asyncio.to_thread(_unlink, path)
        log.info("shim.update", id=container.id)
        return pb.Empty()

    async def stats(self, request: StatsRequest) -> StatsResponse:
        container, _ = self._process(request.id, "")
        cgroup = container.cgroup
        if cgroup is None:
            raise FailedPrecondition(f"task {container.id!r}: its cgroup is unknown (the init exited early)")
        if cgroup.unified:
            if cgroup.v2 is None:
                raise FailedPrecondition(f"task {container.id!r}: no cgroup v2 directory")
            v2_dir = cgroup.v2
            metrics: betterproto.Message = await asyncio.to_thread(cgroups.stats_v2, v2_dir)
        else:
            metrics = await asyncio.to_thread(cgroups.stats_v1, dict(cgroup.v1))
        return StatsResponse(stats=pack_any(metrics))

    async def connect(self, request: ConnectRequest) -> ConnectResponse:
        container = self._containers.get(request.id)
        return ConnectResponse(
            shim_pid=os.getpid(), task_pid=container.init.pid if container else 0, version=VERSION
        )

    async def shutdown(self, request: ShutdownRequest) -> pb.Empty:
        """Exit the shim once it holds no task (or at once with ``now``), as upstream.

        The exit is scheduled after this call, so the caller still gets its reply.
        """
        if (self._containers or self._creating) and not request.now:
            log.info("shim.shutdown_refused", tasks=len(self._containers))
            return pb.Empty()
        log.info("shim.shutdown", now=request.now)
        asyncio.get_running_loop().call_soon(self._on_shutdown)
        return pb.Empty()

    # -- Task service: execs and stdio ----------------------------------------

    async def exec(self, request: ExecProcessRequest) -> pb.Empty:
        container, init = self._process(request.id, "")
        exec_id = request.exec_id
        if not exec_id:
            raise InvalidArgument(f"task {container.id!r}: exec_id must not be empty")
        if len(exec_id) > EXEC_ID_MAX or not EXEC_ID.match(exec_id):
            raise InvalidArgument(
                f"task {container.id!r}: exec_id {exec_id!r} must be letters, digits and inner '._-', "
                f"at most {EXEC_ID_MAX} characters"
            )
        if exec_id in container.execs:
            raise AlreadyExists(f"task {container.id!r}: exec {exec_id!r} already exists")
        if init.status == Status.STOPPED or container.init_exit is not None:
            raise FailedPrecondition(f"task {container.id!r}: cannot exec in a stopped state")
        if not request.spec.value:
            raise InvalidArgument(f"task {container.id!r}: exec {exec_id!r}: spec must not be empty")
        try:
            spec = json.loads(request.spec.value)
        except ValueError as exc:
            raise InvalidArgument(
                f"task {container.id!r}: exec {exec_id!r}: spec is not an OCI Process JSON: {exc}"
            ) from None
        if not isinstance(spec, dict) or not spec.get("args"):
            raise InvalidArgument(f"task {container.id!r}: exec {exec_id!r}: spec.args must not be empty")
        io = await asyncio.to_thread(
            ProcessIO.open, request.stdin, request.stdout, request.stderr, request.terminal
        )
        if container.id not in self._containers:  # deleted while opening
            await io.close()
            raise NotFound(f"task {container.id!r}: not found (deleted while exec {exec_id!r} was set up)")
        if exec_id in container.execs:  # raced while opening
            await io.close()
            raise AlreadyExists(f"task {container.id!r}: exec {exec_id!r} already exists")
        process = Process(container.id, exec_id, io, spec=request.spec.value)
        container.execs[exec_id] = process
        self._publish("/tasks/exec-added", TaskExecAdded(container_id=container.id, exec_id=exec_id))
        log.info("shim.exec", id=container.id, exec_id=exec_id, terminal=request.terminal)
        return pb.Empty()

    async def _start_exec(self, container: Container, process: Process) -> StartResponse:
        what = _name(container, process)
        if process.status != Status.CREATED or process.pid > 0:
            raise FailedPrecondition(f"{what}: cannot start a process in state {process.status.name}")
        if container.init.status == Status.STOPPED or container.init_exit is not None:
            raise FailedPrecondition(f"{what}: cannot exec in a stopped state")
        process.status = Status.RUNNING  # claims the start (a second Start is refused)
        spec_file = await asyncio.to_thread(_write_temp, container.bundle, "runc-process-", process.spec)
        pid_file = container.bundle / f"{process.exec_id}.pid"
        try:
            await self._spawn(
                process.io,
                lambda console: container.runc.exec(
                    container.id,
                    process_file=spec_file,
                    pid_file=str(pid_file),
                    stdio=process.io.for_runc(),
                    console_socket=console,
                ),
                what,
            )
            pid = int((await asyncio.to_thread(pid_file.read_text)).strip())
        except BaseException:
            process.status = Status.CREATED
            raise
        finally:
            await asyncio.to_thread(_unlink, spec_file)
        process.pid = pid
        self._publish(
            "/tasks/exec-started",
            TaskExecStarted(container_id=container.id, exec_id=process.exec_id, pid=pid),
        )
        early = self._reaper.take(pid)
        if early is not None:
            self._process_exited(container, process, early)
        log.info("shim.exec_start", id=container.id, exec_id=process.exec_id, pid=pid)
        return StartResponse(pid=pid)

    async def _delete_exec(self, container: Container, process: Process) -> DeleteResponse:
        what = _name(container, process)
        if process.running:
            raise FailedPrecondition(f"{what}: cannot delete a running process, kill it first")
        container.execs.pop(process.exec_id, None)
        await process.io.close()
        await asyncio.to_thread(_unlink, str(container.bundle / f"{process.exec_id}.pid"))
        response = DeleteResponse(pid=process.pid, exit_status=process.exit_status)
        if process.exited_at is not None:
            response.exited_at = process.exited_at
        log.info("shim.exec_delete", id=container.id, exec_id=process.exec_id)
        return response

    async def resize_pty(self, request: ResizePtyRequest) -> pb.Empty:
        container, process = self._process(request.id, request.exec_id)
        if process.io.console is None:
            raise FailedPrecondition(f"{_name(container, process)}: has no terminal")
        resize(process.io.console, width=request.width, height=request.height)
        return pb.Empty()

    async def close_io(self, request: CloseIoRequest) -> pb.Empty:
        _, process = self._process(request.id, request.exec_id)
        if request.stdin:
            process.io.close_stdin()
        return pb.Empty()

    # -- CRI logs (berth.shim.v1.Logs, served by LogService) ---------------------

    async def reopen_log(self, task_id: str, exec_id: str = "") -> None:
        """Reopen the crilog:// files of a process (the init and its execs when ``exec_id`` is empty).

        FailedPrecondition when none of them writes one. A process whose output
        has ended is skipped (nothing more will be written).
        """
        container, process = self._process(task_id, exec_id)
        processes = [process] if exec_id else container.processes()
        logged = [p for p in processes if p.io.has_logs]
        if not logged:
            raise FailedPrecondition(f"{_name(container, process)}: its output is not a crilog:// file")
        for found in logged:
            await found.io.reopen_logs()

    # -- internals ------------------------------------------------------------

    def _process(self, task_id: str, exec_id: str) -> tuple[Container, Process]:
        if not task_id:
            raise InvalidArgument("id must not be empty")
        container = self._containers.get(task_id)
        if container is None:
            raise NotFound(f"task {task_id!r}: not found")
        if not exec_id:
            return container, container.init
        process = container.execs.get(exec_id)
        if process is None:
            raise NotFound(f"task {task_id!r}: exec {exec_id!r}: not found")
        return container, process

    async def _spawn(self, io: ProcessIO, command: Callable[[str], Any], what: str) -> None:
        """Run runc create/exec for ``io``: with a console socket for a terminal; runc errors -> Internal."""
        try:
            if io.terminal:
                console = ConsoleSocket()
                try:
                    master = await receive_console(console, command(console.path))
                finally:
                    console.close()
                io.attach_console(master)
            else:
                await command("")
        except RuncError as exc:
            raise Internal(f"{what}: {exc}") from None
        io.started()

    async def _runc_call(self, container: Container, call: Any) -> Any:
        try:
            return await call
        except RuncError as exc:
            raise Internal(f"task {container.id!r}: {exc}") from None

    def _on_exit(self, ended: Exit) -> None:
        for container in list(self._containers.values()):
            for process in container.processes():
                if process.pid == ended.pid and process.running:
                    self._reaper.take(ended.pid)
                    self._process_exited(container, process, ended)
                    return

    def _process_exited(self, container: Container, process: Process, ended: Exit) -> None:
        if process.exec_id:
            process.set_exited(ended)
            self._publish_exit(container, process)
            if container.init_exit is not None and not container.running_execs():
                self._init_exited(container, container.init_exit)
            return
        # The OOM watch stays until delete: its event may come after the exit it caused.
        running = container.running_execs()
        if running or container.host_pid_namespace:
            # containerd's order: the execs die (and their exits go out) before the init's exit.
            container.init_exit = ended
            self._background_task(self._kill_execs(container, running))
            if not running:
                self._init_exited(container, ended)
            return
        self._init_exited(container, ended)

    def _init_exited(self, container: Container, ended: Exit) -> None:
        container.init_exit = None
        container.init.set_exited(ended)
        self._publish_exit(container, container.init)

    def _publish_exit(self, container: Container, process: Process) -> None:
        assert process.exited_at is not None
        self._publish(
            "/tasks/exit",
            TaskExit(
                container_id=container.id,
                id=process.id,
                pid=process.pid,
                exit_status=process.exit_status,
                exited_at=process.exited_at,
            ),
        )
        log.info(
            "shim.exit", id=container.id, exec_id=process.exec_id, pid=process.pid, status=process.exit_status
        )

    async def _kill_execs(self, container: Container, running: list[Process]) -> None:
        for process in running:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGKILL)
        if container.host_pid_namespace:  # nothing else takes the rest of the container down
            with contextlib.suppress(RuncError):
                await container.runc.kill(container.id, signal.SIGKILL, all=True)

    def _watch_oom(self, container: Container) -> None:
        cgroup = container.cgroup
        if cgroup is None or cgroup.unified or "memory" not in cgroup.v1:
            return

        def oom() -> None:
            log.info("shim.oom", id=container.id)
            self._publish("/tasks/oom", TaskOom(container_id=container.id))

        try:
            container.oom = cgroups.OomWatch(cgroup.v1["memory"], oom)
        except OSError as exc:
            log.warning("shim.oom_watch_failed", id=container.id, error=str(exc))

    async def _release(self, container: Container) -> None:
        """Everything Create set up, after runc delete: stdio, rootfs, cgroups, OOM watch."""
        if container.oom is not None:
            container.oom.close()
            container.oom = None
        for process in container.processes():
            await process.io.close()
        if container.rootfs_mounted:
            try:
                await unmount_rootfs(container.bundle / "rootfs")
            except Exception as exc:  # noqa: BLE001 - reported; the task is gone either way
                log.error("shim.unmount_failed", id=container.id, error=str(exc))
        if container.cgroup is not None:
            await asyncio.to_thread(cgroups.remove, container.cgroup)
        await asyncio.to_thread(_unlink, str(container.bundle / "init.pid"))

    def _background_task(self, coroutine: Any) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)


class LogService:
    """Handlers of berth.shim.v1.Logs (bound with daemon.ttrpc.services.bind, table LOGS_METHODS)."""

    def __init__(self, tasks: TaskService) -> None:
        self._tasks = tasks

    async def reopen(self, request: ReopenLogRequest) -> pb.Empty:
        await self._tasks.reopen_log(request.id, request.exec_id)
        return pb.Empty()


def _name(container: Container, process: Process) -> str:
    return f"task {container.id!r}" + (f": exec {process.exec_id!r}" if process.exec_id else "")


def _read_config(bundle: Path, cid: str) -> dict[str, Any]:
    try:
        config = json.loads((bundle / "config.json").read_text())
    except FileNotFoundError:
        raise InvalidArgument(f"task {cid!r}: bundle {str(bundle)!r} has no config.json") from None
    except (OSError, ValueError) as exc:
        raise InvalidArgument(f"task {cid!r}: bundle {str(bundle)!r}: config.json: {exc}") from None
    if not isinstance(config, dict):
        raise InvalidArgument(f"task {cid!r}: bundle {str(bundle)!r}: config.json is not an object")
    return config


def _config_and_options(bundle: Path, cid: str, options: Options, rootfs: Path | None) -> dict[str, Any]:
    """The bundle's config.json, then options.json (and ``rootfs``) written: one worker-thread job."""
    config = _read_config(bundle, cid)
    _write_options(bundle, options, rootfs)
    return config


def _created(pid_file: Path) -> tuple[int, cgroups.Cgroup | OSError]:
    """The init's pid (from runc's pid file) and its cgroup (or why it is unknown: the init is gone)."""
    pid = int(pid_file.read_text().strip())
    try:
        return pid, cgroups.find(pid)
    except OSError as exc:
        return pid, exc


def _has_pid_namespace(config: dict[str, Any]) -> bool:
    namespaces = (config.get("linux") or {}).get("namespaces") or []
    return any(isinstance(ns, dict) and ns.get("type") == "pid" and not ns.get("path") for ns in namespaces)


def _options(value: pb.Any, cid: str) -> Options:
    if not value.type_url and not value.value:
        return Options()
    name = value.type_url.rsplit("/", 1)[-1]
    if name != OPTIONS_TYPE:
        raise InvalidArgument(f"task {cid!r}: options of type {value.type_url!r}, want {OPTIONS_TYPE}")
    return Options().parse(value.value)


def _write_options(bundle: Path, options: Options, rootfs: Path | None = None) -> None:
    """``<bundle>/options.json`` as containerd's shim writes it, so ``delete`` finds runc later.

    ``rootfs`` (the mount point to be) is made too, in the same trip to a thread.
    """
    data = options.to_dict(casing=betterproto.Casing.SNAKE)
    path = bundle / "options.json"
    path.write_text(json.dumps(data))
    if rootfs is not None:
        rootfs.mkdir(mode=0o711, exist_ok=True)


def _write_temp(directory: Path, prefix: str, data: bytes) -> str:
    fd, path = tempfile.mkstemp(prefix=prefix, suffix=".json", dir=directory)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return path


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
