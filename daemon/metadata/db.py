"""The metadata database as services see it: containerd's ``metadata.DB``.

One object holds everything namespaced that berth records, wired together
once, so that no service can forget a step::

    db = await MetadataDB.open(root / "meta.db", content=local_store,
                               snapshotters={"overlayfs": overlay, "native": native})
    await db.images.create("k8s.io", image)           # ImageStore
    await db.containers.create("k8s.io", container)   # ContainerStore
    cs = db.content.namespace("k8s.io", lease="pull-1")  # NamespacedContent -> a ContentStore
    sn = db.snapshotter("overlayfs").namespace("k8s.io") # NamespacedSnapshotter -> a Snapshotter
    db.start()                                        # one collection soon (crash leftovers)
    ...
    await db.close()                                  # the collector, then the store

What the wiring guarantees:

* Every delete that may leave garbage (an image, a content record, a
  snapshot, a lease) asks the collector for a run: :attr:`gc` is a
  :class:`~daemon.metadata.gc.GCScheduler` that coalesces those requests
  into one collection ``gc_delay`` seconds later. ``await db.gc.run_now()``
  collects immediately (``Images.Delete(sync=true)``).
* A collection covers the content backend and *every* wrapped snapshotter:
  a backend object is only removed once no record of any namespace names it
  (see :mod:`daemon.metadata.gc` for the order and why it is crash safe).
* Containers keep their snapshot and the objects their ``gc.ref`` labels
  name (:func:`~daemon.metadata.containers.container_roots` is always a
  root provider). Other code that keeps objects alive through its own
  records adds a root provider with :meth:`add_roots` before the first
  collection can miss them, i.e. during its plugin's init.

The backends are not owned: whoever opened them closes them, after
:meth:`close` (the metadata plugin depends on them, so the registry closes
it first).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import structlog

from daemon.errors import InvalidArgument, NotFound
from daemon.metadata.containers import ContainerStore, container_roots
from daemon.metadata.content import NamespacedContent
from daemon.metadata.gc import DEFAULT_ROOTS, GCScheduler, GCSummary, RootProvider, collect
from daemon.metadata.images import ImageStore
from daemon.metadata.leases import LeaseStore
from daemon.metadata.namespaces import NamespaceStore
from daemon.metadata.snapshots import NamespacedSnapshotter
from daemon.metadata.store import MetadataStore
from daemon.metadata.validate import quote
from daemon.protocols import ContentStore, Snapshotter

log = structlog.get_logger("berth.metadata")

#: Seconds between the first request for a collection and its start.
DEFAULT_GC_DELAY = 1.0


class MetadataDB:
    """The metadata store with its content and snapshotters wrapped by namespace, and its collector.

    Attributes: :attr:`store` (the :class:`MetadataStore`), :attr:`namespaces`,
    :attr:`leases`, :attr:`images`, :attr:`containers`, :attr:`content`, :attr:`snapshotters`
    (wrapped snapshotters by id) and :attr:`gc`.
    """

    def __init__(
        self,
        store: MetadataStore,
        content: ContentStore,
        snapshotters: Mapping[str, Snapshotter],
        *,
        gc_delay: float = DEFAULT_GC_DELAY,
        roots: Sequence[RootProvider] = DEFAULT_ROOTS,
    ) -> None:
        if gc_delay < 0:
            raise InvalidArgument(f"gc_delay {gc_delay!r}: must not be negative")
        self.store = store
        self.namespaces: NamespaceStore = store.namespaces
        self.leases: LeaseStore = store.leases
        self.images = ImageStore(store, on_delete=self.request_gc)
        self.containers = ContainerStore(store, on_delete=self.request_gc)
        self.content = NamespacedContent(store, content, on_delete=self.request_gc)
        self.snapshotters: dict[str, NamespacedSnapshotter] = {
            name: NamespacedSnapshotter(store, name, backend, on_remove=self.request_gc)
            for name, backend in sorted(snapshotters.items())
        }
        # A container keeps its snapshot and what its gc.ref labels name, whatever ``roots`` says.
        self._roots: list[RootProvider] = [*roots, container_roots]
        self.gc = GCScheduler(self.collect, delay=gc_delay)

    @classmethod
    async def open(
        cls,
        path: Path,
        content: ContentStore,
        snapshotters: Mapping[str, Snapshotter],
        *,
        synchronous: str = "full",
        gc_delay: float = DEFAULT_GC_DELAY,
    ) -> MetadataDB:
        """Open (and migrate) the database at ``path`` and wrap the backends."""
        if gc_delay < 0:  # before anything is opened
            raise InvalidArgument(f"gc_delay {gc_delay!r}: must not be negative")
        store = await MetadataStore.open(path, synchronous=synchronous)
        return cls(store, content, snapshotters, gc_delay=gc_delay)

    @property
    def path(self) -> Path:
        return self.store.path

    def snapshotter(self, name: str) -> NamespacedSnapshotter:
        """The wrapped snapshotter ``name``; InvalidArgument if empty, NotFound if not loaded."""
        if not name:
            raise InvalidArgument("snapshotter: must not be empty")
        found = self.snapshotters.get(name)
        if found is None:
            loaded = ", ".join(self.snapshotters) or "none"
            raise NotFound(f"snapshotter {quote(name)}: not loaded (loaded: {loaded})")
        return found

    def add_roots(self, *providers: RootProvider) -> None:
        """Add root providers (objects some other table keeps) to every later collection."""
        self._roots.extend(providers)

    def request_gc(self) -> None:
        """Ask for a collection soon (cheap; coalesced). Needs a running event loop."""
        self.gc.request()

    async def collect(self) -> GCSummary:
        """One collection now, over content and every snapshotter (the scheduler calls this)."""
        return await collect(
            self.store,
            content=self.content,
            snapshotters=list(self.snapshotters.values()),
            roots=tuple(self._roots),
        )

    def start(self) -> None:
        """Request the startup collection: what a crash left without records goes."""
        self.gc.request()

    async def close(self) -> None:
        """Stop the collector (a pending run is cancelled), then close the store. Idempotent."""
        await self.gc.close()
        await self.store.close()
        log.debug("metadata.db.closed", path=str(self.store.path))
