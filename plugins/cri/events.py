"""CRI container events on berth's bus: one topic the sandbox and container sides both publish on.

kubelet's ``GetContainerEvents`` streams ``ContainerEventResponse``s. As in
containerd 1.7 (``generateAndSendContainerEvent``), sandboxes emit them too,
with ``container_id`` the sandbox id: CREATED and STARTED at RunPodSandbox,
STOPPED at StopPodSandbox, DELETED at RemovePodSandbox.

The publisher builds the whole response at the moment of the change (the pod
status and the statuses of the pod's containers as they are then: after a
delete nothing can be looked up any more) and puts it on the bus as is, topic
:data:`TOPIC`, namespace ``k8s.io``; ``GetContainerEvents`` only relays what
:func:`subscribe` yields. A native ``Events.Subscribe`` client sees the same
envelopes, typed ``runtime.v1.ContainerEventResponse``.
"""

from __future__ import annotations

from collections.abc import Iterable

from daemon.events import EventBus, Overflow, Subscription
from plugins.cri.store import NAMESPACE, now_ns
from protos.runtime import v1 as cri

TOPIC = "/cri/container-event"

__all__ = ["TOPIC", "container_event", "publish", "subscribe"]


def container_event(
    container_id: str,
    event_type: cri.ContainerEventType,
    *,
    sandbox_status: cri.PodSandboxStatus | None = None,
    container_statuses: Iterable[cri.ContainerStatus] = (),
    created_at: int = 0,
) -> cri.ContainerEventResponse:
    """The wire event; ``created_at`` (ns) defaults to now."""
    return cri.ContainerEventResponse(
        container_id=container_id,
        container_event_type=event_type,
        created_at=created_at or now_ns(),
        pod_sandbox_status=sandbox_status or cri.PodSandboxStatus(),
        containers_statuses=list(container_statuses),
    )


def publish(bus: EventBus, event: cri.ContainerEventResponse) -> None:
    """Put ``event`` on the bus (never blocks; see :meth:`EventBus.publish`)."""
    bus.publish(TOPIC, event, NAMESPACE)


def subscribe(bus: EventBus, *, maxsize: int = 1024, name: str = "cri-events") -> Subscription:
    """A subscription to CRI container events only; envelopes' ``event`` is a ContainerEventResponse.

    Overflow drops the oldest, as kubelet cares for the newest state (it relists anyway).
    """
    return bus.subscribe(
        topic_prefix=TOPIC, namespace=NAMESPACE, maxsize=maxsize, overflow=Overflow.DROP_OLDEST, name=name
    )
