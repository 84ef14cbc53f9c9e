"""Content scoped by namespace: containerd's metadata content store.

The backend (``berth.content.v1``, e.g. the local store) keeps each blob
once and knows nothing of namespaces. This layer records which namespace
holds which blob, with that namespace's labels, and is the only way
services reach content::

    content = NamespacedContent(store, backend)
    info = await content.info("k8s.io", digest)
    cs = content.namespace("k8s.io", lease="pull-1")      # a daemon.protocols.ContentStore
    w = await cs.writer("layer-sha256:...", total=size, expected=digest)

The rules, as containerd's:

* ``info``/``update``/``walk``/``reader``/``delete`` see only the
  namespace's records: a blob in the backend that the namespace has not
  recorded is NotFound there. Labels live here, never in the backend.
* ``writer(ns, ref)`` maps the namespace's ref to a backend ref
  ``<ns>/<n>/<ref>`` (recorded in ``ingests``), so two namespaces may use
  the same ref. If ``expected`` is already recorded in the namespace the
  writer is refused with AlreadyExists (the blob is added to the lease). If
  the backend already has the blob (another namespace pulled it), the writer
  *shares* it: it reports the whole blob as written, and its ``commit``
  just records the blob for this namespace, no bytes moved (containerd's
  "shared" policy); a client that honours ``offset`` just commits. Writing
  to a shared writer starts a real ingest from byte 0 (so a client that
  ignores ``offset`` and sends every byte works too); ``truncate(n)`` first
  copies the blob's first ``n`` bytes into it.
* ``commit`` records (namespace, digest, size, labels). A backend
  AlreadyExists is not an error here: the blob is recorded for this
  namespace too. The commit raises AlreadyExists only when *this*
  namespace already had the blob. Leases holding the ingest now hold the
  content, and ``lease`` (if any) too.
* ``delete`` drops the namespace's record only; the blob leaves the backend
  at the next garbage collection, if no other namespace holds it
  (``on_delete`` is called so that a :class:`~daemon.metadata.gc.GCScheduler`
  can run one soon).
* An ingest without a lease expires after :data:`INGEST_EXPIRY` seconds;
  GC then drops its record and aborts the backend ingest.

Consistency with GC: every step that creates a backend object and then
records it holds :attr:`NamespacedContent.sweep_lock` shared, so the backend
sweep of :func:`daemon.metadata.gc.collect` never sees a blob between the
two. A crash between them leaves an unrecorded blob: garbage for GC.
"""

from __future__ import annotations

import builtins
import contextlib
import dataclasses
import sqlite3
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import structlog

from daemon import filters
from daemon.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from daemon.metadata.encoding import decode_labels, encode_labels, now_ns, to_datetime
from daemon.metadata.gc import SweepLock, hold_tx, move_holds_tx, next_sequence, release_tx
from daemon.metadata.images import validate_name
from daemon.metadata.namespaces import apply_label_mask
from daemon.metadata.validate import quote, require_namespace, validate_digest, validate_labels
from daemon.protocols import ContentInfo, ContentReader, ContentStore, ContentWriter, IngestStatus

if TYPE_CHECKING:
    from daemon.metadata.store import MetadataStore

log = structlog.get_logger("berth.metadata")

#: Seconds an ingest opened without a lease is kept (containerd: 24 h).
INGEST_EXPIRY = 24 * 3600

#: Copy size when a shared blob must be turned into a real ingest.
COPY_CHUNK = 1 << 20


@dataclasses.dataclass(frozen=True)
class _Ingest:
    backend_ref: str
    expected: str
    size: int
    created_at: int


def _owner(digest: str) -> str:
    return f"content {quote(digest)}"


def _info(row: tuple[Any, ...]) -> ContentInfo:
    digest, size, labels, created, updated = row
    return ContentInfo(digest, int(size), to_datetime(created), to_datetime(updated), decode_labels(labels))


def adapt_info(info: ContentInfo) -> filters.Adaptor:
    """containerd's content filter fields: digest, size, labels.<key>."""
    return filters.adapt_mapping({"digest": info.digest, "size": str(info.size), "labels": info.labels})


class NamespacedContent:
    """A content backend scoped by namespace; every method takes the namespace first.

    :meth:`namespace` returns a :class:`ContentView`, the same thing bound to
    one namespace (and lease) that implements
    :class:`daemon.protocols.ContentStore`, for code that should not care
    about namespaces (a pull).
    """

    def __init__(
        self, store: MetadataStore, backend: ContentStore, *, on_delete: Callable[[], None] | None = None
    ) -> None:
        self.store = store
        self.backend = backend
        self.sweep_lock = SweepLock()
        self.on_delete = on_delete

    def namespace(self, namespace: str, lease: str = "") -> ContentView:
        require_namespace(namespace)
        return ContentView(self, namespace, lease)

    # -- records --------------------------------------------------------------

    async def info(self, namespace: str, digest: str) -> ContentInfo:
        """NotFound unless ``namespace`` has recorded ``digest``."""
        require_namespace(namespace)
        validate_digest("digest", digest)
        return await self.store.read(lambda conn: self._get_tx(conn, namespace, digest))

    async def update(self, namespace: str, info: ContentInfo, fieldpaths: Sequence[str] = ()) -> ContentInfo:
        """Change labels (``labels``, ``labels.<key>``; none = all labels); other paths InvalidArgument."""
        require_namespace(namespace)
        validate_digest("digest", info.digest)

        def tx(conn: sqlite3.Connection) -> ContentInfo:
            current = self._get_tx(conn, namespace, info.digest)
            labels = apply_label_mask(_owner(info.digest), current.labels, info.labels, fieldpaths)
            now = now_ns()
            conn.execute(
                "UPDATE content SET labels = ?, updated_at = ? WHERE namespace = ? AND digest = ?",
                (encode_labels(labels), now, namespace, info.digest),
            )
            return dataclasses.replace(current, labels=labels, updated_at=to_datetime(now))

        return await self.store.write(tx)

    async def walk(self, namespace: str, filters_: Sequence[str] = ()) -> AsyncIterator[ContentInfo]:
        """The namespace's content matching ``filters_`` (containerd syntax), sorted by digest."""
        require_namespace(namespace)
        matcher = filters.parse(filters_)
        rows = await self.store.read(
            lambda conn: conn.execute(
                "SELECT digest, size, labels, created_at, updated_at FROM content"
                " WHERE namespace = ? ORDER BY digest",
                (namespace,),
            ).fetchall()
        )
        for row in rows:
            info = _info(row)
            if matcher.match(adapt_info(info)):
                yield info

    async def delete(self, namespace: str, digest: str) -> None:
        """Drop the namespace's record (and its lease references); the blob goes with GC."""
        require_namespace(namespace)
        validate_digest("digest", digest)

        def tx(conn: sqlite3.Connection) -> None:
            cur = conn.execute("DELETE FROM content WHERE namespace = ? AND digest = ?", (namespace, digest))
            if cur.rowcount == 0:
                raise NotFound(f"{_owner(digest)}: not found")
            release_tx(conn, namespace, "content", digest)

        await self.store.write(tx)
        log.info("content.delete", namespace=namespace, digest=digest)
        if self.on_delete is not None:
            self.on_delete()

    async def reader(self, namespace: str, digest: str) -> ContentReader:
        await self.info(namespace, digest)
        return await self.backend.reader(digest)

    # -- ingests ---------------------------------------------------------------

    async def writer(
        self, namespace: str, ref: str, total: int = 0, expected: str = "", *, lease: str = ""
    ) -> ContentWriter:
        """Open (or resume) the namespace's ingest ``ref``; see the module docstring.

        ``lease`` (an existing lease of the namespace) holds the ingest,
        then the committed blob. Without one the ingest expires after
        :data:`INGEST_EXPIRY` and the blob is only kept if something
        references it once committed.
        """
        require_namespace(namespace)
        validate_name("ref", ref)
        if expected:
            validate_digest("expected", expected)
        if not isinstance(total, int) or total < 0:
            raise InvalidArgument(f"ingest {quote(ref)}: total must be a non-negative integer, not {total!r}")
        async with self.sweep_lock.shared():
            in_backend = 0  # the size of ``expected`` in the backend, if it is there
            if expected:
                if await self.store.write(lambda conn: self._claim_tx(conn, namespace, expected, lease)):
                    raise AlreadyExists(f"{_owner(expected)}: already exists")
                in_backend = await self._backend_size(expected)
            # share only the blob the caller means; with another total, let it write and fail on commit
            shared_size = in_backend if total in (0, in_backend) else 0
            shared = expected if shared_size else ""
            ingest = await self.store.write(
                lambda conn: self._open_ingest_tx(conn, namespace, ref, shared, shared_size, lease)
            )
            inner = None
            if not shared:
                # The backend refuses a writer announcing a blob it has: announce it only when it
                # has not, and check the announcement at commit ourselves otherwise.
                announce = "" if in_backend else expected
                try:
                    inner = await self.backend.writer(ingest.backend_ref, total, announce)
                except AlreadyExists:  # committed by someone else since we looked
                    inner = await self.backend.writer(ingest.backend_ref, total, "")
        log.debug("content.writer", namespace=namespace, ref=ref, shared=bool(shared))
        return _NamespacedWriter(
            self, namespace, ref, ingest.backend_ref, lease, inner, expected, shared_size if shared else -1
        )

    async def status(self, namespace: str, ref: str) -> IngestStatus:
        """The ingest's progress; NotFound if the namespace has no ingest ``ref``."""
        require_namespace(namespace)
        ingest = await self.store.read(lambda conn: self._ingest_tx(conn, namespace, ref))
        found = await self._status(ref, ingest)
        if found is None:
            raise NotFound(f"ingest {quote(ref)}: not found")
        return found

    async def list_statuses(
        self, namespace: str, filters_: Sequence[str] = ()
    ) -> builtins.list[IngestStatus]:
        """The namespace's ingests matching ``filters_`` (field ``ref``), sorted by ref."""
        require_namespace(namespace)
        matcher = filters.parse(filters_)

        def rows(conn: sqlite3.Connection) -> builtins.list[tuple[str, _Ingest]]:
            return [
                (ref, _Ingest(bref, expected, size, created))
                for ref, bref, expected, size, created in conn.execute(
                    "SELECT ref, backend_ref, expected, size, created_at FROM ingests"
                    " WHERE namespace = ? ORDER BY ref",
                    (namespace,),
                )
            ]

        statuses = []
        for ref, ingest in await self.store.read(rows):
            if not matcher.match(filters.adapt_mapping({"ref": ref})):
                continue
            found = await self._status(ref, ingest)
            if found is not None:
                statuses.append(found)
        return statuses

    async def abort(self, namespace: str, ref: str) -> None:
        """Cancel the ingest: the backend's partial data and the record; NotFound if unknown."""
        require_namespace(namespace)
        ingest = await self.store.read(lambda conn: self._ingest_tx(conn, namespace, ref))
        with contextlib.suppress(NotFound):  # a shared ingest, or one that never wrote
            await self.backend.abort(ingest.backend_ref)

        def tx(conn: sqlite3.Connection) -> None:
            conn.execute("DELETE FROM ingests WHERE namespace = ? AND ref = ?", (namespace, ref))
            release_tx(conn, namespace, "ingests", ref)

        await self.store.write(tx)
        log.info("content.abort", namespace=namespace, ref=ref)

    # -- internals ----------------------------------------------------------------

    def _get_tx(self, conn: sqlite3.Connection, namespace: str, digest: str) -> ContentInfo:
        row = conn.execute(
            "SELECT digest, size, labels, created_at, updated_at FROM content"
            " WHERE namespace = ? AND digest = ?",
            (namespace, digest),
        ).fetchone()
        if row is None:
            raise NotFound(f"{_owner(digest)}: not found")
        return _info(row)

    def _ingest_tx(self, conn: sqlite3.Connection, namespace: str, ref: str) -> _Ingest:
        row = conn.execute(
            "SELECT backend_ref, expected, size, created_at FROM ingests WHERE namespace = ? AND ref = ?",
            (namespace, ref),
        ).fetchone()
        if row is None:
            raise NotFound(f"ingest {quote(ref)}: not found")
        return _Ingest(*row)

    def _claim_tx(self, conn: sqlite3.Connection, namespace: str, digest: str, lease: str) -> bool:
        """True (and the blob added to ``lease``) if the namespace already has ``digest``."""
        found = conn.execute(
            "SELECT 1 FROM content WHERE namespace = ? AND digest = ?", (namespace, digest)
        ).fetchone()
        if found is None:
            return False
        hold_tx(conn, namespace, lease, "content", digest)
        return True

    def _open_ingest_tx(
        self, conn: sqlite3.Connection, namespace: str, ref: str, expected: str, size: int, lease: str
    ) -> _Ingest:
        self.store.namespaces.ensure(conn, namespace)
        hold_tx(conn, namespace, lease, "ingests", ref)
        leased = conn.execute(
            "SELECT 1 FROM lease_resources WHERE namespace = ? AND type = 'ingests' AND id = ? LIMIT 1",
            (namespace, ref),
        ).fetchone()
        now = now_ns()
        expires = None if leased else now + INGEST_EXPIRY * 1_000_000_000
        row = conn.execute(
            "SELECT backend_ref, created_at FROM ingests WHERE namespace = ? AND ref = ?", (namespace, ref)
        ).fetchone()
        if row is None:
            backend_ref = f"{namespace}/{next_sequence(conn, 'ingests')}/{ref}"
            conn.execute(
                "INSERT INTO ingests (namespace, ref, backend_ref, expected, size, expires_at, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (namespace, ref, backend_ref, expected, size, expires, now),
            )
            return _Ingest(backend_ref, expected, size, now)
        conn.execute(
            "UPDATE ingests SET expected = ?, size = ?, expires_at = ? WHERE namespace = ? AND ref = ?",
            (expected, size, expires, namespace, ref),
        )
        return _Ingest(row[0], expected, size, row[1])

    def _commit_tx(
        self,
        conn: sqlite3.Connection,
        namespace: str,
        ref: str,
        digest: str,
        size: int,
        labels: Mapping[str, str],
        lease: str,
    ) -> bool:
        """Record the blob, retire the ingest, move its lease holds; True if it was already recorded."""
        self.store.namespaces.ensure(conn, namespace)
        now = now_ns()
        cur = conn.execute(
            "INSERT INTO content (namespace, digest, size, labels, created_at, updated_at)"
            " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (namespace, digest) DO NOTHING",
            (namespace, digest, size, encode_labels(labels), now, now),
        )
        conn.execute("DELETE FROM ingests WHERE namespace = ? AND ref = ?", (namespace, ref))
        move_holds_tx(conn, namespace, ("ingests", ref), ("content", digest))
        hold_tx(conn, namespace, lease, "content", digest)
        return cur.rowcount == 0

    async def _backend_size(self, digest: str) -> int:
        try:
            return (await self.backend.info(digest)).size
        except NotFound:
            return 0

    async def _status(self, ref: str, ingest: _Ingest) -> IngestStatus | None:
        if ingest.expected:  # shared: the whole blob is there
            at = to_datetime(ingest.created_at)
            return IngestStatus(ref, ingest.size, ingest.size, ingest.expected, at, at)
        try:
            status = await self.backend.status(ingest.backend_ref)
        except NotFound:
            return None
        return dataclasses.replace(status, ref=ref)


class _NamespacedWriter:
    """A backend writer (or a shared blob) that records the commit for its namespace.

    ``announced`` is the digest given when the writer was opened: the commit
    is checked against it even when the backend could not be told.
    ``inner`` is None while the writer shares the blob ``announced`` of
    ``shared_size`` bytes.
    """

    def __init__(
        self,
        content: NamespacedContent,
        namespace: str,
        ref: str,
        backend_ref: str,
        lease: str,
        inner: ContentWriter | None,
        announced: str,
        shared_size: int,
    ) -> None:
        self.ref = ref
        self._content = content
        self._namespace = namespace
        self._backend_ref = backend_ref
        self._lease = lease
        self._inner = inner
        self._announced = announced
        self._shared_size = shared_size
        self.offset = inner.offset if inner is not None else shared_size

    async def write(self, data: bytes) -> None:
        if self._inner is None:
            if not data:
                return
            self._inner = await self._unshare(0)  # a client sending every byte: start over
        await self._inner.write(data)
        self.offset = self._inner.offset

    def digest(self) -> str:
        return self._inner.digest() if self._inner is not None else self._announced

    async def truncate(self, size: int) -> None:
        if self._inner is None:
            self._inner = await self._unshare(size)
        else:
            await self._inner.truncate(size)
        self.offset = self._inner.offset

    async def commit(self, size: int = 0, expected: str = "", labels: Mapping[str, str] | None = None) -> str:
        if expected:
            validate_digest("expected", expected)
        clean = validate_labels(f"ingest {quote(self.ref)}", labels or {})  # before anything is published
        content = self._content
        async with content.sweep_lock.shared():
            if self._inner is None:
                digest, actual = self._announced, self._shared_size
                if size and size != actual:
                    raise FailedPrecondition(
                        f"ingest {quote(self.ref)}: size {size} expected, {actual} written"
                    )
                if expected and expected != digest:
                    raise FailedPrecondition(
                        f"ingest {quote(self.ref)}: digest {expected} expected, got {digest}"
                    )
            else:
                written = self._inner.digest()  # asked first: a refused commit removes the ingest
                want = expected or self._announced
                try:
                    digest = await self._inner.commit(size, want)
                except AlreadyExists:
                    digest = want or written
                actual = (await content.backend.info(digest)).size
            existed = await content.store.write(
                lambda conn: content._commit_tx(
                    conn, self._namespace, self.ref, digest, actual, clean, self._lease
                )
            )
        log.info("content.commit", namespace=self._namespace, digest=digest, size=actual, existed=existed)
        if existed:
            raise AlreadyExists(f"{_owner(digest)}: already exists")
        return digest

    async def close(self) -> None:
        if self._inner is not None:
            await self._inner.close()

    async def _unshare(self, size: int) -> ContentWriter:
        """Turn the shared blob into a real ingest holding its first ``size`` bytes.

        The ingest record stops naming the shared blob only once the copy is
        done (until then it keeps the blob from GC); from then on status
        comes from the backend's ingest.
        """
        if not 0 <= size <= self._shared_size:
            raise InvalidArgument(f"ingest {quote(self.ref)}: truncate to {size}: outside 0..{self.offset}")
        content = self._content
        inner = await content.backend.writer(self._backend_ref, self._shared_size, "")
        try:
            if inner.offset:
                await inner.truncate(0)
            if size:
                await self._copy(inner, size)
            await content.store.write(self._stop_sharing_tx)
        except BaseException:
            await inner.close()
            raise
        return inner

    def _stop_sharing_tx(self, conn: sqlite3.Connection) -> None:
        conn.execute(
            "UPDATE ingests SET expected = '', size = 0 WHERE namespace = ? AND ref = ?",
            (self._namespace, self.ref),
        )

    async def _copy(self, inner: ContentWriter, size: int) -> None:
        reader = await self._content.backend.reader(self._announced)
        try:
            offset = 0
            while offset < size:
                chunk = await reader.read_at(offset, min(COPY_CHUNK, size - offset))
                if not chunk:
                    raise FailedPrecondition(
                        f"{_owner(self._announced)}: shorter than {size} bytes in the backend"
                    )
                await inner.write(chunk)
                offset += len(chunk)
        finally:
            await reader.close()


class ContentView:
    """:class:`NamespacedContent` bound to one namespace (and lease): a ``ContentStore``."""

    def __init__(self, content: NamespacedContent, namespace: str, lease: str = "") -> None:
        self.content = content
        self.namespace = namespace
        self.lease = lease

    async def info(self, digest: str) -> ContentInfo:
        return await self.content.info(self.namespace, digest)

    async def update(self, info: ContentInfo, fieldpaths: Sequence[str] = ()) -> ContentInfo:
        return await self.content.update(self.namespace, info, fieldpaths)

    def walk(self, filters: Sequence[str] = ()) -> AsyncIterator[ContentInfo]:
        return self.content.walk(self.namespace, filters)

    async def delete(self, digest: str) -> None:
        await self.content.delete(self.namespace, digest)

    async def reader(self, digest: str) -> ContentReader:
        return await self.content.reader(self.namespace, digest)

    async def writer(self, ref: str, total: int = 0, expected: str = "") -> ContentWriter:
        return await self.content.writer(self.namespace, ref, total, expected, lease=self.lease)

    async def status(self, ref: str) -> IngestStatus:
        return await self.content.status(self.namespace, ref)

    async def list_statuses(self, filters: Sequence[str] = ()) -> builtins.list[IngestStatus]:
        return await self.content.list_statuses(self.namespace, filters)

    async def abort(self, ref: str) -> None:
        await self.content.abort(self.namespace, ref)
