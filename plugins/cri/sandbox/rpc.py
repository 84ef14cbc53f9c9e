"""The pod sandbox RPCs of ``runtime.v1.RuntimeService``: a mixin of :class:`RuntimeService`.

Each RPC is a thin translation onto :class:`~plugins.cri.sandbox.manager.SandboxManager`
(``self.sandbox_manager``, set by the plugin's init). Errors are daemon.errors
raised by the manager; the server maps them to gRPC codes.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import betterproto

from daemon.errors import InvalidArgument
from plugins.cri.sandbox.manager import SandboxManager
from plugins.cri.sandbox.views import NOTREADY, READY, sandbox_pb, verbose_info
from plugins.cri.store import Sandbox, now_ns
from plugins.cri.wirecache import preencoded
from protos.runtime import v1 as cri

#: Sandboxes (or stats) per Stream* response.
STREAM_CHUNK = 100


class SandboxRpcs:
    """RunPodSandbox, StopPodSandbox, RemovePodSandbox, PodSandboxStatus, ListPodSandbox (+ Stream),
    PodSandboxStats, ListPodSandboxStats (+ Stream), UpdatePodSandboxResources."""

    sandbox_manager: SandboxManager

    async def run_pod_sandbox(
        self, run_pod_sandbox_request: cri.RunPodSandboxRequest
    ) -> cri.RunPodSandboxResponse:
        req = run_pod_sandbox_request
        sandbox_id = await self.sandbox_manager.run(req.config, req.runtime_handler)
        return cri.RunPodSandboxResponse(pod_sandbox_id=sandbox_id)

    async def stop_pod_sandbox(
        self, stop_pod_sandbox_request: cri.StopPodSandboxRequest
    ) -> cri.StopPodSandboxResponse:
        await self.sandbox_manager.stop(stop_pod_sandbox_request.pod_sandbox_id)
        return cri.StopPodSandboxResponse()

    async def remove_pod_sandbox(
        self, remove_pod_sandbox_request: cri.RemovePodSandboxRequest
    ) -> cri.RemovePodSandboxResponse:
        await self.sandbox_manager.remove(remove_pod_sandbox_request.pod_sandbox_id)
        return cri.RemovePodSandboxResponse()

    async def pod_sandbox_status(
        self, pod_sandbox_status_request: cri.PodSandboxStatusRequest
    ) -> cri.PodSandboxStatusResponse:
        req = pod_sandbox_status_request
        mgr = self.sandbox_manager
        sb = mgr.get(req.pod_sandbox_id)
        resp = cri.PodSandboxStatusResponse(status=mgr.status_of(sb), timestamp=now_ns())
        if req.verbose:
            net_closed = bool(sb.meta.netns_path) and sb.status.state != READY
            resp.info = verbose_info(
                sb,
                mgr.config_of(sb),
                net_closed=net_closed,
                process_status=await mgr.process_status(sb),
                image=mgr.sandbox_image,
            )
        return resp

    def _matching(self, flt: cri.PodSandboxFilter) -> list[Sandbox]:
        state: str | None = None
        if betterproto.serialized_on_wire(flt.state):
            state = READY if flt.state.state == cri.PodSandboxState.SANDBOX_READY else NOTREADY
        return self.sandbox_manager.list(id_prefix=flt.id, state=state, labels=flt.label_selector)

    def _list(self, flt: cri.PodSandboxFilter) -> list[cri.PodSandbox]:
        """ListPodSandbox as messages (the reference the encoded path must equal)."""
        mgr = self.sandbox_manager
        return [sandbox_pb(sb, mgr.config_of(sb)) for sb in self._matching(flt)]

    def _encoded(self, flt: cri.PodSandboxFilter) -> list[bytes]:
        mgr = self.sandbox_manager
        return [mgr.encoded(sb) for sb in self._matching(flt)]

    async def list_pod_sandbox(
        self, list_pod_sandbox_request: cri.ListPodSandboxRequest
    ) -> cri.ListPodSandboxResponse:
        """Pre-encoded entries joined (:mod:`plugins.cri.wirecache`): no message built or encoded per call."""
        return preencoded(cri.ListPodSandboxResponse, self._encoded(list_pod_sandbox_request.filter))

    async def stream_pod_sandboxes(
        self, stream_pod_sandboxes_request: cri.StreamPodSandboxesRequest
    ) -> AsyncIterator[cri.StreamPodSandboxesResponse]:
        """ListPodSandbox in chunks of :data:`STREAM_CHUNK` (at least one response, maybe empty)."""
        items = self._encoded(stream_pod_sandboxes_request.filter)
        for start in range(0, max(len(items), 1), STREAM_CHUNK):
            yield preencoded(cri.StreamPodSandboxesResponse, items[start : start + STREAM_CHUNK])

    async def pod_sandbox_stats(
        self, pod_sandbox_stats_request: cri.PodSandboxStatsRequest
    ) -> cri.PodSandboxStatsResponse:
        sb = self.sandbox_manager.get(pod_sandbox_stats_request.pod_sandbox_id)
        return cri.PodSandboxStatsResponse(stats=await self.sandbox_manager.stats(sb))

    async def _stats(self, flt: cri.PodSandboxStatsFilter) -> list[cri.PodSandboxStats]:
        # containerd reports ready sandboxes only: a stopped pod has nothing to measure
        found: list[Sandbox] = self.sandbox_manager.list(
            id_prefix=flt.id, state=READY, labels=flt.label_selector
        )
        return [await self.sandbox_manager.stats(sb) for sb in found]

    async def list_pod_sandbox_stats(
        self, list_pod_sandbox_stats_request: cri.ListPodSandboxStatsRequest
    ) -> cri.ListPodSandboxStatsResponse:
        return cri.ListPodSandboxStatsResponse(stats=await self._stats(list_pod_sandbox_stats_request.filter))

    async def stream_pod_sandbox_stats(
        self, stream_pod_sandbox_stats_request: cri.StreamPodSandboxStatsRequest
    ) -> AsyncIterator[cri.StreamPodSandboxStatsResponse]:
        items = await self._stats(stream_pod_sandbox_stats_request.filter)
        for start in range(0, max(len(items), 1), STREAM_CHUNK):
            yield cri.StreamPodSandboxStatsResponse(pod_sandbox_stats=items[start : start + STREAM_CHUNK])

    async def update_pod_sandbox_resources(
        self, update_pod_sandbox_resources_request: cri.UpdatePodSandboxResourcesRequest
    ) -> cri.UpdatePodSandboxResourcesResponse:
        req = update_pod_sandbox_resources_request
        if not req.pod_sandbox_id:
            raise InvalidArgument("pod_sandbox_id: must not be empty")
        await self.sandbox_manager.update_resources(req.pod_sandbox_id, req.overhead, req.resources)
        return cri.UpdatePodSandboxResourcesResponse()
