"""A container as the CRI wire shows it: Container (lists), ContainerStatus, verbose info, list filters.

Pure functions of the store's entry and its :class:`~.model.Parsed`; the
manager adds the lookups (image, record) and the wire cache.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

import betterproto

from daemon.protocols import RUNC_V2_RUNTIME
from plugins.cri.container.model import CREATED, EXITED, RUNNING, UNKNOWN, Parsed
from plugins.cri.store import CriContainer
from protos.runtime import v1 as cri

STATE_PB = {
    CREATED: cri.ContainerState.CONTAINER_CREATED,
    RUNNING: cri.ContainerState.CONTAINER_RUNNING,
    EXITED: cri.ContainerState.CONTAINER_EXITED,
    UNKNOWN: cri.ContainerState.CONTAINER_UNKNOWN,
}


def container_pb(c: CriContainer, config: cri.ContainerConfig) -> cri.Container:
    return cri.Container(
        id=c.id,
        pod_sandbox_id=c.meta.sandbox_id,
        metadata=config.metadata,
        image=cri.ImageSpec(image=config.image.image, annotations=dict(config.image.annotations)),
        image_ref=c.meta.image_ref,
        image_id=c.meta.image_ref,
        state=STATE_PB.get(c.status.state, cri.ContainerState.CONTAINER_UNKNOWN),
        created_at=c.status.created_at,
        labels=dict(c.labels),
        annotations=dict(c.annotations),
    )


def matching(containers: Iterable[CriContainer], f: cri.ContainerFilter | None = None) -> list[CriContainer]:
    """ListContainers' choice: id and pod prefixes, state, labels (all must match); no message built."""
    if f is None:
        return list(containers)
    id_prefix, pod_prefix, labels = f.id, f.pod_sandbox_id, f.label_selector
    state = f.state.state if betterproto.serialized_on_wire(f.state) else None
    out = []
    for c in containers:
        if id_prefix and not c.id.startswith(id_prefix):
            continue
        if pod_prefix and not c.meta.sandbox_id.startswith(pod_prefix):
            continue
        if state is not None and STATE_PB.get(c.status.state) != state:
            continue
        if labels and any(c.labels.get(k) != v for k, v in labels.items()):
            continue
        out.append(c)
    return out


def status_pb(
    c: CriContainer,
    parsed: Parsed,
    *,
    image_spec: cri.ImageSpec | None = None,
    image_ref: str = "",
) -> cri.ContainerStatus:
    config = parsed.config
    resources = config.linux.resources
    if c.status.resources:
        resources = cri.LinuxContainerResources().from_dict(c.status.resources)
    user = (parsed.spec.get("process") or {}).get("user") or {}
    return cri.ContainerStatus(
        id=c.id,
        metadata=config.metadata,
        state=STATE_PB.get(c.status.state, cri.ContainerState.CONTAINER_UNKNOWN),
        created_at=c.status.created_at,
        started_at=c.status.started_at,
        finished_at=c.status.finished_at,
        exit_code=c.status.exit_code,
        image=cri.ImageSpec(image=config.image.image) if image_spec is None else image_spec,
        image_ref=image_ref or c.meta.image_ref,
        image_id=c.meta.image_ref,
        reason=c.status.reason,
        message=c.status.message,
        labels=dict(c.labels),
        annotations=dict(c.annotations),
        mounts=list(config.mounts),
        log_path=c.meta.log_path,
        resources=cri.ContainerResources(linux=resources),
        user=cri.ContainerUser(
            linux=cri.LinuxContainerUser(
                uid=int(user.get("uid", 0)),
                gid=int(user.get("gid", 0)),
                supplemental_groups=[int(g) for g in user.get("additionalGids", [])],
            )
        ),
        stop_signal=config.stop_signal,
    )


def verbose_info(c: CriContainer, parsed: Parsed, snapshotter: str) -> str:
    """ContainerStatus' ``info["info"]``: the JSON containerd's CRI answers for ``verbose``."""
    return json.dumps(
        {
            "sandboxID": c.meta.sandbox_id,
            "pid": c.status.pid,
            "removing": False,
            "snapshotKey": c.id,
            "snapshotter": snapshotter,
            "runtimeType": RUNC_V2_RUNTIME,
            "runtimeOptions": {},
            "config": parsed.config.to_pydict(casing=betterproto.Casing.CAMEL),
            "runtimeSpec": parsed.spec,
            "image": c.meta.image_ref,
            "logPath": c.meta.log_path,
        },
        default=str,
    )
