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
from typing import TYPE_CHECKING

from daemon.cli.client import Client

if TYPE_CHECKING:
    import betterproto.lib.google.protobuf as pb

    from protos.containerd.services.containers.v1 import Container
    from protos.containerd.services.tasks.v1 import (
        CreateTaskRequest,
        CreateTaskResponse,
        DeleteResponse,
        ExecProcessRequest,
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

    def _leased(self, lease_id: str) -> dict[str, str]:
        return {**self._md, LEASE_HEADER: lease_id} if lease_id else self._md

    # -- leases ---------------------------------------------------------------------

    async def create_lease(self, purpose: str, expire: timedelta = timedelta(hours=24)) -> str:
        """A lease keeping what is made under it until :meth:`delete_lease` (expiry is a safety net)."""
        from protos.containerd.services.leases.v1 import CreateRequest, LeasesStub

        until = (datetime.now(UTC) + expire).strftime("%Y-%m-%dT%H:%M:%SZ")
        lease_id = f"{purpose}-{secrets.token_hex(6)}"
        await self._stub(LeasesStub).create(CreateRequest(id=lease_id, labels={LABEL_GC_EXPIRE: until}))
        return lease_id

    async def delete_lease(self, lease_id: str) -> None:
        from protos.containerd.services.leases.v1 import DeleteRequest, LeasesStub

        await self._stub(LeasesStub).delete(DeleteRequest(id=lease_id))

    # -- snapshots ------------------------------------------------------------------

    async def prepare_snapshot(
        self, snapshotter: str, key: str, parent: str, lease_id: str = ""
    ) -> list[Mount]:
        from protos.containerd.services.snapshots.v1 import PrepareSnapshotRequest, SnapshotsStub

        stub = SnapshotsStub(self._channel, timeout=self._timeout, metadata=self._leased(lease_id))
        req = PrepareSnapshotRequest(snapshotter=snapshotter, key=key, parent=parent)
        return list((await stub.prepare(req)).mounts)

    async def snapshot_mounts(self, snapshotter: str, key: str) -> list[Mount]:
        from protos.containerd.services.snapshots.v1 import MountsRequest, SnapshotsStub

        req = MountsRequest(snapshotter=snapshotter, key=key)
        return list((await self._stub(SnapshotsStub).mounts(req)).mounts)

    # -- containers -----------------------------------------------------------------

    async def create_container(self, container: Container, lease_id: str = "") -> Container:
        from protos.containerd.services.containers.v1 import ContainersStub, CreateContainerRequest

        stub = ContainersStub(self._channel, timeout=self._timeout, metadata=self._leased(lease_id))
        return (await stub.create(CreateContainerRequest(container=container))).container

    async def get_container(self, container_id: str) -> Container:
        from protos.containerd.services.containers.v1 import ContainersStub, GetContainerRequest

        return (await self._stub(ContainersStub).get(GetContainerRequest(id=container_id))).container

    async def list_containers(self, filters: Sequence[str] = ()) -> list[Container]:
        from protos.containerd.services.containers.v1 import ContainersStub, ListContainersRequest

        req = ListContainersRequest(filters=list(filters))
        return list((await self._stub(ContainersStub).list(req)).containers)

    async def delete_container(self, container_id: str) -> None:
        from protos.containerd.services.containers.v1 import ContainersStub, DeleteContainerRequest

        await self._stub(ContainersStub).delete(DeleteContainerRequest(id=container_id))

    # -- tasks ----------------------------------------------------------------------

    async def create_task(self, request: CreateTaskRequest) -> CreateTaskResponse:
        from protos.containerd.services.tasks.v1 import TasksStub

        return await self._stub(TasksStub).create(request)

    async def start_task(self, container_id: str, exec_id: str = "") -> int:
        from protos.containerd.services.tasks.v1 import StartRequest, TasksStub

        resp = await self._stub(TasksStub).start(StartRequest(container_id=container_id, exec_id=exec_id))
        return int(resp.pid)

    async def wait_task(self, container_id: str, exec_id: str = "") -> WaitResponse:
        """Block until the task (or exec process) exits; no deadline."""
        from protos.containerd.services.tasks.v1 import TasksStub, WaitRequest

        req = WaitRequest(container_id=container_id, exec_id=exec_id)
        return await self._stub(TasksStub, bounded=False).wait(req)

    async def delete_task(self, container_id: str) -> DeleteResponse:
        from protos.containerd.services.tasks.v1 import DeleteTaskRequest, TasksStub

        return await self._stub(TasksStub).delete(DeleteTaskRequest(container_id=container_id))

    async def delete_process(self, container_id: str, exec_id: str) -> DeleteResponse:
        from protos.containerd.services.tasks.v1 import DeleteProcessRequest, TasksStub

        req = DeleteProcessRequest(container_id=container_id, exec_id=exec_id)
        return await self._stub(TasksStub).delete_process(req)

    async def get_task(self, container_id: str, exec_id: str = "") -> Process:
        from protos.containerd.services.tasks.v1 import GetRequest, TasksStub

        req = GetRequest(container_id=container_id, exec_id=exec_id)
        return (await self._stub(TasksStub).get(req)).process

    async def list_tasks(self, filter_: str = "") -> list[Process]:
        from protos.containerd.services.tasks.v1 import ListTasksRequest, TasksStub

        return list((await self._stub(TasksStub).list(ListTasksRequest(filter=filter_))).tasks)

    async def kill_task(
        self, container_id: str, signal: int, *, exec_id: str = "", all_: bool = False
    ) -> None:
        from protos.containerd.services.tasks.v1 import KillRequest, TasksStub

        req = KillRequest(container_id=container_id, exec_id=exec_id, signal=signal, all=all_)
        await self._stub(TasksStub).kill(req)

    async def exec_process(self, request: ExecProcessRequest) -> None:
        from protos.containerd.services.tasks.v1 import TasksStub

        await self._stub(TasksStub).exec(request)

    async def resize_pty(self, container_id: str, width: int, height: int, exec_id: str = "") -> None:
        from protos.containerd.services.tasks.v1 import ResizePtyRequest, TasksStub

        req = ResizePtyRequest(container_id=container_id, exec_id=exec_id, width=width, height=height)
        await self._stub(TasksStub).resize_pty(req)

    async def close_stdin(self, container_id: str, exec_id: str = "") -> None:
        """Tell the shim the process's input has ended (it holds the FIFO open until then)."""
        from protos.containerd.services.tasks.v1 import CloseIoRequest, TasksStub

        req = CloseIoRequest(container_id=container_id, exec_id=exec_id, stdin=True)
        await self._stub(TasksStub).close_io(req)

    async def pause_task(self, container_id: str) -> None:
        from protos.containerd.services.tasks.v1 import PauseTaskRequest, TasksStub

        await self._stub(TasksStub).pause(PauseTaskRequest(container_id=container_id))

    async def resume_task(self, container_id: str) -> None:
        from protos.containerd.services.tasks.v1 import ResumeTaskRequest, TasksStub

        await self._stub(TasksStub).resume(ResumeTaskRequest(container_id=container_id))

    async def list_pids(self, container_id: str) -> list[ProcessInfo]:
        from protos.containerd.services.tasks.v1 import ListPidsRequest, TasksStub

        req = ListPidsRequest(container_id=container_id)
        return list((await self._stub(TasksStub).list_pids(req)).processes)

    async def metrics(self, filters: Sequence[str]) -> list[Metric]:
        from protos.containerd.services.tasks.v1 import MetricsRequest, TasksStub

        return list((await self._stub(TasksStub).metrics(MetricsRequest(filters=list(filters)))).metrics)


def spec_any(spec_json: bytes, type_url: str = SPEC_TYPE_URL) -> pb.Any:
    """An OCI document as containerd's clients pack it: the JSON bytes under the runtime-spec type URL."""
    import betterproto.lib.google.protobuf as pb

    return pb.Any(type_url=type_url, value=spec_json)


__all__ = ["DEFAULT_RUNTIME", "PROCESS_TYPE_URL", "SPEC_TYPE_URL", "TaskClient", "spec_any"]
