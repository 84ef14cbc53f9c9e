"""``containerd.services.containers.v1.Containers``: container records on the wire.

A container here is metadata only (see :mod:`daemon.metadata.containers`):
creating one starts nothing. The spec, runtime options and extensions are
``google.protobuf.Any`` values passed through untouched (type URL and bytes),
so ``ctr``'s runc spec round-trips byte for byte.

As in containerd: Create, Update and Delete publish ``/containers/create``,
``/containers/update`` and ``/containers/delete`` (``containerd.events.ContainerCreate``
...) in the request's namespace once the change is committed. Update takes
a field mask (``labels``, ``labels.<key>``, ``spec``, ``extensions``,
``extensions.<key>``, ``image``, ``snapshotkey``); without one those fields
are all replaced and ``runtime.name`` and ``snapshotter`` must be unchanged
(they are immutable). ListStream sends one container per message. Delete
schedules a garbage collection: the container's snapshot goes with it
unless something else keeps it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import betterproto.lib.google.protobuf as pb
import structlog

from daemon.events import EventBus
from daemon.hookspecs import hookimpl
from daemon.metadata import Container, MetadataDB, Runtime, TypedValue
from daemon.registry import InitContext, Registry
from daemon.server import request_namespace
from daemon.validate import required
from protos.containerd.events import ContainerCreate, ContainerCreateRuntime, ContainerDelete, ContainerUpdate
from protos.containerd.services.containers.v1 import Container as PbContainer
from protos.containerd.services.containers.v1 import (
    ContainerRuntime,
    ContainersBase,
    CreateContainerRequest,
    CreateContainerResponse,
    DeleteContainerRequest,
    GetContainerRequest,
    GetContainerResponse,
    ListContainerMessage,
    ListContainersRequest,
    ListContainersResponse,
    UpdateContainerRequest,
    UpdateContainerResponse,
)

log = structlog.get_logger("berth.api.containers")


def _any_from_pb(value: pb.Any | None) -> TypedValue | None:
    # An unset message field decodes as None; an Any with neither part set carries nothing either.
    if value is None or (not value.type_url and not value.value):
        return None
    return TypedValue(value.type_url, bytes(value.value))


def _any_to_pb(value: TypedValue | None) -> pb.Any | None:
    return None if value is None else pb.Any(type_url=value.type_url, value=value.value)


def container_to_pb(c: Container) -> PbContainer:
    return PbContainer(
        id=c.id,
        labels=dict(c.labels),
        image=c.image,
        runtime=ContainerRuntime(name=c.runtime.name, options=_any_to_pb(c.runtime.options)),  # type: ignore[arg-type]
        spec=_any_to_pb(c.spec),  # type: ignore[arg-type]
        snapshotter=c.snapshotter,
        snapshot_key=c.snapshot_key,
        created_at=c.created_at,
        updated_at=c.updated_at,
        extensions={k: pb.Any(type_url=v.type_url, value=v.value) for k, v in c.extensions.items()},
        sandbox=c.sandbox,
    )


def container_from_pb(c: PbContainer) -> Container:
    """The record a container message describes; the store validates it."""
    runtime = c.runtime
    return Container(
        id=c.id,
        runtime=Runtime(runtime.name if runtime else "", _any_from_pb(runtime.options if runtime else None)),
        spec=_any_from_pb(c.spec),
        image=c.image,
        labels=dict(c.labels),
        snapshotter=c.snapshotter,
        snapshot_key=c.snapshot_key,
        extensions={k: TypedValue(v.type_url, bytes(v.value)) for k, v in c.extensions.items()},
        sandbox=c.sandbox,
    )


class ContainersService(ContainersBase):
    def __init__(self, db: MetadataDB, bus: EventBus) -> None:
        self.containers = db.containers
        self.bus = bus

    async def get(self, get_container_request: GetContainerRequest) -> GetContainerResponse:
        id_ = required(get_container_request.id, "id")
        found = await self.containers.get(request_namespace(), id_)
        return GetContainerResponse(container=container_to_pb(found))

    async def list(self, list_containers_request: ListContainersRequest) -> ListContainersResponse:
        found = await self.containers.list(request_namespace(), list(list_containers_request.filters))
        return ListContainersResponse(containers=[container_to_pb(c) for c in found])

    async def list_stream(
        self, list_containers_request: ListContainersRequest
    ) -> AsyncIterator[ListContainerMessage]:
        found = await self.containers.list(request_namespace(), list(list_containers_request.filters))
        for c in found:
            yield ListContainerMessage(container=container_to_pb(c))

    async def create(self, create_container_request: CreateContainerRequest) -> CreateContainerResponse:
        namespace = request_namespace()
        req = create_container_request.container
        required(req.id, "container.id")
        created = await self.containers.create(namespace, container_from_pb(req))
        event = ContainerCreate(
            id=created.id,
            image=created.image,
            runtime=ContainerCreateRuntime(
                name=created.runtime.name,
                options=_any_to_pb(created.runtime.options),  # type: ignore[arg-type]
            ),
        )
        self.bus.publish("/containers/create", event, namespace)
        return CreateContainerResponse(container=container_to_pb(created))

    async def update(self, update_container_request: UpdateContainerRequest) -> UpdateContainerResponse:
        req = update_container_request
        namespace = request_namespace()
        required(req.container.id, "container.id")
        paths = list(req.update_mask.paths) if req.update_mask else []
        updated = await self.containers.update(namespace, container_from_pb(req.container), paths)
        event = ContainerUpdate(
            id=updated.id, image=updated.image, labels=dict(updated.labels), snapshot_key=updated.snapshot_key
        )
        self.bus.publish("/containers/update", event, namespace)
        return UpdateContainerResponse(container=container_to_pb(updated))

    async def delete(self, delete_container_request: DeleteContainerRequest) -> pb.Empty:
        namespace = request_namespace()
        id_ = required(delete_container_request.id, "id")
        await self.containers.delete(namespace, id_)
        self.bus.publish("/containers/delete", ContainerDelete(id=id_), namespace)
        return pb.Empty()


async def init(ic: InitContext) -> ContainersService:
    return ContainersService(ic.get("berth.metadata.v1"), ic.bus)


@hookimpl
def berth_register(registry: Registry) -> None:
    registry.add(
        type="berth.grpc.v1", id="containers", init=init, requires=["berth.metadata.v1", "berth.events.v1"]
    )


__all__ = ["ContainersService", "berth_register", "container_from_pb", "container_to_pb"]
