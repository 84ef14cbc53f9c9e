"""``containerd.services.namespaces.v1.Namespaces`` over the metadata store.

Semantics follow containerd: names are identifiers, Update applies a field
mask (``labels`` or ``labels.<key>``), Delete refuses a namespace that still
holds objects (FailedPrecondition). Each change is published on the bus as
``/namespaces/{create,update,delete}`` in the namespace concerned.
"""

from __future__ import annotations

from typing import Any

import betterproto.lib.google.protobuf as pb

from daemon.events import EventBus
from daemon.hookspecs import hookimpl
from daemon.registry import InitContext, Registry
from daemon.validate import label_paths, required
from protos.containerd.events import NamespaceCreate, NamespaceDelete, NamespaceUpdate
from protos.containerd.services.namespaces.v1 import (
    CreateNamespaceRequest,
    CreateNamespaceResponse,
    DeleteNamespaceRequest,
    GetNamespaceRequest,
    GetNamespaceResponse,
    ListNamespacesRequest,
    ListNamespacesResponse,
    Namespace,
    NamespacesBase,
    UpdateNamespaceRequest,
    UpdateNamespaceResponse,
)


def _pb(ns: Any) -> Namespace:
    return Namespace(name=ns.name, labels=dict(ns.labels))


class NamespacesService(NamespacesBase):
    def __init__(self, store: Any, bus: EventBus) -> None:
        self.store = store
        self.bus = bus

    async def get(self, get_namespace_request: GetNamespaceRequest) -> GetNamespaceResponse:
        name = required(get_namespace_request.name, "name")
        return GetNamespaceResponse(namespace=_pb(await self.store.namespaces.get(name)))

    async def list(self, list_namespaces_request: ListNamespacesRequest) -> ListNamespacesResponse:
        return ListNamespacesResponse(namespaces=[_pb(n) for n in await self.store.namespaces.list()])

    async def create(self, create_namespace_request: CreateNamespaceRequest) -> CreateNamespaceResponse:
        req = create_namespace_request.namespace
        name = required(req.name if req else "", "namespace.name")
        ns = await self.store.namespaces.create(name, dict(req.labels))
        self.bus.publish("/namespaces/create", NamespaceCreate(name=ns.name, labels=dict(ns.labels)), ns.name)
        return CreateNamespaceResponse(namespace=_pb(ns))

    async def update(self, update_namespace_request: UpdateNamespaceRequest) -> UpdateNamespaceResponse:
        req = update_namespace_request
        name = required(req.namespace.name if req.namespace else "", "namespace.name")
        paths = label_paths(req.update_mask.paths if req.update_mask else [], f"namespace {name!r}")
        ns = await self.store.namespaces.update(name, dict(req.namespace.labels), paths)
        self.bus.publish("/namespaces/update", NamespaceUpdate(name=ns.name, labels=dict(ns.labels)), ns.name)
        return UpdateNamespaceResponse(namespace=_pb(ns))

    async def delete(self, delete_namespace_request: DeleteNamespaceRequest) -> pb.Empty:
        name = required(delete_namespace_request.name, "name")
        await self.store.namespaces.delete(name)
        self.bus.publish("/namespaces/delete", NamespaceDelete(name=name), name)
        return pb.Empty()


async def init(ic: InitContext) -> NamespacesService:
    return NamespacesService(ic.get("berth.metadata.v1"), ic.bus)


@hookimpl
def berth_register(registry: Registry) -> None:
    registry.add(
        type="berth.grpc.v1",
        id="namespaces",
        init=init,
        requires=["berth.metadata.v1", "berth.events.v1"],
    )
