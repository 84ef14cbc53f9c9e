"""A sandbox as the CRI wire shows it: PodSandbox (lists), PodSandboxStatus, verbose info.

Shared by the RPCs and by the events (a ContainerEventResponse carries the
pod's status as it was at the change).
"""

from __future__ import annotations

import json
from typing import Any

import betterproto

from daemon.protocols import RUNC_V2_RUNTIME
from plugins.cri.store import Sandbox
from protos.runtime import v1 as cri

READY = "ready"
NOTREADY = "notready"


def state_pb(sb: Sandbox) -> cri.PodSandboxState:
    return (
        cri.PodSandboxState.SANDBOX_READY
        if sb.status.state == READY
        else cri.PodSandboxState.SANDBOX_NOTREADY
    )


def sandbox_pb(sb: Sandbox, config: cri.PodSandboxConfig) -> cri.PodSandbox:
    return cri.PodSandbox(
        id=sb.id,
        metadata=config.metadata,
        state=state_pb(sb),
        created_at=sb.status.created_at,
        labels=dict(sb.labels),
        annotations=dict(sb.annotations),
        runtime_handler=sb.meta.runtime_handler,
    )


def status_pb(sb: Sandbox, config: cri.PodSandboxConfig) -> cri.PodSandboxStatus:
    """containerd's ``toCRISandboxStatus``: the IPs only while ready, the config's namespace options."""
    network = cri.PodSandboxNetworkStatus()
    if sb.status.state == READY and sb.status.ip:
        network = cri.PodSandboxNetworkStatus(
            ip=sb.status.ip, additional_ips=[cri.PodIp(ip=ip) for ip in sb.status.additional_ips]
        )
    options = config.linux.security_context.namespace_options
    return cri.PodSandboxStatus(
        id=sb.id,
        metadata=config.metadata,
        state=state_pb(sb),
        created_at=sb.status.created_at,
        network=network,
        linux=cri.LinuxPodSandboxStatus(
            namespaces=cri.Namespace(
                options=cri.NamespaceOption(
                    network=options.network,
                    pid=options.pid,
                    ipc=options.ipc,
                    target_id=options.target_id,
                    userns_options=options.userns_options,
                )
            )
        ),
        labels=dict(sb.labels),
        annotations=dict(sb.annotations),
        runtime_handler=sb.meta.runtime_handler,
    )


def verbose_info(
    sb: Sandbox, config: cri.PodSandboxConfig, *, net_closed: bool, process_status: str, image: str
) -> dict[str, str]:
    """containerd's ``info`` key: a JSON object of what kubelet and crictl inspect print."""
    doc: dict[str, Any] = {
        "pid": sb.status.pid,
        "processStatus": process_status,
        "netNamespaceClosed": net_closed,
        "image": image,
        "snapshotKey": "",
        "snapshotter": "",
        "runtimeHandler": sb.meta.runtime_handler,
        "runtimeType": RUNC_V2_RUNTIME,
        "config": config.to_pydict(casing=betterproto.Casing.CAMEL),
        "netnsPath": sb.meta.netns_path,
        "sandboxDir": sb.meta.root_dir,
        "cgroupParent": sb.meta.cgroup_parent,
        "podIPs": [ip for ip in [sb.status.ip, *sb.status.additional_ips] if ip],
    }
    return {"info": json.dumps(doc, default=str)}
