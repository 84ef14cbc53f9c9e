"""``berth.images.v1.default``: pull (resolve, fetch, unpack), image records, import and export.

The plugin instance is an :class:`~plugins.images.service.ImageService`
(the API the CRI, the native Images service and the CLI call). It needs the
metadata database (``berth.metadata.v1``: namespaced content, snapshotters,
images, leases, GC) and a layer applier (``berth.diff.v1``). Its config
table is :class:`~plugins.images.config.ImagesConfig` (registry hosts,
credentials, retries, snapshotter, platform, parallel downloads).

Modules: :mod:`.service` (the API), :mod:`.pull` (fetching),
:mod:`.unpack` (layers into snapshots, while they download),
:mod:`.archive` (import/export), :mod:`.blobs` (content and gc labels),
:mod:`.progress`; :mod:`plugins.images.registry` is the registry client
(references, hosts configuration, authentication, verified fetching); it
stores nothing itself.
"""

from __future__ import annotations

from daemon.errors import BerthError
from daemon.hookspecs import hookimpl
from daemon.metadata.db import MetadataDB
from daemon.protocols import Applier
from daemon.registry import InitContext, Registry
from plugins.images import transfer
from plugins.images.config import ImagesConfig
from plugins.images.service import ImageService

TYPE = "berth.images.v1"
ID = "default"

__all__ = ["ImageService", "ImagesConfig", "berth_register"]


async def init(ic: InitContext) -> ImageService:
    config = ic.config if isinstance(ic.config, ImagesConfig) else ImagesConfig()
    db: MetadataDB = ic.get("berth.metadata.v1")
    applier: Applier = ic.get("berth.diff.v1")
    service = ImageService(db, applier, config=config, bus=ic.bus)
    ic.on_close(service.close)
    try:
        await service.cleanup_interrupted()
    except BerthError as exc:  # leftovers only cost disk until their lease expires
        ic.log.warning("images.cleanup_failed", error=str(exc))
    ic.exports["snapshotter"] = config.snapshotter
    ic.exports["platform"] = str(service.platform())
    if config.snapshotter not in db.snapshotters:
        ic.log.warning(
            "images.snapshotter_missing",
            snapshotter=config.snapshotter,
            loaded=",".join(db.snapshotters),
        )
    return service


@hookimpl
def berth_register(registry: Registry) -> None:
    registry.add(
        type=TYPE,
        id=ID,
        requires=["berth.metadata.v1", "berth.diff.v1"],
        config=ImagesConfig,
        init=init,
    )
    # Its gRPC face (berth.grpc.v1.transfer) lives in this package because it
    # speaks the plugin's own progress and credential types.
    transfer.register(registry)
