"""``berth.metadata.v1.sqlite``: the metadata database as a plugin, like containerd's bolt plugin.

It requires the content store (``berth.content.v1``) and the snapshotters
(``berth.snapshotter.v1``: at least one must load; every one that loaded
is wrapped, under its plugin id) and returns a
:class:`daemon.metadata.MetadataDB`: the store, the namespaced content and
snapshotters, and the garbage collector. Services declare
``requires=["berth.metadata.v1"]`` and reach content and snapshots only
through it, so every object they create is recorded in a namespace and
kept or collected by the same rules.

The database is ``<root>/berth.metadata.v1.sqlite/meta.db``; its path is
exported for introspection, with the wrapped snapshotters. A collection is
requested once at start (what a crash left behind goes) and after every
delete, ``gc_delay`` seconds later.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from daemon.errors import FailedPrecondition, InvalidArgument
from daemon.hookspecs import hookimpl
from daemon.metadata import MetadataDB
from daemon.metadata.store import SYNCHRONOUS_MODES
from daemon.protocols import ContentStore, Snapshotter
from daemon.registry import InitContext, Registry

TYPE = "berth.metadata.v1"
ID = "sqlite"
CONTENT_TYPE = "berth.content.v1"
SNAPSHOTTER_TYPE = "berth.snapshotter.v1"


@dataclass
class SqliteConfig:
    """The metadata database (namespaces, images, leases, content and snapshot records) and its GC."""

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
    gc_delay: float = field(
        default=1.0,
        metadata={
            "doc": (
                "Seconds from a delete (image, content, snapshot, lease) to the garbage collection "
                "it triggers; deletes within that time share one collection. 0 collects at once"
            )
        },
    )

    def validate(self) -> None:
        if self.synchronous.lower() not in SYNCHRONOUS_MODES:
            raise ValueError(
                f"synchronous: {self.synchronous!r} is not one of {', '.join(SYNCHRONOUS_MODES)}"
            )
        if self.gc_delay < 0:
            raise ValueError(f"gc_delay: {self.gc_delay!r} must not be negative")


def _key(name: str) -> str:
    return f'plugins."{TYPE}.{ID}".{name}'


async def init(ic: InitContext) -> MetadataDB:
    config = ic.config if isinstance(ic.config, SqliteConfig) else SqliteConfig()
    # The config loader runs validate(); a config built in code is checked here too.
    if config.synchronous.lower() not in SYNCHRONOUS_MODES:
        raise InvalidArgument(
            f"{_key('synchronous')}: {config.synchronous!r} is not one of " + ", ".join(SYNCHRONOUS_MODES)
        )
    if config.gc_delay < 0:
        raise InvalidArgument(f"{_key('gc_delay')}: {config.gc_delay!r} must not be negative")
    content: ContentStore = ic.get(CONTENT_TYPE)
    snapshotters: dict[str, Snapshotter] = ic.get_all(SNAPSHOTTER_TYPE)
    if not snapshotters:  # the registry guarantees one; a direct caller may not
        raise FailedPrecondition(f"{TYPE}.{ID}: no {SNAPSHOTTER_TYPE} plugin loaded")
    path = ic.root / "meta.db"
    db = await MetadataDB.open(
        path, content, snapshotters, synchronous=config.synchronous, gc_delay=config.gc_delay
    )
    ic.on_close(db.close)
    ic.exports["path"] = str(path)
    ic.exports["schema_version"] = str(db.store.schema_version)
    ic.exports["snapshotters"] = ",".join(db.snapshotters)
    db.start()
    return db


@hookimpl
def berth_register(registry: Registry) -> None:
    registry.add(type=TYPE, id=ID, config=SqliteConfig, requires=[CONTENT_TYPE, SNAPSHOTTER_TYPE], init=init)
