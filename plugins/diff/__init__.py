"""``berth.diff.v1.tar``: applies OCI/Docker layer tars onto snapshots.

Streaming (the layer is applied while it downloads, in bounded memory) and
confined (no entry of a layer ever lands outside the snapshot): see
:mod:`plugins.diff.apply` for the flow and :mod:`plugins.diff.secure` for
how paths are resolved.
"""

from __future__ import annotations

from daemon.hookspecs import hookimpl
from daemon.registry import InitContext, Registry
from plugins.diff.apply import TarApplier

__all__ = ["TarApplier", "berth_register"]


async def init(ic: InitContext) -> TarApplier:
    return TarApplier()


@hookimpl
def berth_register(registry: Registry) -> None:
    registry.add(type="berth.diff.v1", id="tar", init=init)
