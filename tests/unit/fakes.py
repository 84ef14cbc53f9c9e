"""In-memory backends that satisfy daemon.protocols, for testing the metadata layer.

They follow the protocols' documented error rules (NotFound, AlreadyExists,
FailedPrecondition, Unavailable for a locked ingest) and record what was
asked of them, so tests can assert what reached the backend. ``gate``
hooks let a test pause a backend call halfway to interleave it with GC.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from daemon.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, Unavailable
from daemon.protocols import ContentInfo, IngestStatus, Kind, Mount, SnapshotInfo, Usage


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def digest_as(data: bytes, like: str) -> str:
    """The digest of ``data`` with the algorithm of digest ``like`` (sha256 when empty)."""
    algorithm = like.partition(":")[0] if like else "sha256"
    return f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}"


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass
class Gate:
    """Pauses a backend call: ``reached`` is set when it gets there, it waits for ``release``."""

    reached: asyncio.Event = field(default_factory=asyncio.Event)
    release: asyncio.Event = field(default_factory=asyncio.Event)

    async def pass_(self) -> None:
        self.reached.set()
        await self.release.wait()


# -- content ------------------------------------------------------------------------


@dataclass
class _Ingest:
    data: bytearray
    total: int
    expected: str
    started_at: datetime
    updated_at: datetime


class FakeReader:
    def __init__(self, data: bytes) -> None:
        self._data = data
        self.size = len(data)
        self.closed = False

    async def read_at(self, offset: int, n: int) -> bytes:
        return self._data[offset : offset + n]

    async def close(self) -> None:
        self.closed = True


class FakeWriter:
    def __init__(self, store: FakeContentStore, ref: str) -> None:
        self._store = store
        self.ref = ref
        self.offset = len(store.ingests[ref].data)
        self._committed = ""

    def _ingest(self) -> _Ingest:
        if self._committed:
            raise FailedPrecondition(f"ingest {self.ref!r}: already committed")
        ingest = self._store.ingests.get(self.ref)
        if ingest is None:
            raise NotFound(f"ingest {self.ref!r}: not found")
        return ingest

    async def write(self, data: bytes) -> None:
        ingest = self._ingest()
        ingest.data += data
        ingest.updated_at = _now()
        self.offset = len(ingest.data)
        self._store.bytes_written += len(data)

    def digest(self) -> str:
        if self._committed:
            return self._committed
        ingest = self._ingest()
        return digest_as(bytes(ingest.data), ingest.expected)

    async def truncate(self, size: int) -> None:
        ingest = self._ingest()
        if not 0 <= size <= len(ingest.data):
            raise InvalidArgument(f"truncate size {size}: must be within 0..{len(ingest.data)}")
        del ingest.data[size:]
        self.offset = len(ingest.data)

    async def commit(self, size: int = 0, expected: str = "", labels: Mapping[str, str] | None = None) -> str:
        ingest = self._ingest()
        data = bytes(ingest.data)
        for want in (size, ingest.total):
            if want and want != len(data):
                raise FailedPrecondition(f"commit size {want} expected, {len(data)} written")
        for announced in (expected, ingest.expected):
            if announced and announced != digest_as(data, announced):
                raise FailedPrecondition(
                    f"unexpected digest {digest_as(data, announced)}, expected {announced}"
                )
        actual = digest_as(data, expected or ingest.expected)
        store = self._store
        del store.ingests[self.ref]
        store.locked.discard(self.ref)
        self._committed = actual
        if actual in store.blobs:
            raise AlreadyExists(f"content {actual}: already exists")
        store.blobs[actual] = data
        store.created[actual] = _now()
        if store.commit_gate is not None:
            await store.commit_gate.pass_()
        return actual

    async def close(self) -> None:
        self._store.locked.discard(self.ref)


class FakeContentStore:
    """Blobs in a dict; an ingest per ref, one writer at a time."""

    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}
        self.created: dict[str, datetime] = {}
        self.ingests: dict[str, _Ingest] = {}
        self.locked: set[str] = set()
        self.deleted: list[str] = []
        self.aborted: list[str] = []
        self.bytes_written = 0
        self.commit_gate: Gate | None = None

    def put(self, data: bytes) -> str:
        """A blob straight into the backend (as if left by a crash or another namespace)."""
        digest = sha256(data)
        self.blobs[digest] = data
        self.created[digest] = _now()
        return digest

    async def info(self, digest: str) -> ContentInfo:
        if digest not in self.blobs:
            raise NotFound(f"content {digest}: not found")
        at = self.created[digest]
        return ContentInfo(digest, len(self.blobs[digest]), at, at)

    async def update(self, info: ContentInfo, fieldpaths: Sequence[str] = ()) -> ContentInfo:
        return await self.info(info.digest)

    async def walk(self, filters: Sequence[str] = ()) -> AsyncIterator[ContentInfo]:
        for digest in sorted(self.blobs):
            yield await self.info(digest)

    async def delete(self, digest: str) -> None:
        if self.blobs.pop(digest, None) is None:
            raise NotFound(f"content {digest}: not found")
        self.deleted.append(digest)

    async def reader(self, digest: str) -> FakeReader:
        if digest not in self.blobs:
            raise NotFound(f"content {digest}: not found")
        return FakeReader(self.blobs[digest])

    async def writer(self, ref: str, total: int = 0, expected: str = "") -> FakeWriter:
        if ref in self.locked:
            raise Unavailable(f"ref {ref!r} locked")
        if expected in self.blobs:
            raise AlreadyExists(f"content {expected}: already exists")
        ingest = self.ingests.get(ref)
        if ingest is None:
            now = _now()
            self.ingests[ref] = _Ingest(bytearray(), total, expected, now, now)
        else:
            if total and ingest.total and total != ingest.total:
                raise FailedPrecondition(f"ingest {ref!r}: total {total} announced, {ingest.total} before")
            if expected and ingest.expected and expected != ingest.expected:
                raise FailedPrecondition(
                    f"ingest {ref!r}: digest {expected} announced, {ingest.expected} before"
                )
            ingest.total = ingest.total or total
            ingest.expected = ingest.expected or expected
        self.locked.add(ref)
        return FakeWriter(self, ref)

    async def status(self, ref: str) -> IngestStatus:
        ingest = self.ingests.get(ref)
        if ingest is None:
            raise NotFound(f"ingest {ref!r}: not found")
        return IngestStatus(
            ref, len(ingest.data), ingest.total, ingest.expected, ingest.started_at, ingest.updated_at
        )

    async def list_statuses(self, filters: Sequence[str] = ()) -> list[IngestStatus]:
        return [await self.status(ref) for ref in sorted(self.ingests)]

    async def abort(self, ref: str) -> None:
        if self.ingests.pop(ref, None) is None:
            raise NotFound(f"ingest {ref!r}: not found")
        self.locked.discard(ref)
        self.aborted.append(ref)


# -- snapshots ----------------------------------------------------------------------


class FakeSnapshotter:
    """Snapshots in a dict, with the protocol's rules on kinds, parents and children."""

    def __init__(self) -> None:
        self.snapshots: dict[str, SnapshotInfo] = {}
        self.removed: list[str] = []
        self.cleanups = 0
        self.prepare_gate: Gate | None = None
        self.fail_prepare: Exception | None = None

    def _get(self, key: str) -> SnapshotInfo:
        info = self.snapshots.get(key)
        if info is None:
            raise NotFound(f"snapshot {key!r}: not found")
        return info

    def _create(self, key: str, parent: str, labels: Mapping[str, str] | None, kind: Kind) -> list[Mount]:
        if key in self.snapshots:
            raise AlreadyExists(f"snapshot {key!r}: already exists")
        if parent and self._get(parent).kind is not Kind.COMMITTED:
            raise FailedPrecondition(f"parent {parent!r} is not committed")
        now = _now()
        self.snapshots[key] = SnapshotInfo(kind, key, parent, dict(labels or {}), now, now)
        return [Mount("bind", f"/fake/{key}", options=("ro" if kind is Kind.VIEW else "rw",))]

    async def stat(self, key: str) -> SnapshotInfo:
        return self._get(key)

    async def update(self, info: SnapshotInfo, fieldpaths: Sequence[str] = ()) -> SnapshotInfo:
        current = self._get(info.name)
        current.labels = dict(info.labels)
        return current

    async def usage(self, key: str) -> Usage:
        self._get(key)
        return Usage(inodes=len(key), size=100 * len(key))

    async def mounts(self, key: str) -> list[Mount]:
        info = self._get(key)
        if info.kind is Kind.COMMITTED:
            raise FailedPrecondition(f"snapshot {key!r} is committed")
        return [Mount("bind", f"/fake/{key}", options=("ro" if info.kind is Kind.VIEW else "rw",))]

    async def prepare(
        self, key: str, parent: str = "", labels: Mapping[str, str] | None = None
    ) -> list[Mount]:
        if self.fail_prepare is not None:
            raise self.fail_prepare
        mounts = self._create(key, parent, labels, Kind.ACTIVE)
        if self.prepare_gate is not None:
            await self.prepare_gate.pass_()
        return mounts

    async def view(self, key: str, parent: str = "", labels: Mapping[str, str] | None = None) -> list[Mount]:
        return self._create(key, parent, labels, Kind.VIEW)

    async def commit(self, name: str, key: str, labels: Mapping[str, str] | None = None) -> None:
        active = self._get(key)
        if active.kind is not Kind.ACTIVE:
            raise FailedPrecondition(f"snapshot {key!r} is not active")
        if name in self.snapshots:
            raise AlreadyExists(f"snapshot {name!r}: already exists")
        now = _now()
        self.snapshots[name] = SnapshotInfo(Kind.COMMITTED, name, active.parent, dict(labels or {}), now, now)
        del self.snapshots[key]

    async def remove(self, key: str) -> None:
        self._get(key)
        children = [k for k, info in self.snapshots.items() if info.parent == key]
        if children:
            raise FailedPrecondition(f"snapshot {key!r} has children {children}")
        del self.snapshots[key]
        self.removed.append(key)

    async def walk(self, filters: Sequence[str] = ()) -> AsyncIterator[SnapshotInfo]:
        for key in sorted(self.snapshots):
            yield self.snapshots[key]

    async def cleanup(self) -> None:
        self.cleanups += 1

    async def close(self) -> None:
        return None
