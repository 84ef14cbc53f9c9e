"""berth.snapshotter.v1.overlayfs: layers stacked by the kernel's overlay filesystem.

See :mod:`plugins.snapshotters.overlayfs.snapshotter` for the layout and the
mounts it returns, :mod:`.config` for its configuration keys. Skipped (not
failed) on a host where an overlay cannot be mounted under the plugin root.
"""

from __future__ import annotations

from daemon.hookspecs import hookimpl
from daemon.registry import InitContext, PluginSkip, Registry
from plugins.snapshotters.overlayfs.config import OverlayConfig
from plugins.snapshotters.overlayfs.snapshotter import OverlaySnapshotter, check_supported


async def init(ic: InitContext) -> OverlaySnapshotter:
    reason = await check_supported(ic.root)
    if reason:
        raise PluginSkip(reason)
    config: OverlayConfig = ic.config or OverlayConfig()
    sn = await OverlaySnapshotter.open(ic.root, config)
    ic.on_close(sn.close)
    ic.exports["root"] = str(ic.root)
    return sn


@hookimpl
def berth_register(registry: Registry) -> None:
    registry.add(type="berth.snapshotter.v1", id="overlayfs", config=OverlayConfig, init=init)
