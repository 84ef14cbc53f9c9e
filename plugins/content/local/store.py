"""The local content store: blobs on the file system, namespace-agnostic.

:class:`LocalContentStore` implements :class:`daemon.protocols.ContentStore`
with containerd's ``content/local`` layout (see :mod:`.layout`): committed
blobs are read-only files named by their digest, writes go through ingests
(:mod:`.ingest`) that survive crashes and dropped connections, and labels
are kept in per-blob sidecars. Any number of readers may read a blob while
it is deleted (they keep the open file).

All file work, hashing included, runs in worker threads; the event loop
only waits. The store is safe to share between tasks; two processes may use
one root (ingest locks are flocks), though label updates are only
serialised within one process.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

import structlog

from daemon import filters as filters_mod
from daemon.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from daemon.metadata.encoding import to_datetime
from daemon.metadata.namespaces import apply_label_mask
from daemon.metadata.validate import quote
from daemon.protocols import ContentInfo, IngestStatus
from plugins.content.local import digests, labels
from plugins.content.local.ingest import (
    Claim,
    LocalWriter,
    RefLocks,
    lock_ingest,
    now,
    os_error,
    read_status,
)
from plugins.content.local.layout import Layout, remove_temp_files

log = structlog.get_logger("berth.content")

#: how many blobs one worker-thread trip of ``walk`` stats
WALK_BATCH = 256


def _check_ref(ref: str) -> None:
    if not isinstance(ref, str) or not ref:
        raise InvalidArgument("ref: must not be empty")
    try:
        ref.encode()
    except UnicodeEncodeError:
        raise InvalidArgument(f"ref {quote(ref)}: must be valid UTF-8") from None


class LocalReader:
    """Positioned reads of one blob (see :class:`daemon.protocols.ContentReader`).

    The open file pins the blob: reads keep working if it is deleted.
    """

    def __init__(self, fd: int, size: int, digest: str) -> None:
        self.size = size
        self.digest = digest
        self._fd = fd
        self._mutex = threading.Lock()  # no read in flight when the descriptor is closed

    async def read_at(self, offset: int, n: int) -> bytes:
        if offset < 0:
            raise InvalidArgument(f"offset {offset}: must not be negative (content {self.digest})")
        if n < 0:
            raise InvalidArgument(f"size {n}: must not be negative (content {self.digest})")
        n = min(n, self.size - offset)
        if n <= 0:
            if self._fd < 0:
                raise FailedPrecondition(f"reader of content {self.digest}: closed")
            return b""
        return await asyncio.to_thread(self._pread, offset, n)

    def _pread(self, offset: int, n: int) -> bytes:
        with self._mutex:
            if self._fd < 0:
                raise FailedPrecondition(f"reader of content {self.digest}: closed")
            parts: list[bytes] = []
            while n > 0:
                try:
                    chunk = os.pread(self._fd, n, offset)
                except OSError as exc:
                    raise os_error(f"content {self.digest}: read at {offset}", exc) from exc
                if not chunk:
                    break
                parts.append(chunk)
                offset += len(chunk)
                n -= len(chunk)
            return parts[0] if len(parts) == 1 else b"".join(parts)

    async def close(self) -> None:
        if self._fd >= 0:
            await asyncio.to_thread(self._close_sync)

    def _close_sync(self) -> None:
        with self._mutex:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


class LocalContentStore:
    """Content-addressed blobs under ``root`` with resumable ingests; see the module doc.

    Construct with :meth:`open` (it creates the folders). ``writer`` with an
    ``expected`` digest that is already stored raises AlreadyExists without
    touching any ingest, as containerd's does: a puller skips the blob.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.layout = Layout(self.root)
        self._locks = RefLocks()
        self._labels_mutex = threading.Lock()  # read-modify-write of sidecars

    @classmethod
    async def open(cls, root: Path) -> LocalContentStore:
        store = cls(root)
        await asyncio.to_thread(store._prepare)
        log.info("content.open", root=str(store.root))
        return store

    def _prepare(self) -> None:
        self.layout.create()
        removed = remove_temp_files(self.layout.labels) + remove_temp_files(self.layout.ingest)
        if removed:
            log.info("content.temp_files_removed", count=removed)

    async def close(self) -> None:
        """Close writers still open in this process (their ingests stay for resumption)."""
        for writer in self._locks.writers():
            await writer.close()

    # -- blobs ------------------------------------------------------------------

    async def info(self, digest: str) -> ContentInfo:
        algorithm, encoded = digests.parse("digest", digest)
        return await asyncio.to_thread(self._info_sync, algorithm, encoded)

    def _info_sync(self, algorithm: str, encoded: str) -> ContentInfo:
        digest = f"{algorithm}:{encoded}"
        try:
            st = os.stat(self.layout.blob_path(algorithm, encoded))
        except FileNotFoundError:
            raise NotFound(f"content {digest}: not found") from None
        created = to_datetime(st.st_mtime_ns)
        sidecar = labels.read(self.layout.labels_path(algorithm, encoded))
        if sidecar is None:
            return ContentInfo(digest, st.st_size, created, created, {})
        return ContentInfo(digest, st.st_size, created, sidecar.updated_at, dict(sidecar.labels))

    async def update(self, info: ContentInfo, fieldpaths: Sequence[str] = ()) -> ContentInfo:
        """Change labels only: no paths or ``labels`` replace them, ``labels.<k>`` sets or removes one."""
        algorithm, encoded = digests.parse("digest", info.digest)
        return await asyncio.to_thread(
            self._update_sync, algorithm, encoded, dict(info.labels or {}), list(fieldpaths)
        )

    def _update_sync(
        self, algorithm: str, encoded: str, new: dict[str, str], fieldpaths: list[str]
    ) -> ContentInfo:
        with self._labels_mutex:
            current = self._info_sync(algorithm, encoded)
            owner = f"content {current.digest}"
            merged = apply_label_mask(owner, current.labels, new, fieldpaths)
            updated = now()
            try:
                labels.write(self.layout.labels_path(algorithm, encoded), merged, updated)
            except OSError as exc:
                raise os_error(f"{owner}: update labels", exc) from exc
            if not self.layout.blob_path(algorithm, encoded).exists():  # deleted meanwhile
                labels.remove(self.layout.labels_path(algorithm, encoded))
                raise NotFound(f"{owner}: not found")
        return ContentInfo(current.digest, current.size, current.created_at, updated, merged)

    async def walk(self, filters: Sequence[str] = ()) -> AsyncIterator[ContentInfo]:
        """Every blob matching ``filters`` (fields ``digest``, ``size``, ``labels.<key>``).

        Blobs committed or deleted during the walk may or may not be seen.
        """
        flt = filters_mod.parse(filters)
        names = await asyncio.to_thread(self._list_blobs)
        for start in range(0, len(names), WALK_BATCH):
            batch = await asyncio.to_thread(self._infos, names[start : start + WALK_BATCH])
            for info in batch:
                fields = {"digest": info.digest, "size": info.size, "labels": info.labels}
                if flt.match(filters_mod.adapt_mapping(fields)):
                    yield info

    def _list_blobs(self) -> list[tuple[str, str]]:
        names: list[tuple[str, str]] = []
        for algorithm in sorted(os.listdir(self.layout.blobs)):
            length = digests.HEX_LENGTH.get(algorithm)
            if length is None or not (self.layout.blobs / algorithm).is_dir():
                continue
            for encoded in sorted(os.listdir(self.layout.blobs / algorithm)):
                if len(encoded) == length and all(c in "0123456789abcdef" for c in encoded):
                    names.append((algorithm, encoded))
        return names

    def _infos(self, names: list[tuple[str, str]]) -> list[ContentInfo]:
        out = []
        for algorithm, encoded in names:
            with contextlib.suppress(NotFound):  # deleted since it was listed
                out.append(self._info_sync(algorithm, encoded))
        return out

    async def delete(self, digest: str) -> None:
        algorithm, encoded = digests.parse("digest", digest)
        await asyncio.to_thread(self._delete_sync, algorithm, encoded)
        log.info("content.delete", digest=digest)

    def _delete_sync(self, algorithm: str, encoded: str) -> None:
        try:
            os.unlink(self.layout.blob_path(algorithm, encoded))
        except FileNotFoundError:
            raise NotFound(f"content {algorithm}:{encoded}: not found") from None
        labels.remove(self.layout.labels_path(algorithm, encoded))

    async def reader(self, digest: str) -> LocalReader:
        algorithm, encoded = digests.parse("digest", digest)
        return await asyncio.to_thread(self._reader_sync, algorithm, encoded)

    def _reader_sync(self, algorithm: str, encoded: str) -> LocalReader:
        digest = f"{algorithm}:{encoded}"
        try:
            fd = os.open(self.layout.blob_path(algorithm, encoded), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise NotFound(f"content {digest}: not found") from None
        return LocalReader(fd, os.fstat(fd).st_size, digest)

    # -- ingests ----------------------------------------------------------------

    async def writer(self, ref: str, total: int = 0, expected: str = "") -> LocalWriter:
        """Open or resume the ingest ``ref``; see :class:`daemon.protocols.ContentStore`.

        Resuming re-reads the ingest's data to rebuild the digest. ``total``
        and ``expected`` must agree with those of an existing ingest
        (FailedPrecondition otherwise); given only now, they are recorded.
        """
        _check_ref(ref)
        if total < 0:
            raise InvalidArgument(f"total {total}: must not be negative (ref {quote(ref)})")
        if expected:
            algorithm, encoded = digests.parse("expected", expected)
            if await asyncio.to_thread(self.layout.blob_path(algorithm, encoded).exists):
                raise AlreadyExists(f"content {expected}: already exists")
        writer = LocalWriter(self.layout, self._locks, ref)
        claim = self._locks.claim(ref, "a writer of this process", writer)
        opening = asyncio.ensure_future(asyncio.to_thread(writer._open_sync, claim, total, expected))
        try:
            await asyncio.shield(opening)
        except asyncio.CancelledError:
            # The thread goes on: whatever it opens must be closed, or the ref stays locked.
            opening.add_done_callback(_close_abandoned(writer))
            raise
        return writer

    async def status(self, ref: str) -> IngestStatus:
        _check_ref(ref)
        claim = self._locks.get(ref)
        if claim is not None and claim.writer is not None and claim.writer.is_open:
            return claim.writer.status()
        status = await asyncio.to_thread(read_status, self.layout.ingest_dir(ref))
        if status is None or status.ref != ref:
            raise NotFound(f"ingest ref {quote(ref)}: not found")
        return status

    async def list_statuses(self, filters: Sequence[str] = ()) -> list[IngestStatus]:
        """Ingests matching ``filters`` (fields ``ref``, ``expected``), sorted by ref."""
        flt = filters_mod.parse(filters)
        on_disk = await asyncio.to_thread(self._statuses)
        live = {w.ref: w.status() for w in self._locks.writers() if w.is_open}
        merged = {s.ref: live.get(s.ref, s) for s in on_disk}
        return [
            s
            for ref, s in sorted(merged.items())
            if flt.match(filters_mod.adapt_mapping({"ref": ref, "expected": s.expected}))
        ]

    def _statuses(self) -> list[IngestStatus]:
        out = []
        for name in os.listdir(self.layout.ingest):
            status = read_status(self.layout.ingest / name)
            if status is not None:
                out.append(status)
        return out

    async def abort(self, ref: str) -> None:
        """Remove the ingest ``ref``; Unavailable while a writer holds it, NotFound if absent."""
        _check_ref(ref)
        claim = self._locks.claim(ref, "an abort")
        await asyncio.to_thread(self._abort_sync, claim)
        log.info("content.abort", ref=ref)

    def _abort_sync(self, claim: Claim) -> None:
        try:
            folder = self.layout.ingest_dir(claim.ref)
            if not folder.is_dir():
                raise NotFound(f"ingest ref {quote(claim.ref)}: not found")
            fd = lock_ingest(folder, claim.ref, create=False)
            try:
                shutil.rmtree(folder)
            except OSError as exc:
                raise os_error(f"ingest ref {quote(claim.ref)}: abort", exc) from exc
            finally:
                os.close(fd)
        finally:
            self._locks.release(claim)


def _close_abandoned(writer: LocalWriter) -> Callable[[asyncio.Future[None]], None]:
    def done(fut: asyncio.Future[None]) -> None:
        if fut.cancelled() or fut.exception() is not None:
            return  # the thread cleaned up after itself
        asyncio.get_running_loop().run_in_executor(None, writer._close_sync)

    return done
