"""``berth.metadata.v1.sqlite``: the metadata store as a plugin.

The database is ``<root>/berth.metadata.v1.sqlite/meta.db``; its path is
exported for introspection. Dependents declare ``requires=["berth.metadata.v1"]``
and get the :class:`daemon.metadata.MetadataStore` from ``ic.get``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from daemon.errors import InvalidArgument
from daemon.hookspecs import hookimpl
from daemon.metadata import MetadataStore
from daemon.metadata.store import SYNCHRONOUS_MODES
from daemon.registry import InitContext, Registry

TYPE = "berth.metadata.v1"
ID = "sqlite"


@dataclass
class SqliteConfig:
    synchronous: str = field(
        default="full",
        metadata={
            "doc": (
                "SQLite synchronous mode with the WAL journal: 'full' fsyncs every commit "
                "(survives power loss); 'normal' survives a crash of berthd but may lose the "
                "last commits on power loss"
            )
        },
    )


async def init(ic: InitContext) -> MetadataStore:
    config = ic.config if isinstance(ic.config, SqliteConfig) else SqliteConfig()
    if config.synchronous.lower() not in SYNCHRONOUS_MODES:
        raise InvalidArgument(
            f'plugins."{TYPE}.{ID}".synchronous: {config.synchronous!r} is not one of '
            + ", ".join(SYNCHRONOUS_MODES)
        )
    path = ic.root / "meta.db"
    store = await MetadataStore.open(path, synchronous=config.synchronous)
    ic.on_close(store.close)
    ic.exports["path"] = str(path)
    ic.exports["schema_version"] = str(store.schema_version)
    return store


@hookimpl
def berth_register(registry: Registry) -> None:
    registry.add(type=TYPE, id=ID, config=SqliteConfig, init=init)
