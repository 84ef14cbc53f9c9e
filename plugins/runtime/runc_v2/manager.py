"""The task manager: the Tasks API mapped onto shims (containerd 1.6's runtime v2 TaskManager).

One :class:`~.process.Task` per container that has one; tasks of a group (a
pod) share one shim, others get their own (:mod:`.shimpool`). The shim is
authoritative for a live task's state (Get asks it); the manager keeps what
must survive the shim: the last exit of every process (:mod:`.process`).
Exits are published once each, and replayed after a restart, by :mod:`.exits`;
a shim that dies has its processes reported exited (137) by :meth:`TaskManager.shim_gone`.
"""

from __future__ import annotations

import asyncio
import builtins
import json
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path

import betterproto.lib.google.protobuf as pb
import structlog

from daemon.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from daemon.events import Envelope, EventBus
from daemon.metadata import ContainerStore, NamespacedSnapshotter
from daemon.protocols import (
    NO_IO,
    RUNC_V2_RUNTIME,
    ExitStatus,
    Mount,
    Opaque,
    PidInfo,
    ProcessState,
    TaskIO,
    TaskStatus,
)
from daemon.ttrpc.services import LOGS_SERVICE
from plugins.runtime.runc_v2.bundle import Bundle, LogReader
from plugins.runtime.runc_v2.exits import ExitPublisher
from plugins.runtime.runc_v2.options import RuncOptions
from plugins.runtime.runc_v2.process import KILLED_STATUS, Process, Task, task_status, when
from plugins.runtime.runc_v2.settings import Settings
from plugins.runtime.runc_v2.shim.crilog import is_crilog
from plugins.runtime.runc_v2.shimpool import GROUP_ANNOTATIONS, ShimPool
from plugins.runtime.runc_v2.shims import NAMESPACE_KEY, Shim, remove_stale_socket
from protos.berth.shim.v1 import ReopenLogRequest
from protos.containerd.events import TaskExit
from protos.containerd.task.v2 import (
    CloseIoRequest,
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
from protos.containerd.types import Mount as PbMount

log = structlog.get_logger("berth.runtime")


RUNTIME_PREFIX = "io.containerd.runc."
STATE_TIMEOUT = 10.0
REOPEN_TIMEOUT = 10.0


def writes_crilog(shim_binary: str) -> bool:
    """Whether the shim ``shim_binary`` understands crilog:// stdio (berth's does, containerd's does not)."""
    return Path(shim_binary).name.startswith("berth-shim")


class TaskManager:
    """Implements :class:`daemon.protocols.TaskManager` over runc v2 shims."""

    def __init__(
        self,
        settings: Settings,
        containers: ContainerStore,
        snapshotter: Callable[[str], NamespacedSnapshotter],
        bus: EventBus,
    ) -> None:
        self.settings = settings
        self._containers = containers
        self._snapshotter = snapshotter
        self._tasks: dict[tuple[str, str], Task] = {}
        self._creating: set[tuple[str, str]] = set()
        self._shims = ShimPool(settings, self.shim_gone)
        self._exits = ExitPublisher(bus, settings.recovery_event_grace, self._record_exit)
        self._options = RuncOptions(settings)

    # -- events (see .exits) -------------------------------------------------

    def open_replay_window(self) -> None:
        """Exits are retained on the bus for replay from now on (see ExitPublisher.open_replay_window)."""
        self._exits.open_replay_window()

    def on_envelope(self, env: Envelope) -> None:
        """An event from a shim: record exits, dedupe them, put it on the bus (see ExitPublisher)."""
        self._exits.on_envelope(env)

    def publish_exit(self, namespace: str, container_id: str, exec_id: str, exit_: ExitStatus) -> None:
        """Publish (through deduplication) an exit the manager found itself."""
        self._exits.publish_exit(namespace, container_id, exec_id, exit_)

    def _record_exit(self, namespace: str, event: TaskExit) -> None:
        task = self._tasks.get((namespace, event.container_id))
        if task is None:
            return
        exec_id = "" if event.id in ("", event.container_id) else event.id
        proc = task.init if not exec_id else task.execs.get(exec_id)
        if proc is not None:
            proc.record_exit(ExitStatus(event.pid, event.exit_status, when(event.exited_at)))

    # -- shims (see .shimpool) -------------------------------------------------

    def register_shim(self, shim: Shim) -> None:
        """Make ``shim`` its group's (a shim reconnected by recovery)."""
        self._shims.register(shim)

    async def release_shim(self, shim: Shim) -> None:
        """Shut ``shim`` down once it serves no task (it exits itself); the connection is closed."""
        await self._shims.release(shim)

    def prepare_shim(self, namespace: str, group: str) -> None:
        """Start ``group``'s shim in the background (see daemon.protocols.TaskManager.prepare_shim)."""
        self._shims.prepare(namespace, group)

    async def release_idle_shim(self, namespace: str, group: str) -> None:
        """Shut ``group``'s shim down if it serves no task (a prepare still running is waited for)."""
        await self._shims.release_idle(namespace, group)

    async def recover_prepared(self) -> int:
        """After a restart: group directories whose shim serves no adopted task are cleaned; how many."""
        return await self._shims.recover_prepared()

    async def bootstrap_delete(self, binary: str, bundle: Bundle) -> DeleteResponse | None:
        """``<binary> delete`` in ``bundle``: runc container and rootfs mount gone; None if it failed."""
        return await self._shims.bootstrap_delete(binary, bundle)

    async def shim_gone(self, shim: Shim) -> None:
        """A shim died: its processes are reported exited (137), its containers cleaned by ``delete``."""
        await self._shims.forget_gone(shim)
        now = datetime.now(UTC)
        for container_id in sorted(shim.tasks):
            task = self._tasks.get((shim.namespace, container_id))
            if task is None or task.shim is not shim:
                continue
            # Clean up first (Delete waits on the lock), then report: whoever sees the exit may delete.
            async with task.lock:
                await self.bootstrap_delete(shim.binary, task.bundle)
            for proc in [task.init, *task.execs.values()]:
                if proc.exit is None:
                    self.publish_exit(
                        shim.namespace, container_id, proc.exec_id, ExitStatus(proc.pid, KILLED_STATUS, now)
                    )
        await shim.close()
        await asyncio.to_thread(remove_stale_socket, shim.address)

    # -- create -------------------------------------------------------------

    async def create(
        self,
        namespace: str,
        container_id: str,
        *,
        io: TaskIO = NO_IO,
        rootfs: Sequence[Mount] = (),
        options: Opaque | None = None,
    ) -> ProcessState:
        key = (namespace, container_id)
        if key in self._tasks or key in self._creating:
            raise AlreadyExists(f"task {container_id!r} (namespace {namespace!r}): already exists")
        self._check_crilog(f"task {container_id!r}", io, self.settings.shim_binary)
        self._creating.add(key)
        try:
            task = await self._create(namespace, container_id, io, rootfs, options)
        finally:
            self._creating.discard(key)
        self._tasks[key] = task
        return task.init.snapshot(TaskStatus.CREATED)

    def _check_crilog(self, what: str, io: TaskIO, shim_binary: str) -> None:
        """Refuse crilog:// stdio up front when the shim would not understand it (containerd's)."""
        if not any(is_crilog(uri) for uri in (io.stdin, io.stdout, io.stderr)):
            return
        if not writes_crilog(shim_binary):
            raise FailedPrecondition(
                f"{what}: crilog:// stdio is written by berth's shim only, and runtime_binary "
                f"{self.settings.runtime_binary or shim_binary!r} is not berth's shim"
            )

    async def _create(
        self, namespace: str, container_id: str, io: TaskIO, rootfs: Sequence[Mount], options: Opaque | None
    ) -> Task:
        container = await self._containers.get(namespace, container_id)
        if not container.runtime.name.startswith(RUNTIME_PREFIX):
            raise FailedPrecondition(
                f"container {container_id!r}: runtime {container.runtime.name!r} is not supported "
                f"(this runtime runs {RUNC_V2_RUNTIME})"
            )
        if container.spec is None:
            raise FailedPrecondition(f"container {container_id!r}: has no spec")
        try:
            spec = json.loads(container.spec.value)
        except ValueError as exc:
            raise InvalidArgument(f"container {container_id!r}: spec is not JSON: {exc}") from exc
        if not isinstance(spec, dict):
            raise InvalidArgument(f"container {container_id!r}: spec is not a JSON object")
        mounts = list(rootfs)
        if not mounts and container.snapshot_key:
            try:
                sn = self._snapshotter(container.snapshotter)
                mounts = await sn.mounts(namespace, container.snapshot_key)
            except NotFound as exc:
                raise NotFound(
                    f"container {container_id!r}: snapshot {container.snapshot_key!r} "
                    f"(snapshotter {container.snapshotter!r}): {exc}"
                ) from None
        spec_bytes = bytes(container.spec.value)
        root = spec.get("root")
        if mounts and not (isinstance(root, dict) and root.get("path") == "rootfs"):
            spec["root"] = {**(root if isinstance(root, dict) else {}), "path": "rootfs"}
            spec_bytes = json.dumps(spec).encode()  # (re-encoded only when it changes: ~1 ms for a big spec)
        annotations = spec.get("annotations") or {}
        group = next((str(annotations[a]) for a in GROUP_ANNOTATIONS if annotations.get(a)), container_id)
        runc_options = self._options.resolve(container.runtime.options, options)
        bundle = Bundle(self.settings.state, namespace, container_id)
        try:
            await asyncio.to_thread(bundle.create, spec_bytes)  # AlreadyExists before writing anything
        except AlreadyExists:
            raise AlreadyExists(
                f"task {container_id!r} (namespace {namespace!r}): bundle {bundle.path} exists"
            ) from None
        reader = LogReader(bundle.log_fifo, namespace=namespace, shim=container_id)
        reader.open()
        shim: Shim | None = None
        try:
            shim = await self._shims.shim_for(namespace, group, container_id, bundle, runc_options)
            created = await shim.call(
                "Create",
                CreateTaskRequest(
                    id=container_id,
                    bundle=str(bundle.path),
                    rootfs=[
                        PbMount(type=m.type, source=m.source, target=m.target, options=list(m.options))
                        for m in mounts
                    ],
                    terminal=io.terminal,
                    stdin=io.stdin,
                    stdout=io.stdout,
                    stderr=io.stderr,
                    options=runc_options,
                ),
                CreateTaskResponse,
            )
        except BaseException:
            if shim is not None:
                shim.tasks.discard(container_id)
                if shim.gone.is_set():  # it died during Create: runc's container may be left
                    await self.bootstrap_delete(shim.binary, bundle)
                if not shim.tasks:
                    await self.release_shim(shim)
            reader.close()
            await bundle.remove()
            raise
        log.info("task.created", namespace=namespace, id=container_id, pid=created.pid, shim=shim.pid)
        return Task(
            namespace, container_id, bundle, shim, Process(container_id, "", io, created.pid), log=reader
        )

    # -- lookups ------------------------------------------------------------

    def _task(self, namespace: str, container_id: str) -> Task:
        if not container_id:
            raise InvalidArgument("container_id: must not be empty")
        task = self._tasks.get((namespace, container_id))
        if task is None:
            raise NotFound(f"task {container_id!r} (namespace {namespace!r}): not found")
        return task

    def adopt(self, task: Task) -> None:
        """Take over a task found by recovery."""
        self._tasks[(task.namespace, task.id)] = task

    def tasks(self) -> list[Task]:
        return list(self._tasks.values())

    # -- lifecycle calls ----------------------------------------------------

    async def start(self, namespace: str, container_id: str, exec_id: str = "") -> int:
        task = self._task(namespace, container_id)
        proc = task.process(exec_id)

        started = await task.shim.call("Start", StartRequest(id=container_id, exec_id=exec_id), StartResponse)
        proc.pid = started.pid
        log.info("task.started", namespace=namespace, id=container_id, exec_id=exec_id, pid=started.pid)
        return int(started.pid)

    async def delete(self, namespace: str, container_id: str) -> ExitStatus:
        task = self._task(namespace, container_id)
        async with task.lock:
            if (namespace, container_id) not in self._tasks:
                raise NotFound(f"task {container_id!r} (namespace {namespace!r}): not found")
            shim = task.shim
            if not shim.gone.is_set():
                try:
                    done = await shim.call("Delete", DeleteRequest(id=container_id), DeleteResponse)
                except Unavailable:
                    if not shim.gone.is_set():
                        raise
                    await self.bootstrap_delete(shim.binary, task.bundle)
                else:
                    task.init.record_exit(ExitStatus(done.pid, done.exit_status, when(done.exited_at)))
            exit_ = task.init.exit or ExitStatus(task.init.pid, KILLED_STATUS, datetime.now(UTC))
            del self._tasks[(namespace, container_id)]
            shim.tasks.discard(container_id)
            if not shim.tasks:
                await self.release_shim(shim)
            if task.log is not None:
                task.log.close()
            await task.bundle.remove()
        log.info("task.deleted", namespace=namespace, id=container_id, exit_status=exit_.exit_status)
        return exit_

    async def delete_process(self, namespace: str, container_id: str, exec_id: str) -> ExitStatus:
        if not exec_id:
            raise InvalidArgument("exec_id: must not be empty (delete the task itself with Delete)")
        task = self._task(namespace, container_id)
        proc = task.process(exec_id)
        done = await task.shim.call("Delete", DeleteRequest(id=container_id, exec_id=exec_id), DeleteResponse)
        proc.record_exit(ExitStatus(done.pid, done.exit_status, when(done.exited_at)))
        task.execs.pop(exec_id, None)
        assert proc.exit is not None
        return proc.exit

    async def get(self, namespace: str, container_id: str, exec_id: str = "") -> ProcessState:
        task = self._task(namespace, container_id)
        proc = task.process(exec_id)
        if task.shim.gone.is_set():
            return proc.snapshot(TaskStatus.UNKNOWN)
        try:
            st = await task.shim.call(
                "State", StateRequest(id=container_id, exec_id=exec_id), StateResponse, timeout=STATE_TIMEOUT
            )
        except Unavailable:
            return proc.snapshot(TaskStatus.UNKNOWN)
        status = task_status(st.status)
        if st.pid:
            proc.pid = st.pid
        if status == TaskStatus.STOPPED:
            proc.record_exit(ExitStatus(st.pid, st.exit_status, when(st.exited_at)))
        return ProcessState(
            container_id=container_id,
            exec_id=exec_id,
            pid=st.pid,
            status=status,
            io=TaskIO(stdin=st.stdin, stdout=st.stdout, stderr=st.stderr, terminal=st.terminal),
            exit_status=st.exit_status,
            exited_at=when(st.exited_at) if status == TaskStatus.STOPPED else None,
        )

    async def list(self, namespace: str) -> list[ProcessState]:
        ids = sorted(cid for ns, cid in self._tasks if ns == namespace)
        found = await asyncio.gather(*(self.get(namespace, cid) for cid in ids), return_exceptions=True)
        out: list[ProcessState] = []
        for state in found:
            if isinstance(state, NotFound):
                continue  # deleted meanwhile
            if isinstance(state, BaseException):
                raise state
            out.append(state)
        return out

    async def kill(
        self,
        namespace: str,
        container_id: str,
        exec_id: str = "",
        *,
        signal: int,
        all: bool = False,  # noqa: A002 - the wire's name
    ) -> None:
        task = self._task(namespace, container_id)
        proc = task.process(exec_id)
        if signal <= 0:
            raise InvalidArgument(f"signal: must be positive, got {signal}")
        if task.shim.gone.is_set():
            raise NotFound(f"task {container_id!r}: process already finished (its shim is gone)")
        if proc.exit is not None and not all:
            raise NotFound(f"task {container_id!r}: process already finished")
        await task.shim.call(
            "Kill", KillRequest(id=container_id, exec_id=exec_id, signal=signal, all=all), pb.Empty
        )

    async def exec(
        self, namespace: str, container_id: str, exec_id: str, *, spec: Opaque, io: TaskIO = NO_IO
    ) -> None:
        if not exec_id:
            raise InvalidArgument("exec_id: must not be empty")
        task = self._task(namespace, container_id)
        if exec_id in task.execs:
            raise AlreadyExists(f"task {container_id!r}: exec {exec_id!r}: already exists")
        if task.init.exit is not None or task.shim.gone.is_set():
            raise FailedPrecondition(f"task {container_id!r}: is stopped, cannot exec {exec_id!r} in it")
        self._check_crilog(f"task {container_id!r}: exec {exec_id!r}", io, task.shim.binary)
        proc = Process(container_id, exec_id, io)
        task.execs[exec_id] = proc
        try:
            await task.shim.call(
                "Exec",
                ExecProcessRequest(
                    id=container_id,
                    exec_id=exec_id,
                    terminal=io.terminal,
                    stdin=io.stdin,
                    stdout=io.stdout,
                    stderr=io.stderr,
                    spec=spec.to_any(),
                ),
                pb.Empty,
            )
        except BaseException:
            task.execs.pop(exec_id, None)
            raise

    async def resize_pty(
        self, namespace: str, container_id: str, exec_id: str, width: int, height: int
    ) -> None:
        task = self._task(namespace, container_id)
        task.process(exec_id)
        await task.shim.call(
            "ResizePty",
            ResizePtyRequest(id=container_id, exec_id=exec_id, width=width, height=height),
            pb.Empty,
        )

    async def close_io(self, namespace: str, container_id: str, exec_id: str, *, stdin: bool) -> None:
        task = self._task(namespace, container_id)
        task.process(exec_id)
        await task.shim.call(
            "CloseIO", CloseIoRequest(id=container_id, exec_id=exec_id, stdin=stdin), pb.Empty
        )

    async def pause(self, namespace: str, container_id: str) -> None:
        task = self._task(namespace, container_id)
        await task.shim.call("Pause", PauseRequest(id=container_id), pb.Empty)

    async def resume(self, namespace: str, container_id: str) -> None:
        task = self._task(namespace, container_id)
        await task.shim.call("Resume", ResumeRequest(id=container_id), pb.Empty)

    async def pids(self, namespace: str, container_id: str) -> builtins.list[PidInfo]:
        task = self._task(namespace, container_id)
        found = await task.shim.call("Pids", PidsRequest(id=container_id), PidsResponse)
        return [PidInfo(p.pid, Opaque.of(p.info)) for p in found.processes]

    async def update(
        self,
        namespace: str,
        container_id: str,
        *,
        resources: Opaque | None = None,
        annotations: Mapping[str, str] | None = None,
    ) -> None:
        task = self._task(namespace, container_id)
        request = UpdateTaskRequest(id=container_id, annotations=dict(annotations or {}))
        if resources is not None:
            request.resources = resources.to_any()
        await task.shim.call("Update", request, pb.Empty)

    async def stats(self, namespace: str, container_id: str) -> Opaque | None:
        task = self._task(namespace, container_id)
        found = await task.shim.call("Stats", StatsRequest(id=container_id), StatsResponse)
        if found.stats is None or not found.stats.type_url:
            return None
        return Opaque.of(found.stats)

    async def wait(self, namespace: str, container_id: str, exec_id: str = "") -> ExitStatus:
        task = self._task(namespace, container_id)
        proc = task.process(exec_id)
        if proc.exit is not None:
            return proc.exit
        if task.shim.gone.is_set():
            await proc.exited.wait()
            assert proc.exit is not None
            return proc.exit
        remote = asyncio.create_task(
            task.shim.call("Wait", WaitRequest(id=container_id, exec_id=exec_id), WaitResponse)
        )
        local = asyncio.create_task(proc.exited.wait())
        try:
            await asyncio.wait({remote, local}, return_when=asyncio.FIRST_COMPLETED)
            if not local.done():
                error = remote.exception()
                if error is None:
                    got = remote.result()
                    proc.record_exit(ExitStatus(proc.pid, got.exit_status, when(got.exited_at)))
                elif isinstance(error, Unavailable):
                    await local  # the shim is gone: the supervisor reports the exit
                else:
                    raise error
        finally:
            for pending in (remote, local):
                pending.cancel()
            await asyncio.gather(remote, local, return_exceptions=True)
        assert proc.exit is not None
        return proc.exit

    async def reopen_log(self, namespace: str, container_id: str) -> None:
        """Have the shim reopen the task's crilog:// files (see daemon.protocols.TaskManager)."""
        task = self._task(namespace, container_id)
        if not writes_crilog(task.shim.binary):
            raise FailedPrecondition(
                f"task {container_id!r}: its shim {task.shim.binary!r} writes no CRI log to reopen"
            )
        if task.shim.gone.is_set():
            raise FailedPrecondition(f"task {container_id!r}: its shim is gone, no log is written")
        await task.shim.client.call(
            LOGS_SERVICE,
            "Reopen",
            ReopenLogRequest(id=container_id),
            pb.Empty,
            timeout=REOPEN_TIMEOUT,
            metadata={NAMESPACE_KEY: namespace},
        )
        log.info("task.log_reopened", namespace=namespace, id=container_id)

    # -- shutdown -----------------------------------------------------------

    async def close(self) -> None:
        """Drop connections (shims and their tasks keep running), stop the zygote."""
        await self._shims.close(t.shim for t in self._tasks.values())
        for task in self._tasks.values():
            if task.log is not None:
                task.log.close()
