"""``runtime.v1.RuntimeService``: the node-level calls kubelet makes first.

Version, Status, RuntimeConfig and UpdateRuntimeConfig are answered here;
every pod and container RPC is still the generated base's UNIMPLEMENTED
until the sandbox and container stores land.

kubelet's view of the node comes from Status: ``RuntimeReady`` (berth can
run containers) and ``NetworkReady``, false with reason
``NetworkPluginNotReady`` and the CNI loader's message ("no network config
found in /etc/cni/net.d" ...) until a network configuration is present in
``conf_dir``; the conf dir is read on every call, so dropping a file there
flips the condition without a restart, as containerd's directory watch does.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json

import structlog

from daemon import __version__
from daemon.errors import InvalidArgument
from plugins.cri.cni.network import CniNetwork
from plugins.cri.config import CriConfig
from plugins.cri.container.rpc import ContainerRpcs
from plugins.cri.sandbox.rpc import SandboxRpcs
from plugins.cri.streaming.rpc import StreamingRpcs
from protos.runtime import v1 as cri

log = structlog.get_logger("berth.cri.runtime")

#: What containerd answers as ``version``: the CRI "kubelet API" version of the v1alpha days.
KUBE_API_VERSION = "0.1.0"
RUNTIME_NAME = "berth"
RUNTIME_API_VERSION = "v1"

RUNTIME_READY = "RuntimeReady"
NETWORK_READY = "NetworkReady"
NETWORK_NOT_READY_REASON = "NetworkPluginNotReady"


def parse_pod_cidrs(value: str) -> list[str]:
    """``"10.88.0.0/16"`` or the dual-stack ``"10.88.0.0/16,fd00::/64"`` as normalized CIDRs.

    InvalidArgument naming ``runtime_config.network_config.pod_cidr`` for anything else.
    """
    out: list[str] = []
    for part in value.split(","):
        text = part.strip()
        try:
            out.append(str(ipaddress.ip_network(text, strict=False)))
        except ValueError:
            raise InvalidArgument(
                f"runtime_config.network_config.pod_cidr: {text!r} is not a CIDR (e.g. 10.88.0.0/16)"
            ) from None
    return out


class RuntimeService(
    SandboxRpcs,
    ContainerRpcs,
    StreamingRpcs,
    cri.RuntimeServiceBase,
):
    """Node-level RuntimeService calls; see the module docstring.

    ``pod_cidrs`` holds what kubelet last sent with UpdateRuntimeConfig (empty
    until then), for CNI configuration templating.
    """

    def __init__(self, config: CriConfig, network: CniNetwork) -> None:
        self.config = config
        self.network = network
        self.pod_cidrs: list[str] = []

    async def version(self, version_request: cri.VersionRequest) -> cri.VersionResponse:
        return cri.VersionResponse(
            version=KUBE_API_VERSION,
            runtime_name=RUNTIME_NAME,
            runtime_version=__version__,
            runtime_api_version=RUNTIME_API_VERSION,
        )

    async def status(self, status_request: cri.StatusRequest) -> cri.StatusResponse:
        net = await self.network.status()
        conditions = [
            cri.RuntimeCondition(type=RUNTIME_READY, status=True),
            cri.RuntimeCondition(
                type=NETWORK_READY,
                status=net.ready,
                reason="" if net.ready else NETWORK_NOT_READY_REASON,
                message="" if net.ready else f"Network plugin returns error: {net.message}",
            ),
        ]
        info: dict[str, str] = {}
        if status_request.verbose:
            info = {
                "config": json.dumps({**dataclasses.asdict(self.config), "podCIDRs": self.pod_cidrs}),
                "cniNetwork": net.network,
                "lastCNILoadStatus": "OK" if net.ready else net.message,
            }
        return cri.StatusResponse(
            status=cri.RuntimeStatus(conditions=conditions),
            info=info,
            # The default handler; its features are claimed as they land.
            runtime_handlers=[cri.RuntimeHandler(name="", features=cri.RuntimeHandlerFeatures())],
            features=cri.RuntimeFeatures(),
        )

    async def runtime_config(
        self, runtime_config_request: cri.RuntimeConfigRequest
    ) -> cri.RuntimeConfigResponse:
        driver = (
            cri.CgroupDriver.SYSTEMD if self.config.cgroup_driver == "systemd" else cri.CgroupDriver.CGROUPFS
        )
        return cri.RuntimeConfigResponse(linux=cri.LinuxRuntimeConfiguration(cgroup_driver=driver))

    async def update_runtime_config(
        self, update_runtime_config_request: cri.UpdateRuntimeConfigRequest
    ) -> cri.UpdateRuntimeConfigResponse:
        """Keep the pod CIDR(s); an empty one leaves the last value, as containerd does."""
        value = update_runtime_config_request.runtime_config.network_config.pod_cidr
        if value:
            cidrs = parse_pod_cidrs(value)
            if cidrs != self.pod_cidrs:
                log.info("cri.pod_cidr", pod_cidrs=cidrs, previous=self.pod_cidrs)
            self.pod_cidrs = cidrs
        return cri.UpdateRuntimeConfigResponse()
