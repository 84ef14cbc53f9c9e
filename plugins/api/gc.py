"""``berth.services.gc.v1.GarbageCollector``: a full collection on demand.

``Collect`` runs the metadata database's mark and sweep now, over every
namespace, the content store and every snapshotter, and answers with what
it removed. It goes through the collector's scheduler (``run_now``), so it
never overlaps a scheduled collection: one running meanwhile finishes first.
The counts are backend objects (blobs and snapshots actually deleted), not
metadata rows; errors of a backend do not fail the call, they are listed and
the next collection retries.
"""

from __future__ import annotations

import structlog

from daemon.hookspecs import hookimpl
from daemon.metadata import MetadataDB
from daemon.registry import InitContext, Registry
from protos.berth.services.gc.v1 import CollectRequest, CollectResponse, GarbageCollectorBase

log = structlog.get_logger("berth.api.gc")


class GarbageCollectorService(GarbageCollectorBase):
    def __init__(self, db: MetadataDB) -> None:
        self.db = db

    async def collect(self, collect_request: CollectRequest) -> CollectResponse:
        summary = await self.db.gc.run_now()
        log.info(
            "gc.collect",
            blobs_removed=summary.blobs_removed,
            snapshots_removed=summary.snapshots_removed,
            bytes_freed=summary.bytes_freed,
            errors=len(summary.errors),
        )
        return CollectResponse(
            content_removed=summary.blobs_removed,
            snapshots_removed=summary.snapshots_removed,
            leases_expired=summary.leases_expired,
            bytes_freed=summary.bytes_freed,
            seconds=summary.duration,
            errors=list(summary.errors),
        )


async def init(ic: InitContext) -> GarbageCollectorService:
    return GarbageCollectorService(ic.get("berth.metadata.v1"))


@hookimpl
def berth_register(registry: Registry) -> None:
    registry.add(type="berth.grpc.v1", id="gc", init=init, requires=["berth.metadata.v1"])


__all__ = ["GarbageCollectorService", "berth_register"]
