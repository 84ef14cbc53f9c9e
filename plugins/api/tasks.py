"""``containerd.services.tasks.v1.Tasks``: the running side of containers, on the wire.

Every call is scoped to the request's namespace and mapped one to one onto
the runtime (:class:`daemon.protocols.TaskManager`, plugin type
``berth.runtime.v2``), which this service gets from the registry. Events
(``/tasks/create``, ``/tasks/start``, ``/tasks/exit`` ...) come from the
shims through the runtime, not from here, as in containerd.

List takes a filter over the processes' fields (``id``, ``container_id``,
``pid``, ``status``, e.g. ``status==RUNNING``); Metrics filters tasks by
``id``, ``namespace`` and ``runtime``. Checkpoint is not supported
(UNIMPLEMENTED).
"""

from __future__ import annotations

from datetime import UTC, datetime

import betterproto.lib.google.protobuf as pb

from daemon import filters
from daemon.errors import InvalidArgument, NotFound, Unimplemented
from daemon.hookspecs import hookimpl
from daemon.protocols import RUNC_V2_RUNTIME, Mount, Opaque, ProcessState, TaskIO, TaskManager, TaskStatus
from daemon.registry import InitContext, Registry
from daemon.server import request_namespace
from daemon.validate import required
from protos.containerd.services.tasks.v1 import (
    CheckpointTaskRequest,
    CheckpointTaskResponse,
    CloseIoRequest,
    CreateTaskRequest,
    CreateTaskResponse,
    DeleteProcessRequest,
    DeleteResponse,
    DeleteTaskRequest,
    ExecProcessRequest,
    GetRequest,
    GetResponse,
    KillRequest,
    ListPidsRequest,
    ListPidsResponse,
    ListTasksRequest,
    ListTasksResponse,
    MetricsRequest,
    MetricsResponse,
    PauseTaskRequest,
    ResizePtyRequest,
    ResumeTaskRequest,
    StartRequest,
    StartResponse,
    TasksBase,
    UpdateTaskRequest,
    WaitRequest,
    WaitResponse,
)
from protos.containerd.types import Metric
from protos.containerd.v1.types import Process, ProcessInfo, Status

RUNTIME_TYPE = "berth.runtime.v2"


def process_to_pb(p: ProcessState) -> Process:
    out = Process(
        container_id=p.container_id,
        id=p.exec_id or p.container_id,
        pid=p.pid,
        status=Status(int(p.status)),
        stdin=p.io.stdin,
        stdout=p.io.stdout,
        stderr=p.io.stderr,
        terminal=p.io.terminal,
        exit_status=p.exit_status,
    )
    if p.exited_at is not None:
        out.exited_at = p.exited_at
    return out


class TasksService(TasksBase):
    def __init__(self, runtime: TaskManager) -> None:
        self.runtime = runtime

    async def create(self, create_task_request: CreateTaskRequest) -> CreateTaskResponse:
        req = create_task_request
        cid = required(req.container_id, "container_id")
        if req.checkpoint is not None and req.checkpoint.digest:
            raise Unimplemented(f"task {cid!r}: restore from a checkpoint is not supported")
        rootfs = [Mount(m.type, m.source, m.target, tuple(m.options)) for m in req.rootfs]
        io = TaskIO(stdin=req.stdin, stdout=req.stdout, stderr=req.stderr, terminal=req.terminal)
        created = await self.runtime.create(
            request_namespace(), cid, io=io, rootfs=rootfs, options=Opaque.of(req.options)
        )
        return CreateTaskResponse(container_id=cid, pid=created.pid)

    async def start(self, start_request: StartRequest) -> StartResponse:
        cid = required(start_request.container_id, "container_id")
        pid = await self.runtime.start(request_namespace(), cid, start_request.exec_id)
        return StartResponse(pid=pid)

    async def delete(self, delete_task_request: DeleteTaskRequest) -> DeleteResponse:
        cid = required(delete_task_request.container_id, "container_id")
        ended = await self.runtime.delete(request_namespace(), cid)
        return DeleteResponse(id=cid, pid=ended.pid, exit_status=ended.exit_status, exited_at=ended.exited_at)

    async def delete_process(self, delete_process_request: DeleteProcessRequest) -> DeleteResponse:
        req = delete_process_request
        cid = required(req.container_id, "container_id")
        exec_id = required(req.exec_id, "exec_id")
        ended = await self.runtime.delete_process(request_namespace(), cid, exec_id)
        return DeleteResponse(
            id=exec_id, pid=ended.pid, exit_status=ended.exit_status, exited_at=ended.exited_at
        )

    async def get(self, get_request: GetRequest) -> GetResponse:
        cid = required(get_request.container_id, "container_id")
        found = await self.runtime.get(request_namespace(), cid, get_request.exec_id)
        return GetResponse(process=process_to_pb(found))

    async def list(self, list_tasks_request: ListTasksRequest) -> ListTasksResponse:
        wanted = filters.parse([list_tasks_request.filter] if list_tasks_request.filter else [])
        found = [process_to_pb(p) for p in await self.runtime.list(request_namespace())]
        return ListTasksResponse(tasks=[p for p in found if wanted.match(filters.adapt_object(p))])

    async def kill(self, kill_request: KillRequest) -> pb.Empty:
        req = kill_request
        cid = required(req.container_id, "container_id")
        if req.signal <= 0:
            raise InvalidArgument(f"signal: must be a positive signal number, got {req.signal}")
        await self.runtime.kill(request_namespace(), cid, req.exec_id, signal=req.signal, all=req.all)
        return pb.Empty()

    async def exec(self, exec_process_request: ExecProcessRequest) -> pb.Empty:
        req = exec_process_request
        cid = required(req.container_id, "container_id")
        exec_id = required(req.exec_id, "exec_id")
        spec = Opaque.of(req.spec)
        if spec is None:
            raise InvalidArgument(f"task {cid!r}: exec {exec_id!r}: spec must be set (an OCI process)")
        io = TaskIO(stdin=req.stdin, stdout=req.stdout, stderr=req.stderr, terminal=req.terminal)
        await self.runtime.exec(request_namespace(), cid, exec_id, spec=spec, io=io)
        return pb.Empty()

    async def resize_pty(self, resize_pty_request: ResizePtyRequest) -> pb.Empty:
        req = resize_pty_request
        cid = required(req.container_id, "container_id")
        await self.runtime.resize_pty(request_namespace(), cid, req.exec_id, req.width, req.height)
        return pb.Empty()

    async def close_io(self, close_io_request: CloseIoRequest) -> pb.Empty:
        req = close_io_request
        cid = required(req.container_id, "container_id")
        await self.runtime.close_io(request_namespace(), cid, req.exec_id, stdin=req.stdin)
        return pb.Empty()

    async def pause(self, pause_task_request: PauseTaskRequest) -> pb.Empty:
        await self.runtime.pause(
            request_namespace(), required(pause_task_request.container_id, "container_id")
        )
        return pb.Empty()

    async def resume(self, resume_task_request: ResumeTaskRequest) -> pb.Empty:
        await self.runtime.resume(
            request_namespace(), required(resume_task_request.container_id, "container_id")
        )
        return pb.Empty()

    async def list_pids(self, list_pids_request: ListPidsRequest) -> ListPidsResponse:
        cid = required(list_pids_request.container_id, "container_id")
        found = await self.runtime.pids(request_namespace(), cid)
        processes = []
        for p in found:
            info = ProcessInfo(pid=p.pid)
            if p.info is not None:
                info.info = p.info.to_any()
            processes.append(info)
        return ListPidsResponse(processes=processes)

    async def checkpoint(self, checkpoint_task_request: CheckpointTaskRequest) -> CheckpointTaskResponse:
        cid = checkpoint_task_request.container_id
        raise Unimplemented(f"task {cid!r}: checkpoint is not supported by berth (no CRIU integration)")

    async def update(self, update_task_request: UpdateTaskRequest) -> pb.Empty:
        req = update_task_request
        cid = required(req.container_id, "container_id")
        await self.runtime.update(
            request_namespace(), cid, resources=Opaque.of(req.resources), annotations=dict(req.annotations)
        )
        return pb.Empty()

    async def metrics(self, metrics_request: MetricsRequest) -> MetricsResponse:
        namespace = request_namespace()
        wanted = filters.parse(list(metrics_request.filters))
        out: list[Metric] = []
        for task in await self.runtime.list(namespace):
            fields = {"id": task.container_id, "namespace": namespace, "runtime": RUNC_V2_RUNTIME}
            if task.status == TaskStatus.STOPPED or not wanted.match(filters.adapt_mapping(fields)):
                continue  # a stopped task has no cgroup left to read
            try:
                stats = await self.runtime.stats(namespace, task.container_id)
            except NotFound:
                continue  # deleted meanwhile
            metric = Metric(timestamp=datetime.now(UTC), id=task.container_id)
            if stats is not None:
                metric.data = stats.to_any()
            out.append(metric)
        return MetricsResponse(metrics=out)

    async def wait(self, wait_request: WaitRequest) -> WaitResponse:
        cid = required(wait_request.container_id, "container_id")
        ended = await self.runtime.wait(request_namespace(), cid, wait_request.exec_id)
        return WaitResponse(exit_status=ended.exit_status, exited_at=ended.exited_at)


async def init(ic: InitContext) -> TasksService:
    return TasksService(ic.get(RUNTIME_TYPE))


@hookimpl
def berth_register(registry: Registry) -> None:
    registry.add(type="berth.grpc.v1", id="tasks", init=init, requires=[RUNTIME_TYPE])


__all__ = ["TasksService", "berth_register", "process_to_pb"]
