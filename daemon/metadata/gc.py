"""Garbage collection of content and snapshots: containerd's metadata GC, mark and sweep.

What is kept (the *roots*, and everything reachable from them):

* every image: its target blob, and the image's own ``gc.ref`` labels;
* every lease that has not expired: the content digests, ingests and
  ``snapshots/<snapshotter>`` keys it holds. A lease whose
  ``containerd.io/gc.expire`` label (RFC 3339) is in the past is no root:
  GC deletes it, and what only it held goes too;
* content and snapshots labelled ``containerd.io/gc.root``;
* ingests without a lease until their ``expires_at`` (a day after they were
  opened, as in containerd);
* whatever the extra *root providers* passed to :func:`collect` yield (the
  containers table adds one: a container keeps its snapshot and the content
  its labels name).

Edges (how reachability spreads), as containerd defines them:

* an image -> its target content;
* any object's label ``containerd.io/gc.ref.content`` (or
  ``...content.<name>``, ``...content/<name>``) = digest -> that content in
  the same namespace; that is how a manifest keeps its config and layers
  and an index its manifests;
* any object's label ``containerd.io/gc.ref.snapshot.<snapshotter>`` = key
  -> that snapshot; that is how an image config keeps its unpacked chain;
* a snapshot -> its parent; an ingest -> the blob it is sharing (``expected``).

Nothing crosses namespaces: an edge always points into the namespace of its
source.

Order of work, and why it is crash safe (records before backends):

1. *Mark and sweep the records*, in one metadata write transaction (the
   database's write lock is held throughout, so a pull adding objects under
   a lease either committed before, and is seen with its lease, or waits and
   commits after): delete expired leases, mark from the roots, delete the
   unmarked content, snapshot and ingest records of every namespace. One
   transaction: after a crash it happened entirely or not at all.
2. *Sweep each backend* under its :class:`SweepLock`, taken exclusively:
   read again which backend objects any record still names, then delete the
   backend blobs, abort the backend ingests and remove the backend
   snapshots (children before parents) that no record names; then the
   snapshotter's ``cleanup()``. Mutators hold the same lock shared from
   the moment they create a backend object until its record is committed,
   so the sweep never sees a fresh object without its record.

A backend object is only ever deleted when no record names it, and records
are always deleted first, so a crash anywhere leaves at worst backend
objects without records: garbage that the next collection removes (so the
daemon should request one at startup). The reverse, a record naming a deleted backend object,
cannot come from GC.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Protocol

import structlog

from daemon.errors import BerthError, NotFound
from daemon.metadata.encoding import decode_labels, from_datetime, now_ns
from daemon.metadata.validate import quote

if TYPE_CHECKING:
    from daemon.metadata.store import MetadataStore
    from daemon.protocols import ContentStore, Snapshotter

log = structlog.get_logger("berth.metadata")

LABEL_GC_ROOT = "containerd.io/gc.root"
LABEL_GC_EXPIRE = "containerd.io/gc.expire"
LABEL_GC_REF_CONTENT = "containerd.io/gc.ref.content"
LABEL_GC_REF_SNAPSHOT = "containerd.io/gc.ref.snapshot."
LABEL_GC_REF_IMAGE = "containerd.io/gc.ref.image"

#: Node types. A snapshot node's key is ``<snapshotter>/<key>``.
CONTENT = "content"
SNAPSHOT = "snapshot"
INGEST = "ingest"
IMAGE = "image"


# -- the sweep lock --------------------------------------------------------------


class SweepLock:
    """Many mutators, or one backend sweep; a waiting sweep goes before new mutators.

    Content writers and snapshotter mutations hold it *shared* from the
    moment they create a backend object until the record naming it is
    committed; the backend sweep of :func:`collect` holds it *exclusive*.
    Waiters are served in order, so a stream of pulls cannot starve GC.
    Cancelling a waiter is safe. asyncio only: one event loop.
    """

    def __init__(self) -> None:
        self._shared = 0
        self._exclusive = False
        self._waiters: collections.deque[tuple[bool, asyncio.Future[None]]] = collections.deque()

    @property
    def waiting(self) -> int:
        """How many tasks wait for the lock (for metrics and tests)."""
        return sum(1 for _, waiter in self._waiters if not waiter.done())

    @asynccontextmanager
    async def shared(self) -> AsyncIterator[None]:
        await self._acquire(exclusive=False)
        try:
            yield
        finally:
            self._release(exclusive=False)

    @asynccontextmanager
    async def exclusive(self) -> AsyncIterator[None]:
        await self._acquire(exclusive=True)
        try:
            yield
        finally:
            self._release(exclusive=True)

    def _free_for(self, exclusive: bool) -> bool:
        if exclusive:
            return not self._exclusive and self._shared == 0
        return not self._exclusive

    def _take(self, exclusive: bool) -> None:
        if exclusive:
            self._exclusive = True
        else:
            self._shared += 1

    async def _acquire(self, exclusive: bool) -> None:
        if not self._waiters and self._free_for(exclusive):
            self._take(exclusive)
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((exclusive, waiter))
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():  # granted, then cancelled: give it back
                self._release(exclusive)
            else:
                self._wake()  # we may have been blocking the head of the queue
            raise

    def _release(self, exclusive: bool) -> None:
        if exclusive:
            self._exclusive = False
        else:
            self._shared -= 1
        self._wake()

    def _wake(self) -> None:
        while self._waiters:
            exclusive, waiter = self._waiters[0]
            if waiter.done():  # cancelled while waiting
                self._waiters.popleft()
                continue
            if not self._free_for(exclusive):
                return
            self._waiters.popleft()
            self._take(exclusive)
            waiter.set_result(None)
            if exclusive:
                return


# -- helpers shared by the namespaced stores --------------------------------------


def next_sequence(conn: sqlite3.Connection, name: str) -> int:
    """The next value of counter ``name`` (1, 2, ...); never repeats, even across crashes."""
    row = conn.execute(
        "INSERT INTO sequences (name, value) VALUES (?, 1)"
        " ON CONFLICT (name) DO UPDATE SET value = value + 1 RETURNING value",
        (name,),
    ).fetchone()
    return int(row[0])


def hold_tx(conn: sqlite3.Connection, namespace: str, lease: str, type_: str, id_: str) -> None:
    """Add a resource to ``lease`` (no-op for ``lease == ""``); NotFound if the lease does not exist."""
    if not lease:
        return
    found = conn.execute("SELECT 1 FROM leases WHERE namespace = ? AND id = ?", (namespace, lease)).fetchone()
    if found is None:
        raise NotFound(f"lease {quote(lease)}: not found")
    conn.execute(
        "INSERT INTO lease_resources (namespace, lease_id, type, id) VALUES (?, ?, ?, ?)"
        " ON CONFLICT DO NOTHING",
        (namespace, lease, type_, id_),
    )


def move_holds_tx(
    conn: sqlite3.Connection, namespace: str, old: tuple[str, str], new: tuple[str, str]
) -> None:
    """Every lease of ``namespace`` holding resource ``old`` (type, id) now holds ``new`` instead.

    Used when an object changes name: an ingest becomes content on commit,
    an active snapshot becomes a committed one.
    """
    conn.execute(
        "INSERT INTO lease_resources (namespace, lease_id, type, id)"
        " SELECT namespace, lease_id, ?, ? FROM lease_resources WHERE namespace = ? AND type = ? AND id = ?"
        " ON CONFLICT DO NOTHING",
        (new[0], new[1], namespace, old[0], old[1]),
    )
    release_tx(conn, namespace, *old)


def release_tx(conn: sqlite3.Connection, namespace: str, type_: str, id_: str) -> None:
    """Drop resource (type, id) from every lease of ``namespace``: the object is gone."""
    conn.execute(
        "DELETE FROM lease_resources WHERE namespace = ? AND type = ? AND id = ?", (namespace, type_, id_)
    )


# -- the graph ---------------------------------------------------------------------


@dataclass(frozen=True)
class Node:
    """One collectible object: ``type`` (:data:`CONTENT`, :data:`SNAPSHOT`, ...), namespace, key."""

    type: str
    namespace: str
    key: str


#: A root provider: ``(conn, now_ns) -> nodes`` that must be kept, read inside
#: the collection's transaction. Yield the objects your records keep alive
#: (for labels, :func:`label_refs` turns ``gc.ref`` labels into nodes).
RootProvider = Callable[[sqlite3.Connection, int], Iterable[Node]]


def label_refs(namespace: str, labels: Mapping[str, str]) -> list[Node]:
    """The nodes an object's ``containerd.io/gc.ref.*`` labels point to."""
    refs: list[Node] = []
    for key, value in labels.items():
        if not value:
            continue
        if _is_ref(key, LABEL_GC_REF_CONTENT):
            refs.append(Node(CONTENT, namespace, value))
        elif key.startswith(LABEL_GC_REF_SNAPSHOT):
            snapshotter = key[len(LABEL_GC_REF_SNAPSHOT) :].split("/", 1)[0]
            if snapshotter:
                refs.append(Node(SNAPSHOT, namespace, f"{snapshotter}/{value}"))
        elif _is_ref(key, LABEL_GC_REF_IMAGE):
            refs.append(Node(IMAGE, namespace, value))
    return refs


def _is_ref(key: str, prefix: str) -> bool:
    # containerd: the bare key, or the key followed by "." or "/" and any name
    return key == prefix or (key.startswith(prefix) and key[len(prefix)] in "./")


def image_roots(conn: sqlite3.Connection, now: int) -> Iterable[Node]:
    for namespace, name in conn.execute("SELECT namespace, name FROM images"):
        yield Node(IMAGE, namespace, name)


def lease_roots(conn: sqlite3.Connection, now: int) -> Iterable[Node]:
    """What the leases hold; expired leases are deleted before this runs."""
    for namespace, type_, id_ in conn.execute("SELECT namespace, type, id FROM lease_resources"):
        if type_ == "content":
            yield Node(CONTENT, namespace, id_)
        elif type_ == "ingests":
            yield Node(INGEST, namespace, id_)
        elif type_.startswith("snapshots/"):
            yield Node(SNAPSHOT, namespace, f"{type_[len('snapshots/') :]}/{id_}")


def labelled_roots(conn: sqlite3.Connection, now: int) -> Iterable[Node]:
    """Content and snapshots carrying ``containerd.io/gc.root``."""
    path = f'$."{LABEL_GC_ROOT}"'
    for namespace, digest in conn.execute(
        "SELECT namespace, digest FROM content WHERE json_extract(labels, ?) IS NOT NULL", (path,)
    ):
        yield Node(CONTENT, namespace, digest)
    for namespace, snapshotter, key in conn.execute(
        "SELECT namespace, snapshotter, key FROM snapshots WHERE json_extract(labels, ?) IS NOT NULL", (path,)
    ):
        yield Node(SNAPSHOT, namespace, f"{snapshotter}/{key}")


def ingest_roots(conn: sqlite3.Connection, now: int) -> Iterable[Node]:
    """Ingests without a lease live until they expire."""
    for namespace, ref in conn.execute(
        "SELECT namespace, ref FROM ingests WHERE expires_at IS NOT NULL AND expires_at > ?", (now,)
    ):
        yield Node(INGEST, namespace, ref)


#: The built-in roots. Pass ``roots=(*DEFAULT_ROOTS, my_provider)`` to add some.
DEFAULT_ROOTS: tuple[RootProvider, ...] = (image_roots, lease_roots, labelled_roots, ingest_roots)


def parse_expiry(value: str) -> int | None:
    """An RFC 3339 ``gc.expire`` value as stored nanoseconds; None if unparseable (then ignored)."""
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return from_datetime(when)


class _Graph:
    """Every collectible record of the database, loaded once per collection."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.content: dict[tuple[str, str], dict[str, str]] = {
            (ns, digest): decode_labels(labels)
            for ns, digest, labels in conn.execute("SELECT namespace, digest, labels FROM content")
        }
        self.snapshots: dict[tuple[str, str], tuple[str | None, dict[str, str]]] = {
            (ns, f"{sn}/{key}"): (parent, decode_labels(labels))
            for ns, sn, key, parent, labels in conn.execute(
                "SELECT namespace, snapshotter, key, parent, labels FROM snapshots"
            )
        }
        self.images: dict[tuple[str, str], tuple[str, dict[str, str]]] = {
            (ns, name): (digest, decode_labels(labels))
            for ns, name, digest, labels in conn.execute(
                "SELECT namespace, name, target_digest, labels FROM images"
            )
        }
        self.ingests: dict[tuple[str, str], str] = {
            (ns, ref): expected
            for ns, ref, expected in conn.execute("SELECT namespace, ref, expected FROM ingests")
        }

    def references(self, node: Node) -> list[Node]:
        ident = (node.namespace, node.key)
        if node.type == CONTENT:
            labels = self.content.get(ident)
            return label_refs(node.namespace, labels) if labels else []
        if node.type == SNAPSHOT:
            snapshot = self.snapshots.get(ident)
            if snapshot is None:
                return []
            parent, labels = snapshot
            refs = label_refs(node.namespace, labels)
            if parent:
                snapshotter = node.key.split("/", 1)[0]
                refs.append(Node(SNAPSHOT, node.namespace, f"{snapshotter}/{parent}"))
            return refs
        if node.type == IMAGE:
            image = self.images.get(ident)
            if image is None:
                return []
            target, labels = image
            return [Node(CONTENT, node.namespace, target), *label_refs(node.namespace, labels)]
        if node.type == INGEST:
            expected = self.ingests.get(ident)
            return [Node(CONTENT, node.namespace, expected)] if expected else []
        return []

    def mark(self, roots: Iterable[Node]) -> set[Node]:
        marked: set[Node] = set()
        pending = collections.deque(roots)
        while pending:
            node = pending.popleft()
            if node in marked:
                continue
            marked.add(node)
            pending.extend(ref for ref in self.references(node) if ref not in marked)
        return marked


# -- collection ------------------------------------------------------------------------


class SweepableContent(Protocol):
    """What :func:`collect` needs of :class:`daemon.metadata.content.NamespacedContent`."""

    backend: ContentStore
    sweep_lock: SweepLock


class SweepableSnapshotter(Protocol):
    """What :func:`collect` needs of :class:`daemon.metadata.snapshots.NamespacedSnapshotter`."""

    name: str
    backend: Snapshotter
    sweep_lock: SweepLock


@dataclass
class GCSummary:
    """What one collection did. ``*_records``: metadata rows deleted; the rest: backend work."""

    leases_expired: int = 0
    content_records: int = 0
    snapshot_records: int = 0
    ingest_records: int = 0
    blobs_removed: int = 0
    bytes_freed: int = 0
    ingests_aborted: int = 0
    snapshots_removed: int = 0
    duration: float = 0.0
    errors: list[str] = field(default_factory=list)


def _expire_leases(conn: sqlite3.Connection, now: int) -> int:
    expired = []
    for namespace, id_, value in conn.execute(
        "SELECT namespace, id, json_extract(labels, ?) FROM leases WHERE json_extract(labels, ?) IS NOT NULL",
        (f'$."{LABEL_GC_EXPIRE}"', f'$."{LABEL_GC_EXPIRE}"'),
    ).fetchall():
        when = parse_expiry(str(value))
        if when is None:
            log.info("gc.lease.bad_expiry", namespace=namespace, lease=id_, value=value)
        elif when < now:
            expired.append((namespace, id_))
    conn.executemany("DELETE FROM leases WHERE namespace = ? AND id = ?", expired)
    for namespace, id_ in expired:
        log.info("gc.lease.expired", namespace=namespace, lease=id_)
    return len(expired)


def _mark_and_sweep_records(
    conn: sqlite3.Connection, roots: Sequence[RootProvider], now: int, summary: GCSummary
) -> None:
    summary.leases_expired = _expire_leases(conn, now)
    graph = _Graph(conn)
    seeds: list[Node] = []
    for provider in roots:
        seeds.extend(provider(conn, now))
    marked = graph.mark(seeds)

    dead_content = [k for k in graph.content if Node(CONTENT, *k) not in marked]
    conn.executemany("DELETE FROM content WHERE namespace = ? AND digest = ?", dead_content)
    summary.content_records = len(dead_content)

    dead_snapshots = [
        (ns, *key.split("/", 1)) for ns, key in graph.snapshots if Node(SNAPSHOT, ns, key) not in marked
    ]
    conn.executemany(
        "DELETE FROM snapshots WHERE namespace = ? AND snapshotter = ? AND key = ?", dead_snapshots
    )
    summary.snapshot_records = len(dead_snapshots)

    dead_ingests = [k for k in graph.ingests if Node(INGEST, *k) not in marked]
    conn.executemany("DELETE FROM ingests WHERE namespace = ? AND ref = ?", dead_ingests)
    summary.ingest_records = len(dead_ingests)

    for ns, digest in dead_content:
        log.debug("gc.content.record", namespace=ns, digest=digest)
    for ns, sn, key in dead_snapshots:
        log.debug("gc.snapshot.record", namespace=ns, snapshotter=sn, key=key)


def _content_in_use(conn: sqlite3.Connection) -> tuple[set[str], set[str]]:
    """Digests any namespace records or shares through an ingest; backend refs of all ingests."""
    blobs = {row[0] for row in conn.execute("SELECT DISTINCT digest FROM content")}
    blobs.update(row[0] for row in conn.execute("SELECT DISTINCT expected FROM ingests WHERE expected != ''"))
    refs = {row[0] for row in conn.execute("SELECT backend_ref FROM ingests")}
    return blobs, refs


async def _sweep_content(store: MetadataStore, content: SweepableContent, summary: GCSummary) -> None:
    backend = content.backend
    async with content.sweep_lock.exclusive():
        blobs, refs = await store.read(_content_in_use)
        infos = [info async for info in backend.walk()]
        for info in infos:
            if info.digest in blobs:
                continue
            try:
                await backend.delete(info.digest)
            except NotFound:
                continue
            except BerthError as exc:
                summary.errors.append(f"content {info.digest}: {exc}")
                log.warning("gc.content.delete_failed", digest=info.digest, error=str(exc))
                continue
            summary.blobs_removed += 1
            summary.bytes_freed += info.size
            log.debug("gc.content.blob", digest=info.digest, size=info.size)
        for status in await backend.list_statuses():
            if status.ref in refs:
                continue
            try:
                await backend.abort(status.ref)
            except NotFound:
                continue
            except BerthError as exc:
                summary.errors.append(f"ingest {status.ref}: {exc}")
                log.warning("gc.ingest.abort_failed", ref=status.ref, error=str(exc))
                continue
            summary.ingests_aborted += 1
            log.debug("gc.ingest.aborted", ref=status.ref)


async def _sweep_snapshotter(store: MetadataStore, sn: SweepableSnapshotter, summary: GCSummary) -> None:
    def recorded(conn: sqlite3.Connection) -> set[str]:
        rows = conn.execute("SELECT backend_key FROM snapshots WHERE snapshotter = ?", (sn.name,))
        return {row[0] for row in rows}

    async with sn.sweep_lock.exclusive():
        keep = await store.read(recorded)
        infos = {info.name: info async for info in sn.backend.walk()}

        def depth(name: str) -> int:
            seen = 0
            parent = infos[name].parent
            while parent in infos and seen <= len(infos):
                seen += 1
                parent = infos[parent].parent
            return seen

        for name in sorted((n for n in infos if n not in keep), key=depth, reverse=True):
            try:
                await sn.backend.remove(name)
            except NotFound:
                continue
            except BerthError as exc:  # a child we keep, or a backend failure: next time
                summary.errors.append(f"snapshot {sn.name}/{name}: {exc}")
                log.warning("gc.snapshot.remove_failed", snapshotter=sn.name, key=name, error=str(exc))
                continue
            summary.snapshots_removed += 1
            log.debug("gc.snapshot.removed", snapshotter=sn.name, key=name)
    try:
        await sn.backend.cleanup()
    except BerthError as exc:
        summary.errors.append(f"snapshotter {sn.name}: cleanup: {exc}")
        log.warning("gc.snapshot.cleanup_failed", snapshotter=sn.name, error=str(exc))


async def collect(
    store: MetadataStore,
    *,
    content: SweepableContent | None = None,
    snapshotters: Sequence[SweepableSnapshotter] = (),
    roots: Sequence[RootProvider] = DEFAULT_ROOTS,
    now: datetime | None = None,
) -> GCSummary:
    """Run one collection (see the module docstring) and say what it removed.

    ``content`` and ``snapshotters`` are the namespaced stores whose
    backends are swept; records of every snapshotter are swept either way.
    ``roots`` replaces the root providers (extend :data:`DEFAULT_ROOTS`,
    never drop from it). ``now`` is for tests of expiry. Failures to delete
    single backend objects are logged and listed in ``errors`` (the next
    run retries); database errors raise.
    """
    started = time.monotonic()
    at = from_datetime(now) if now is not None else now_ns()
    summary = GCSummary()
    await store.write(lambda conn: _mark_and_sweep_records(conn, roots, at, summary))
    if content is not None:
        await _sweep_content(store, content, summary)
    for sn in snapshotters:
        await _sweep_snapshotter(store, sn, summary)
    summary.duration = time.monotonic() - started
    log.info(
        "gc.done",
        leases_expired=summary.leases_expired,
        content_records=summary.content_records,
        snapshot_records=summary.snapshot_records,
        ingest_records=summary.ingest_records,
        blobs_removed=summary.blobs_removed,
        bytes_freed=summary.bytes_freed,
        snapshots_removed=summary.snapshots_removed,
        errors=len(summary.errors),
        duration=round(summary.duration, 6),
    )
    return summary


# -- scheduling ----------------------------------------------------------------------


class GCScheduler:
    """Coalesces "collect soon" requests into few collections.

    :meth:`request` (synchronous, cheap: call it after every delete) starts a
    collection ``delay`` seconds later; requests arriving before it starts
    join it, requests arriving while it runs cause exactly one more run.
    Collections never overlap. :meth:`run_now` collects immediately (the
    "synchronous delete" of containerd's images service). A failed
    collection is logged; the next request retries. Wiring::

        scheduler = GCScheduler(lambda: collect(store, content=cs, snapshotters=[overlay]))
        images.on_delete = cs.on_delete = overlay.on_remove = scheduler.request
    """

    def __init__(self, run: Callable[[], Awaitable[GCSummary]], *, delay: float = 1.0) -> None:
        self._run = run
        self.delay = delay
        self._dirty = False
        self._task: asyncio.Task[None] | None = None
        self._running = asyncio.Lock()
        self.last: GCSummary | None = None
        self.runs = 0

    def request(self) -> None:
        self._dirty = True
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="berth-gc")

    @property
    def pending(self) -> bool:
        """A collection is requested or running."""
        return self._task is not None and not self._task.done()

    async def run_now(self) -> GCSummary:
        """Collect now (after a collection already running) and return its summary."""
        async with self._running:
            self._dirty = False  # this run covers every request made before it started
            summary = await self._run()
            self.last = summary
            self.runs += 1
            return summary

    async def wait_idle(self) -> None:
        """Return once no collection is requested or running (for shutdown and tests)."""
        while self._task is not None and not self._task.done():
            await asyncio.wait({self._task})

    async def close(self) -> None:
        """Cancel a pending collection; a running one is cancelled between backend steps."""
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _loop(self) -> None:
        while self._dirty:
            await asyncio.sleep(self.delay)
            if not self._dirty:
                continue  # a run_now covered it
            try:
                await self.run_now()
            except Exception as exc:  # noqa: BLE001 - logged; the next request retries
                log.error("gc.failed", error=str(exc), error_type=type(exc).__name__)


__all__ = [
    "CONTENT",
    "DEFAULT_ROOTS",
    "IMAGE",
    "INGEST",
    "SNAPSHOT",
    "GCScheduler",
    "GCSummary",
    "Node",
    "RootProvider",
    "SweepLock",
    "collect",
    "label_refs",
]
