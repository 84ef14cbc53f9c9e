"""The container RPCs of ``runtime.v1.RuntimeService``: a mixin over :class:`~.manager.ContainerManager`.

``RuntimeService`` lists :class:`ContainerRpcs` among its bases and sets
``self.containers`` (the manager) in its constructor. Stop and Remove of an
unknown id answer OK; everything else NotFound. Stream* variants send the
list in chunks of :data:`STREAM_CHUNK` (at least one response).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from daemon.errors import Unimplemented
from daemon.validate import required
from plugins.cri import events
from plugins.cri.container.manager import ContainerManager
from plugins.cri.container.model import RUNNING
from plugins.cri.wirecache import preencoded
from protos.runtime import v1 as cri

STREAM_CHUNK = 100

#: What ListMetricDescriptors announces and ListPodSandboxMetrics reports (cAdvisor's names).
METRICS = (
    ("container_cpu_usage_seconds_total", "Cumulative cpu time consumed in seconds.", cri.MetricType.COUNTER),
    ("container_memory_working_set_bytes", "Current working set in bytes.", cri.MetricType.GAUGE),
    ("container_memory_usage_bytes", "Current memory usage in bytes.", cri.MetricType.GAUGE),
)
LABEL_KEYS = ["id", "name"]


class ContainerRpcs:
    containers: ContainerManager

    async def create_container(
        self, create_container_request: cri.CreateContainerRequest
    ) -> cri.CreateContainerResponse:
        req = create_container_request
        cid = await self.containers.create(req.pod_sandbox_id, req.config, req.sandbox_config)
        return cri.CreateContainerResponse(container_id=cid)

    async def start_container(
        self, start_container_request: cri.StartContainerRequest
    ) -> cri.StartContainerResponse:
        await self.containers.start_container(required(start_container_request.container_id, "container_id"))
        return cri.StartContainerResponse()

    async def stop_container(
        self, stop_container_request: cri.StopContainerRequest
    ) -> cri.StopContainerResponse:
        req = stop_container_request
        await self.containers.stop(required(req.container_id, "container_id"), int(req.timeout))
        return cri.StopContainerResponse()

    async def remove_container(
        self, remove_container_request: cri.RemoveContainerRequest
    ) -> cri.RemoveContainerResponse:
        await self.containers.remove(required(remove_container_request.container_id, "container_id"))
        return cri.RemoveContainerResponse()

    async def list_containers(
        self, list_containers_request: cri.ListContainersRequest
    ) -> cri.ListContainersResponse:
        """Pre-encoded entries joined (:mod:`plugins.cri.wirecache`): no message built or encoded per call."""
        mgr = self.containers
        found = mgr.matching(list_containers_request.filter)
        return preencoded(cri.ListContainersResponse, [mgr.encoded(c) for c in found])

    async def stream_containers(
        self, stream_containers_request: cri.StreamContainersRequest
    ) -> AsyncIterator[cri.StreamContainersResponse]:
        mgr = self.containers
        found = [mgr.encoded(c) for c in mgr.matching(stream_containers_request.filter)]
        for start in range(0, max(len(found), 1), STREAM_CHUNK):
            yield preencoded(cri.StreamContainersResponse, found[start : start + STREAM_CHUNK])

    async def container_status(
        self, container_status_request: cri.ContainerStatusRequest
    ) -> cri.ContainerStatusResponse:
        req = container_status_request
        return await self.containers.status(required(req.container_id, "container_id"), req.verbose)

    async def update_container_resources(
        self, update_container_resources_request: cri.UpdateContainerResourcesRequest
    ) -> cri.UpdateContainerResourcesResponse:
        req = update_container_resources_request
        await self.containers.update_resources(required(req.container_id, "container_id"), req.linux)
        return cri.UpdateContainerResourcesResponse()

    async def reopen_container_log(
        self, reopen_container_log_request: cri.ReopenContainerLogRequest
    ) -> cri.ReopenContainerLogResponse:
        await self.containers.reopen_log(required(reopen_container_log_request.container_id, "container_id"))
        return cri.ReopenContainerLogResponse()

    async def exec_sync(self, exec_sync_request: cri.ExecSyncRequest) -> cri.ExecSyncResponse:
        req = exec_sync_request
        stdout, stderr, code = await self.containers.exec_sync(
            required(req.container_id, "container_id"), list(req.cmd), int(req.timeout)
        )
        return cri.ExecSyncResponse(stdout=stdout, stderr=stderr, exit_code=code)

    async def container_stats(
        self, container_stats_request: cri.ContainerStatsRequest
    ) -> cri.ContainerStatsResponse:
        c = self.containers.store.container(required(container_stats_request.container_id, "container_id"))
        return cri.ContainerStatsResponse(stats=await self.containers.stats(c))

    async def list_container_stats(
        self, list_container_stats_request: cri.ListContainerStatsRequest
    ) -> cri.ListContainerStatsResponse:
        found = await self.containers.list_stats(list_container_stats_request.filter)
        return cri.ListContainerStatsResponse(stats=found)

    async def stream_container_stats(
        self, stream_container_stats_request: cri.StreamContainerStatsRequest
    ) -> AsyncIterator[cri.StreamContainerStatsResponse]:
        found = await self.containers.list_stats(stream_container_stats_request.filter)
        for start in range(0, max(len(found), 1), STREAM_CHUNK):
            yield cri.StreamContainerStatsResponse(container_stats=found[start : start + STREAM_CHUNK])

    async def get_container_events(
        self, get_events_request: cri.GetEventsRequest
    ) -> AsyncIterator[cri.ContainerEventResponse]:
        """Every CRI container event from now on, until the client goes away."""
        sub = events.subscribe(self.containers.bus, name="cri-get-container-events")
        try:
            async for env in sub:
                if isinstance(env.event, cri.ContainerEventResponse):
                    yield env.event
        finally:
            sub.close()

    async def list_metric_descriptors(
        self, list_metric_descriptors_request: cri.ListMetricDescriptorsRequest
    ) -> cri.ListMetricDescriptorsResponse:
        return cri.ListMetricDescriptorsResponse(
            descriptors=[
                cri.MetricDescriptor(name=n, help=h, label_keys=list(LABEL_KEYS)) for n, h, _ in METRICS
            ]
        )

    async def list_pod_sandbox_metrics(
        self, list_pod_sandbox_metrics_request: cri.ListPodSandboxMetricsRequest
    ) -> cri.ListPodSandboxMetricsResponse:
        return cri.ListPodSandboxMetricsResponse(pod_metrics=await self._pod_metrics())

    async def stream_pod_sandbox_metrics(
        self, stream_pod_sandbox_metrics_request: cri.StreamPodSandboxMetricsRequest
    ) -> AsyncIterator[cri.StreamPodSandboxMetricsResponse]:
        found = await self._pod_metrics()
        for start in range(0, max(len(found), 1), STREAM_CHUNK):
            yield cri.StreamPodSandboxMetricsResponse(pod_metrics=found[start : start + STREAM_CHUNK])

    async def _pod_metrics(self) -> list[cri.PodSandboxMetrics]:
        """cAdvisor-style metrics of each ready pod's running containers."""
        out = []
        for sb in list(self.containers.store.sandboxes.values()):
            per_container = []
            for c in self.containers.store.containers_of(sb.id):
                if c.status.state != RUNNING:
                    continue
                stats = await self.containers.stats(c)
                labels = [c.id, self.containers.config_of(c).metadata.name]
                ts = stats.cpu.timestamp or stats.memory.timestamp
                values = (
                    stats.cpu.usage_core_nano_seconds.value // 1_000_000_000,
                    stats.memory.working_set_bytes.value,
                    stats.memory.usage_bytes.value,
                )
                metrics = [
                    cri.Metric(
                        name=name,
                        timestamp=ts,
                        metric_type=kind,
                        label_values=labels,
                        value=cri.UInt64Value(v),
                    )
                    for (name, _help, kind), v in zip(METRICS, values, strict=True)
                ]
                per_container.append(cri.ContainerMetrics(container_id=c.id, metrics=metrics))
            out.append(cri.PodSandboxMetrics(pod_sandbox_id=sb.id, container_metrics=per_container))
        return out

    async def checkpoint_container(
        self, checkpoint_container_request: cri.CheckpointContainerRequest
    ) -> cri.CheckpointContainerResponse:
        raise Unimplemented("CheckpointContainer: checkpoint/restore (CRIU) is not supported by berth")
