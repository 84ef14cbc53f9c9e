"""``berth.events.v1.exchange``: the daemon's event bus, as a plugin.

The bus itself is core (every plugin gets it as ``ic.bus``); this plugin only
makes it visible to introspection and lets services declare
``requires=["berth.events.v1"]``, as containerd's event exchange does.
"""

from __future__ import annotations

from daemon.events import EventBus
from daemon.hookspecs import hookimpl
from daemon.registry import InitContext, Registry


async def init(ic: InitContext) -> EventBus:
    return ic.bus


@hookimpl
def berth_register(registry: Registry) -> None:
    registry.add(type="berth.events.v1", id="exchange", init=init)
