"""berth.snapshotter.v1.native: every snapshot a full, independent copy of its parent.

Works on any filesystem, needs no kernel feature beyond bind mounts; see
:mod:`plugins.snapshotters.native.snapshotter`.
"""

from __future__ import annotations

from daemon.hookspecs import hookimpl
from daemon.registry import InitContext, Registry
from plugins.snapshotters.native.config import NativeConfig
from plugins.snapshotters.native.snapshotter import NativeSnapshotter


async def init(ic: InitContext) -> NativeSnapshotter:
    config: NativeConfig = ic.config or NativeConfig()
    sn = await NativeSnapshotter.open(ic.root, config)
    ic.on_close(sn.close)
    ic.exports["root"] = str(ic.root)
    ic.exports["reflink"] = "true" if sn.reflink else "false"
    return sn


@hookimpl
def berth_register(registry: Registry) -> None:
    registry.add(type="berth.snapshotter.v1", id="native", config=NativeConfig, init=init)
