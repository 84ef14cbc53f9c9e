"""The part of the native API that runs containers: Containers, Tasks, Leases, Snapshots.Prepare.

:class:`TaskClient` extends the CLI's :class:`~daemon.cli.client.Client`
with the calls ``berth run``, ``berth containers`` and ``berth tasks`` make,
the same ones ``ctr`` makes, so that the CLI works against berthd and against
a containerd alike. Waiting for a task is the one call without a deadline.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import betterproto.lib.google.protobuf as pb
from grpclib.client import Channel

from daemon.cli.client import NAMESPACE_HEADER, Client
from protos.containerd.services.containers.v1 import (
    Container,
    ContainersStub,
    CreateContainerRequest,
    DeleteContainerRequest,
    GetContainerRequest,
    ListContainersRequest,
)
from protos.containerd.services.leases.v1 import CreateRequest as CreateLeaseRequest
from protos.containerd.services.leases.v1 import DeleteRequest as DeleteLeaseRequest
from protos.containerd.services.leases.v1 import LeasesStub
from protos.containerd.services.snapshots.v1 import MountsRequest, PrepareSnapshotRequest, SnapshotsStub
from protos.containerd.services.tasks.v1 import (
    CloseIoRequest,
    CreateTaskRequest,
    CreateTaskResponse,
    DeleteProcessRequest,
    DeleteResponse,
    DeleteTaskRequest,
    ExecProcessRequest,
    GetRequest,
    KillRequest,
    ListPidsRequest,
    ListTasksRequest,
    MetricsRequest,
    PauseTaskRequest,
    ResizePtyRequest,
    ResumeTaskRequest,
    StartRequest,
    TasksStub,
    WaitRequest,
    WaitResponse,
)
from protos.containerd.types import Metric, Mount
from protos.containerd.v1.types import Process, ProcessInfo

LEASE_HEADER = "containerd-lease"
LABEL_GC_EXPIRE = "containerd.io/gc.expire"
#: The runtime ``ctr run`` names, and the one container records get by default.
DEFAULT_RUNTIME = "io.containerd.runc.v2"
#: Type URL of an OCI runtime spec in ``Container.spec`` (containerd's typeurl registration).
SPEC_TYPE_URL = "types.containerd.io/opencontainers/runtime-spec/1/Spec"
#: ... and of an OCI process in ``ExecProcessRequest.spec``.
PROCESS_TYPE_URL = "types.containerd.io/opencontainers/runtime-spec/1/Process"


class TaskClient(Client):
    """Containers, tasks and the snapshot calls of running one, in the client's namespace."""

    def __init__(self, channel: Channel, address: str, namespace: str, timeout: float | None = 10.0) -> None:
        super().__init__(channel, address, namespace, timeout)
        self._channel = channel
        self._timeout = timeout
        self._md = {NAMESPACE_HEADER: namespace}
        self._containers = ContainersStub(channel, timeout=timeout, metadata=self._md)
        self._tasks = TasksStub(channel, timeout=timeout, metadata=self._md)
        self._tasks_unbounded = TasksStub(channel, metadata=self._md)
        self._leases = LeasesStub(channel, timeout=timeout, metadata=self._md)

    # -- leases ---------------------------------------------------------------------

    async def create_lease(self, purpose: str, expire: timedelta = timedelta(hours=24)) -> str:
        """A lease keeping what is made under it until :meth:`delete_lease` (expiry is a safety net)."""
        until = (datetime.now(UTC) + expire).strftime("%Y-%m-%dT%H:%M:%SZ")
        lease_id = f"{purpose}-{secrets.token_hex(6)}"
        await self._leases.create(CreateLeaseRequest(id=lease_id, labels={LABEL_GC_EXPIRE: until}))
        return lease_id

    async def delete_lease(self, lease_id: str) -> None:
        await self._leases.delete(DeleteLeaseRequest(id=lease_id))

    def _leased(self, lease_id: str) -> dict[str, str]:
        return {**self._md, LEASE_HEADER: lease_id} if lease_id else self._md

    # -- snapshots ------------------------------------------------------------------

    async def prepare_snapshot(
        self, snapshotter: str, key: str, parent: str, lease_id: str = ""
    ) -> list[Mount]:
        stub = SnapshotsStub(self._channel, timeout=self._timeout, metadata=self._leased(lease_id))
        req = PrepareSnapshotRequest(snapshotter=snapshotter, key=key, parent=parent)
        return list((await stub.prepare(req)).mounts)

    async def snapshot_mounts(self, snapshotter: str, key: str) -> list[Mount]:
        stub = SnapshotsStub(self._channel, timeout=self._timeout, metadata=self._md)
        return list((await stub.mounts(MountsRequest(snapshotter=snapshotter, key=key))).mounts)

    # -- containers -----------------------------------------------------------------

    async def create_container(self, container: Container, lease_id: str = "") -> Container:
        stub = ContainersStub(self._channel, timeout=self._timeout, metadata=self._leased(lease_id))
        return (await stub.create(CreateContainerRequest(container=container))).container

    async def get_container(self, container_id: str) -> Container:
        return (await self._containers.get(GetContainerRequest(id=container_id))).container

    async def list_containers(self, filters: Sequence[str] = ()) -> list[Container]:
        return list((await self._containers.list(ListContainersRequest(filters=list(filters)))).containers)

    async def delete_container(self, container_id: str) -> None:
        await self._containers.delete(DeleteContainerRequest(id=container_id))

    # -- tasks ----------------------------------------------------------------------

    async def create_task(self, request: CreateTaskRequest) -> CreateTaskResponse:
        return await self._tasks.create(request)

    async def start_task(self, container_id: str, exec_id: str = "") -> int:
        resp = await self._tasks.start(StartRequest(container_id=container_id, exec_id=exec_id))
        return int(resp.pid)

    async def wait_task(self, container_id: str, exec_id: str = "") -> WaitResponse:
        """Block until the task (or exec process) exits; no deadline."""
        return await self._tasks_unbounded.wait(WaitRequest(container_id=container_id, exec_id=exec_id))

    async def delete_task(self, container_id: str) -> DeleteResponse:
        return await self._tasks.delete(DeleteTaskRequest(container_id=container_id))

    async def delete_process(self, container_id: str, exec_id: str) -> DeleteResponse:
        return await self._tasks.delete_process(
            DeleteProcessRequest(container_id=container_id, exec_id=exec_id)
        )

    async def get_task(self, container_id: str, exec_id: str = "") -> Process:
        return (await self._tasks.get(GetRequest(container_id=container_id, exec_id=exec_id))).process

    async def list_tasks(self, filter_: str = "") -> list[Process]:
        return list((await self._tasks.list(ListTasksRequest(filter=filter_))).tasks)

    async def kill_task(
        self, container_id: str, signal: int, *, exec_id: str = "", all_: bool = False
    ) -> None:
        await self._tasks.kill(
            KillRequest(container_id=container_id, exec_id=exec_id, signal=signal, all=all_)
        )

    async def exec_process(self, request: ExecProcessRequest) -> None:
        await self._tasks.exec(request)

    async def resize_pty(self, container_id: str, width: int, height: int, exec_id: str = "") -> None:
        req = ResizePtyRequest(container_id=container_id, exec_id=exec_id, width=width, height=height)
        await self._tasks.resize_pty(req)

    async def close_stdin(self, container_id: str, exec_id: str = "") -> None:
        """Tell the shim the process's input has ended (it holds the FIFO open until then)."""
        await self._tasks.close_io(CloseIoRequest(container_id=container_id, exec_id=exec_id, stdin=True))

    async def pause_task(self, container_id: str) -> None:
        await self._tasks.pause(PauseTaskRequest(container_id=container_id))

    async def resume_task(self, container_id: str) -> None:
        await self._tasks.resume(ResumeTaskRequest(container_id=container_id))

    async def list_pids(self, container_id: str) -> list[ProcessInfo]:
        return list((await self._tasks.list_pids(ListPidsRequest(container_id=container_id))).processes)

    async def metrics(self, filters: Sequence[str]) -> list[Metric]:
        return list((await self._tasks.metrics(MetricsRequest(filters=list(filters)))).metrics)


def spec_any(spec_json: bytes, type_url: str = SPEC_TYPE_URL) -> pb.Any:
    """An OCI document as containerd's clients pack it: the JSON bytes under the runtime-spec type URL."""
    return pb.Any(type_url=type_url, value=spec_json)


__all__ = ["DEFAULT_RUNTIME", "PROCESS_TYPE_URL", "SPEC_TYPE_URL", "TaskClient", "spec_any"]
