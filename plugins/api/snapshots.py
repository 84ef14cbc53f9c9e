"""``containerd.services.snapshots.v1.Snapshots``: the namespaced snapshotters on the wire.

Each request names its snapshotter by plugin id (``overlayfs``, ``native``,
a third-party one: ``ctr --snapshotter``); it must be one the metadata
plugin wrapped, else NotFound naming it. Keys are per namespace (the
``containerd-namespace`` header); records and labels live in the metadata
store, and removed snapshots leave the backend at the next garbage
collection (see :mod:`daemon.metadata.snapshots`).

As in containerd: Prepare, View and Commit add the new snapshot to the
lease of the ``containerd-lease`` header; Prepare, Commit and Remove
publish ``/snapshot/prepare``, ``/snapshot/commit`` and ``/snapshot/remove``
in the request's namespace; List streams infos in chunks of
:data:`LIST_CHUNK`; Update changes labels only (``labels``,
``labels.<key>``). A snapshot nothing references (no image chain, lease,
container or ``containerd.io/gc.root`` label) is collected by the next GC,
so clients label or lease what they prepare (``ctr snapshots prepare``
labels it ``gc.root``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable

import betterproto.lib.google.protobuf as pb

from daemon.errors import Unimplemented
from daemon.events import EventBus
from daemon.hookspecs import hookimpl
from daemon.metadata import MetadataDB, NamespacedSnapshotter
from daemon.metadata.validate import quote
from daemon.protocols import Kind, Mount, SnapshotInfo
from daemon.registry import InitContext, Registry
from daemon.server import request_lease, request_namespace
from daemon.validate import label_paths, required
from protos.containerd.events import SnapshotCommit, SnapshotPrepare, SnapshotRemove
from protos.containerd.services.snapshots.v1 import (
    CleanupRequest,
    CommitSnapshotRequest,
    Info,
    ListSnapshotsRequest,
    ListSnapshotsResponse,
    MountsRequest,
    MountsResponse,
    PrepareSnapshotRequest,
    PrepareSnapshotResponse,
    RemoveSnapshotRequest,
    SnapshotsBase,
    StatSnapshotRequest,
    StatSnapshotResponse,
    UpdateSnapshotRequest,
    UpdateSnapshotResponse,
    UsageRequest,
    UsageResponse,
    ViewSnapshotRequest,
    ViewSnapshotResponse,
)
from protos.containerd.services.snapshots.v1 import Kind as PbKind
from protos.containerd.types import Mount as PbMount

#: Infos per List response (containerd sends blocks of 100).
LIST_CHUNK = 100


def mounts_to_pb(mounts: Iterable[Mount]) -> list[PbMount]:
    return [PbMount(type=m.type, source=m.source, target=m.target, options=list(m.options)) for m in mounts]


def info_to_pb(info: SnapshotInfo) -> Info:
    out = Info(name=info.name, parent=info.parent, kind=PbKind(int(info.kind)), labels=dict(info.labels))
    if info.created_at is not None:
        out.created_at = info.created_at
    if info.updated_at is not None:
        out.updated_at = info.updated_at
    return out


class SnapshotsService(SnapshotsBase):
    def __init__(self, db: MetadataDB, bus: EventBus) -> None:
        self.db = db
        self.bus = bus

    def _sn(self, name: str) -> NamespacedSnapshotter:
        return self.db.snapshotter(required(name, "snapshotter"))

    async def prepare(self, prepare_snapshot_request: PrepareSnapshotRequest) -> PrepareSnapshotResponse:
        req = prepare_snapshot_request
        sn = self._sn(req.snapshotter)
        namespace = request_namespace()
        key = required(req.key, "key")
        mounts = await sn.prepare(namespace, key, req.parent, dict(req.labels), lease=request_lease())
        event = SnapshotPrepare(key=key, parent=req.parent, snapshotter=sn.name)
        self.bus.publish("/snapshot/prepare", event, namespace)
        return PrepareSnapshotResponse(mounts=mounts_to_pb(mounts))

    async def view(self, view_snapshot_request: ViewSnapshotRequest) -> ViewSnapshotResponse:
        req = view_snapshot_request
        sn = self._sn(req.snapshotter)
        key = required(req.key, "key")
        mounts = await sn.view(request_namespace(), key, req.parent, dict(req.labels), lease=request_lease())
        return ViewSnapshotResponse(mounts=mounts_to_pb(mounts))

    async def mounts(self, mounts_request: MountsRequest) -> MountsResponse:
        sn = self._sn(mounts_request.snapshotter)
        key = required(mounts_request.key, "key")
        return MountsResponse(mounts=mounts_to_pb(await sn.mounts(request_namespace(), key)))

    async def commit(self, commit_snapshot_request: CommitSnapshotRequest) -> pb.Empty:
        req = commit_snapshot_request
        sn = self._sn(req.snapshotter)
        namespace = request_namespace()
        name = required(req.name, "name")
        key = required(req.key, "key")
        if req.parent:
            current = await sn.stat(namespace, key)
            if req.parent != current.parent:
                raise Unimplemented(
                    f"parent: committing {quote(key)} onto {quote(req.parent)} instead of its own parent "
                    f"{quote(current.parent)} is not supported"
                )
        await sn.commit(namespace, name, key, dict(req.labels), lease=request_lease())
        self.bus.publish(
            "/snapshot/commit", SnapshotCommit(key=key, name=name, snapshotter=sn.name), namespace
        )
        return pb.Empty()

    async def remove(self, remove_snapshot_request: RemoveSnapshotRequest) -> pb.Empty:
        req = remove_snapshot_request
        sn = self._sn(req.snapshotter)
        namespace = request_namespace()
        key = required(req.key, "key")
        await sn.remove(namespace, key)
        self.bus.publish("/snapshot/remove", SnapshotRemove(key=key, snapshotter=sn.name), namespace)
        return pb.Empty()

    async def stat(self, stat_snapshot_request: StatSnapshotRequest) -> StatSnapshotResponse:
        sn = self._sn(stat_snapshot_request.snapshotter)
        key = required(stat_snapshot_request.key, "key")
        return StatSnapshotResponse(info=info_to_pb(await sn.stat(request_namespace(), key)))

    async def update(self, update_snapshot_request: UpdateSnapshotRequest) -> UpdateSnapshotResponse:
        req = update_snapshot_request
        sn = self._sn(req.snapshotter)
        name = required(req.info.name, "info.name")
        paths = label_paths(req.update_mask.paths, f"snapshot {quote(name)}")
        # Only labels are mutable: kind, parent and times in the request are ignored.
        wanted = SnapshotInfo(Kind.UNKNOWN, name, req.info.parent, dict(req.info.labels))
        info = await sn.update(request_namespace(), wanted, paths)
        return UpdateSnapshotResponse(info=info_to_pb(info))

    async def list(
        self, list_snapshots_request: ListSnapshotsRequest
    ) -> AsyncIterator[ListSnapshotsResponse]:
        req = list_snapshots_request
        sn = self._sn(req.snapshotter)
        block: list[Info] = []
        async for info in sn.walk(request_namespace(), list(req.filters)):
            block.append(info_to_pb(info))
            if len(block) >= LIST_CHUNK:
                yield ListSnapshotsResponse(info=block)
                block = []
        if block:
            yield ListSnapshotsResponse(info=block)

    async def usage(self, usage_request: UsageRequest) -> UsageResponse:
        sn = self._sn(usage_request.snapshotter)
        key = required(usage_request.key, "key")
        usage = await sn.usage(request_namespace(), key)
        return UsageResponse(size=usage.size, inodes=usage.inodes)

    async def cleanup(self, cleanup_request: CleanupRequest) -> pb.Empty:
        """The backend's cleanup: on-disk leftovers of snapshots the last GC removed."""
        sn = self._sn(cleanup_request.snapshotter)
        await sn.cleanup()
        return pb.Empty()


async def init(ic: InitContext) -> SnapshotsService:
    return SnapshotsService(ic.get("berth.metadata.v1"), ic.bus)


@hookimpl
def berth_register(registry: Registry) -> None:
    registry.add(
        type="berth.grpc.v1", id="snapshots", init=init, requires=["berth.metadata.v1", "berth.events.v1"]
    )


__all__ = ["SnapshotsService", "berth_register", "info_to_pb", "mounts_to_pb"]
