"""``containerd.services.leases.v1.Leases``: namespace-scoped leases.

A lease holds resources (content, snapshots, ingests) back from garbage
collection while a client works, e.g. during a pull. Records live in the
metadata store; a namespace holding a lease cannot be deleted. Deleting a
lease schedules a garbage collection of what only it held; with ``sync``
the collection runs before the call answers (``ctr leases rm --sync``).
"""

from __future__ import annotations

from collections.abc import Sequence

import betterproto.lib.google.protobuf as pb

from daemon import filters
from daemon.errors import InvalidArgument
from daemon.hookspecs import hookimpl
from daemon.metadata import Lease as StoredLease
from daemon.metadata import LeaseResource, MetadataDB
from daemon.registry import InitContext, Registry
from daemon.server import request_namespace
from daemon.validate import required
from protos.containerd.services.leases.v1 import (
    AddResourceRequest,
    CreateRequest,
    CreateResponse,
    DeleteRequest,
    DeleteResourceRequest,
    Lease,
    LeasesBase,
    ListRequest,
    ListResourcesRequest,
    ListResourcesResponse,
    ListResponse,
    Resource,
)


def _pb(lease: StoredLease) -> Lease:
    return Lease(id=lease.id, created_at=lease.created_at, labels=dict(lease.labels))


def _adaptor(lease: Lease) -> filters.Adaptor:
    def get(path: Sequence[str]) -> tuple[str, bool]:
        if not path:
            return "", False
        if path[0] == "id":
            return lease.id, True
        if path[0] == "labels" and len(path) > 1:
            key = ".".join(path[1:])
            return lease.labels.get(key, ""), key in lease.labels
        return "", False

    return get


def _resource(res: Resource | None, field: str) -> LeaseResource:
    if res is None:
        raise InvalidArgument(f"{field}: must be set")
    return LeaseResource(id=required(res.id, f"{field}.id"), type=required(res.type, f"{field}.type"))


class LeasesService(LeasesBase):
    def __init__(self, db: MetadataDB) -> None:
        self.db = db
        self.leases = db.leases

    async def create(self, create_request: CreateRequest) -> CreateResponse:
        req = create_request
        lease = await self.leases.create(request_namespace(), required(req.id, "id"), dict(req.labels))
        return CreateResponse(lease=_pb(lease))

    async def delete(self, delete_request: DeleteRequest) -> pb.Empty:
        await self.leases.delete(request_namespace(), required(delete_request.id, "id"))
        if delete_request.sync:
            await self.db.gc.run_now()
        else:
            self.db.request_gc()
        return pb.Empty()

    async def list(self, list_request: ListRequest) -> ListResponse:
        flt = filters.parse(list(list_request.filters))
        leases = [_pb(lease) for lease in await self.leases.list(request_namespace())]
        return ListResponse(leases=[lease for lease in leases if flt.match(_adaptor(lease))])

    async def add_resource(self, add_resource_request: AddResourceRequest) -> pb.Empty:
        req = add_resource_request
        res = _resource(req.resource, "resource")
        await self.leases.add_resource(request_namespace(), required(req.id, "id"), res)
        return pb.Empty()

    async def delete_resource(self, delete_resource_request: DeleteResourceRequest) -> pb.Empty:
        req = delete_resource_request
        res = _resource(req.resource, "resource")
        await self.leases.delete_resource(request_namespace(), required(req.id, "id"), res)
        return pb.Empty()

    async def list_resources(self, list_resources_request: ListResourcesRequest) -> ListResourcesResponse:
        ns = request_namespace()
        items = await self.leases.list_resources(ns, required(list_resources_request.id, "id"))
        return ListResourcesResponse(resources=[Resource(id=r.id, type=r.type) for r in items])


async def init(ic: InitContext) -> LeasesService:
    return LeasesService(ic.get("berth.metadata.v1"))


@hookimpl
def berth_register(registry: Registry) -> None:
    registry.add(type="berth.grpc.v1", id="leases", init=init, requires=["berth.metadata.v1"])
