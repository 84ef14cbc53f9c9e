"""berth's metadata store: SQLite, one file under the plugin root.

Everything berth records about objects lives here, scoped by namespace as in
containerd's metadata package: namespaces, leases, images
(:mod:`~daemon.metadata.images`), containers (:mod:`~daemon.metadata.containers`),
content records over a namespace-agnostic
content store (:mod:`~daemon.metadata.content`), snapshot records over
snapshotter backends (:mod:`~daemon.metadata.snapshots`), and the garbage
collector that removes what nothing references (:mod:`~daemon.metadata.gc`).

Services hold a :class:`~daemon.metadata.db.MetadataDB` (what the
``berth.metadata.v1`` plugin returns): the store below with content and
snapshotters wrapped by namespace and the garbage collector wired in.

Using the store itself::

    store = await MetadataStore.open(root / "meta.db")
    await store.namespaces.create("k8s.io", {"owner": "kubelet"})
    await store.leases.create("k8s.io", "pull-1")
    await store.leases.add_resource("k8s.io", "pull-1", LeaseResource(id=digest, type="content"))

    # several changes in one transaction:
    def tx(conn: sqlite3.Connection) -> None:
        store.namespaces.ensure(conn, "k8s.io")
        conn.execute("INSERT INTO images ...")
    await store.write(tx)

    await store.close()

* Threading: all sqlite work runs in one dedicated thread; the event loop
  never blocks on it (see :mod:`daemon.metadata.store`).
* Schema: a linear list of migrations in :mod:`daemon.metadata.schema`,
  which also explains how to add a namespace-scoped table.
* Input rules (identifiers, labels, digests): :mod:`daemon.metadata.validate`.
"""

from daemon.metadata.containers import Container, ContainerStore, Runtime, TypedValue, container_roots
from daemon.metadata.content import ContentView, NamespacedContent
from daemon.metadata.db import MetadataDB
from daemon.metadata.gc import DEFAULT_ROOTS, GCScheduler, GCSummary, Node, RootProvider, SweepLock, collect
from daemon.metadata.images import Image, ImageStore
from daemon.metadata.leases import Lease, LeaseResource, LeaseStore
from daemon.metadata.namespaces import Namespace, NamespaceStore
from daemon.metadata.schema import LATEST_VERSION, MIGRATIONS, NAMESPACED_TABLES, Migration
from daemon.metadata.snapshots import NamespacedSnapshotter, SnapshotterView
from daemon.metadata.store import MetadataStore

__all__ = [
    "DEFAULT_ROOTS",
    "LATEST_VERSION",
    "MIGRATIONS",
    "NAMESPACED_TABLES",
    "Container",
    "ContainerStore",
    "ContentView",
    "GCScheduler",
    "GCSummary",
    "Image",
    "ImageStore",
    "Lease",
    "LeaseResource",
    "LeaseStore",
    "MetadataDB",
    "MetadataStore",
    "Migration",
    "Namespace",
    "NamespaceStore",
    "NamespacedContent",
    "NamespacedSnapshotter",
    "Node",
    "RootProvider",
    "Runtime",
    "SnapshotterView",
    "SweepLock",
    "TypedValue",
    "collect",
    "container_roots",
]
