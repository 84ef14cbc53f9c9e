"""The interfaces plugins implement and consume, in one place.

Implementations live in ``plugins/`` (one folder each) and in third-party
packages; consumers get them from the registry (``ic.get(type)``) and code
against these protocols only. Every implementation of a protocol runs the
same conformance suite (``daemon.testsuite``).

Errors are always those of :mod:`daemon.errors` (NotFound, AlreadyExists,
FailedPrecondition, InvalidArgument, Unavailable ...), never OSError.

Plugin types: ``berth.content.v1`` -> :class:`ContentStore`,
``berth.snapshotter.v1`` -> :class:`Snapshotter`, ``berth.diff.v1`` ->
:class:`Applier`.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol, runtime_checkable

# -- shared data -------------------------------------------------------------


@dataclass(frozen=True)
class Descriptor:
    """An OCI content descriptor: what a blob is, how big, and its digest."""

    media_type: str
    digest: str
    size: int
    annotations: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Mount:
    """One mount(2) call, as containerd describes it (``types.Mount``).

    ``type`` is ``bind`` or ``overlay`` for the built-ins; ``options`` are
    mount options (``ro``, ``rbind``, ``lowerdir=...``, ``upperdir=...``,
    ``workdir=...``). ``target`` is usually empty: the consumer picks it.
    """

    type: str
    source: str
    target: str = ""
    options: tuple[str, ...] = ()


# -- content -----------------------------------------------------------------


@dataclass
class ContentInfo:
    digest: str
    size: int
    created_at: datetime
    updated_at: datetime
    labels: dict[str, str] = field(default_factory=dict)


@dataclass
class IngestStatus:
    """A write in progress, resumable from ``offset``."""

    ref: str
    offset: int
    total: int
    expected: str
    started_at: datetime
    updated_at: datetime


class ContentReader(Protocol):
    size: int

    async def read_at(self, offset: int, n: int) -> bytes:
        """Up to ``n`` bytes from ``offset``; fewer only at the end of the blob."""
        ...

    async def close(self) -> None: ...


class ContentWriter(Protocol):
    """One ingest, held exclusively (a second writer on the ref is refused).

    Bytes appended with :meth:`write` are durable on disk as written (a crash
    leaves them for a later writer to resume from :attr:`offset`); nothing is
    visible as content until :meth:`commit` verifies size and digest and
    renames the blob into place atomically.
    """

    ref: str
    offset: int

    async def write(self, data: bytes) -> None: ...

    def digest(self) -> str:
        """Digest of the bytes written so far (``sha256:<hex>``)."""
        ...

    async def truncate(self, size: int) -> None:
        """Drop everything after ``size`` (0 restarts the ingest)."""
        ...

    async def commit(self, size: int = 0, expected: str = "", labels: Mapping[str, str] | None = None) -> str:
        """Verify (``size`` and ``expected`` when non-zero/non-empty) and publish; the digest.

        Mismatch: FailedPrecondition naming expected and actual, nothing
        committed, the ingest kept. Already present: AlreadyExists (the
        ingest is removed; callers treat it as success).
        """
        ...

    async def close(self) -> None:
        """Release the ref's lock; the ingest stays for resumption."""
        ...


@runtime_checkable
class ContentStore(Protocol):
    """Content-addressed blobs, plus resumable ingests.

    The local store is namespace-agnostic; the metadata layer scopes it to
    namespaces and keeps labels, exactly as containerd's metadata/content does.
    """

    async def info(self, digest: str) -> ContentInfo: ...

    async def update(self, info: ContentInfo, fieldpaths: Sequence[str] = ()) -> ContentInfo: ...

    def walk(self, filters: Sequence[str] = ()) -> AsyncIterator[ContentInfo]: ...

    async def delete(self, digest: str) -> None: ...

    async def reader(self, digest: str) -> ContentReader: ...

    async def writer(self, ref: str, total: int = 0, expected: str = "") -> ContentWriter:
        """Open (or resume) the ingest ``ref``. Unavailable("ref ... locked") if held."""
        ...

    async def status(self, ref: str) -> IngestStatus: ...

    async def list_statuses(self, filters: Sequence[str] = ()) -> list[IngestStatus]: ...

    async def abort(self, ref: str) -> None: ...


# -- snapshots ---------------------------------------------------------------


class Kind(enum.IntEnum):
    """Snapshot kinds, numbered as containerd's ``snapshots.Kind`` on the wire."""

    UNKNOWN = 0
    VIEW = 1
    ACTIVE = 2
    COMMITTED = 3


@dataclass
class SnapshotInfo:
    kind: Kind
    name: str
    parent: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    created_at: datetime | None = None
    updated_at: datetime | None = None


@dataclass(frozen=True)
class Usage:
    inodes: int = 0
    size: int = 0


@runtime_checkable
class Snapshotter(Protocol):
    """Layered filesystems for containers, the way containerd defines them.

    How an image is unpacked (layer by layer)::

        mounts = await sn.prepare("extract-1", parent="")       # an empty active snapshot
        await applier.apply(layer1, mounts, stream)             # write the layer into it
        await sn.commit("sha256:<chainid1>", "extract-1")       # freeze it under its chain id
        mounts = await sn.prepare("extract-2", parent="sha256:<chainid1>")
        ...                                                     # and so on for each layer

    How a container runs on top::

        mounts = await sn.prepare("ctr-rootfs", parent="sha256:<chainidN>")
        # mount ``mounts`` at the bundle's rootfs; the container writes there
        await sn.remove("ctr-rootfs")                           # when the container is deleted

    Keys and names share one space. ``prepare`` makes an ACTIVE (writable)
    snapshot, ``view`` a VIEW (read-only, never committable), ``commit`` turns
    an ACTIVE into a COMMITTED one under a new name and removes the active key.
    Only COMMITTED snapshots can be parents. ``remove`` refuses a snapshot that
    is the parent of another (FailedPrecondition). ``mounts`` may be called
    again for an ACTIVE or VIEW key. ``cleanup`` deletes on-disk leftovers of
    removed snapshots (removal itself only drops the record, fast).
    Implementations must survive a crash at any point without corrupting a
    committed snapshot.
    """

    async def stat(self, key: str) -> SnapshotInfo: ...

    async def update(self, info: SnapshotInfo, fieldpaths: Sequence[str] = ()) -> SnapshotInfo:
        """Change labels only (``labels`` or ``labels.<key>`` field paths)."""
        ...

    async def usage(self, key: str) -> Usage: ...

    async def mounts(self, key: str) -> list[Mount]: ...

    async def prepare(
        self, key: str, parent: str = "", labels: Mapping[str, str] | None = None
    ) -> list[Mount]: ...

    async def view(
        self, key: str, parent: str = "", labels: Mapping[str, str] | None = None
    ) -> list[Mount]: ...

    async def commit(self, name: str, key: str, labels: Mapping[str, str] | None = None) -> None: ...

    async def remove(self, key: str) -> None: ...

    def walk(self, filters: Sequence[str] = ()) -> AsyncIterator[SnapshotInfo]: ...

    async def cleanup(self) -> None: ...

    async def close(self) -> None: ...


# -- diff --------------------------------------------------------------------


class ByteStream(Protocol):
    """An async source of bytes (an aiohttp body, a content reader, a file)."""

    async def read(self, n: int = -1) -> bytes: ...


@runtime_checkable
class Applier(Protocol):
    """Applies a layer (an OCI/Docker tar, possibly compressed) onto mounts.

    The mounts are those of an ACTIVE snapshot. The applier never lets an
    entry land outside them. It returns the descriptor of the *uncompressed*
    tar (its digest is the layer's diff id, checked against the image config
    by the caller).
    """

    async def apply(self, desc: Descriptor, mounts: Sequence[Mount], stream: ByteStream) -> Descriptor: ...
