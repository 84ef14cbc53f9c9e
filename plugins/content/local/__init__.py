"""``berth.content.v1.local``: the content store on the local file system.

Blobs live under the plugin root (``<root>/berth.content.v1.local``), laid
out as :mod:`plugins.content.local.layout` describes; the root is exported
for introspection. Dependents declare ``requires=["berth.content.v1"]`` and
get a :class:`daemon.protocols.ContentStore` from ``ic.get``. The store is
namespace-agnostic: the metadata layer scopes it to namespaces.
"""

from __future__ import annotations

from daemon.hookspecs import hookimpl
from daemon.registry import InitContext, Registry
from plugins.content.local.store import LocalContentStore

TYPE = "berth.content.v1"
ID = "local"


async def init(ic: InitContext) -> LocalContentStore:
    store = await LocalContentStore.open(ic.root)
    ic.on_close(store.close)
    ic.exports["root"] = str(ic.root)
    return store


@hookimpl
def berth_register(registry: Registry) -> None:
    registry.add(type=TYPE, id=ID, init=init)
