"""Unpacking an image into a snapshotter, layer by layer, while its layers download.

containerd unpacks only once every layer has downloaded. berth applies a
layer while it arrives whenever it can, without giving up any check. The
scheme:

Layers download in parallel (a bounded number at a time), each into the
content store, which verifies size and digest before it commits. Applying
is strictly sequential: layer N is applied onto a snapshot prepared from
layer N-1's chain id, and that exists only once N-1 is committed. Between
each layer's download and the unpacker sits a :class:`LayerFeed`, and the
layer's bytes reach the applier by one of two routes:

* **teed live**: the unpacker reaches layer N (N-1 is committed) while N's
  download has not yet received more than ``backlog`` bytes. The feed hands
  the unpacker a :class:`TeeStream`: the bytes received so far (the feed
  kept them in memory for exactly this) and then every further chunk go to
  the applier as they go to the content writer. When the last byte
  arrives, the layer is already extracted.
* **buffered**: the unpacker reaches layer N later (it was busy with
  earlier layers while N downloaded past ``backlog``). N's bytes went to the
  content store only; the unpacker waits for N's commit and applies it from
  there, at disk speed. A download resumed from a partial ingest (after
  berthd was killed) is always buffered: its first bytes are not in memory.

The first layer is always teed. Later ones are teed when the unpacker keeps
up with the network, which local disk work usually does; otherwise it
catches up from the local copy. The downloads never wait for the unpacker
except through a tee's bounded buffer (back-pressure while teeing).

Verification is the same on both routes. A layer's snapshot is committed
under its chain id only after (1) its blob was committed to content, which
verified its size and digest, and (2) the applier's diff id (sha256 of the
uncompressed tar) equals ``rootfs.diff_ids[N]`` of the config. A live apply
whose bytes then fail the digest check is thrown away with its active
snapshot, and the error reported is the digest mismatch (not whatever the
applier made of the corrupt bytes). Snapshot keys are unique per attempt
(``extract-<random>-<chainid>``) so that concurrent or crashed unpacks
never collide; a chain id that is already committed is reused, not applied
again.

Memory: a download holds at most ``backlog`` bytes while it may still be
teed, a tee at most ``backlog`` bytes (then the download waits), and the
applier its own bounded pipe; nothing grows with the layer.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import structlog

from daemon.errors import AlreadyExists, BerthError, FailedPrecondition, NotFound
from daemon.protocols import Applier, ByteStream, ContentStore, Descriptor, Kind, Snapshotter
from plugins.images.blobs import ContentStream, chain_ids
from plugins.images.progress import ProgressTracker, State

T = TypeVar("T")
log = structlog.get_logger("berth.images")

#: Bytes of a layer kept in memory while it may still be teed, and held by a tee at most.
TEE_BACKLOG = 4 << 20


class TeeStream:
    """One layer's bytes from its download to the applier: a bounded async byte queue.

    One producer, the download, :meth:`put` s chunks (waiting while
    ``limit`` bytes are unread), then :meth:`close` s or :meth:`fail` s; one
    consumer, the applier, :meth:`read` s. Once the applier is done
    (:meth:`detach`), puts return at once and the download carries on into
    the content store alone.
    """

    def __init__(self, limit: int = TEE_BACKLOG) -> None:
        self.limit = limit
        self.delivered = 0
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._eof = False
        self._error: BaseException | None = None
        self._detached = False
        self._reader: asyncio.Future[None] | None = None
        self._writer: asyncio.Future[None] | None = None

    def prefill(self, chunks: Sequence[bytes]) -> None:
        """Bytes received before the tee existed (may exceed ``limit``: they are in memory already)."""
        for chunk in chunks:
            self._chunks.append(chunk)
            self._buffered += len(chunk)

    async def put(self, data: bytes) -> None:
        while not self._detached and self._buffered and self._buffered + len(data) > self.limit:
            self._writer = asyncio.get_running_loop().create_future()
            await self._writer
        if self._detached or not data:
            return
        self._chunks.append(data)
        self._buffered += len(data)
        self._reader = _wake(self._reader)

    def close(self) -> None:
        self._eof = True
        self._reader = _wake(self._reader)

    def fail(self, exc: BaseException) -> None:
        if self._error is None:
            self._error = exc
        self.close()

    def detach(self) -> None:
        self._detached = True
        self._chunks.clear()
        self._buffered = 0
        self._writer = _wake(self._writer)

    async def read(self, n: int = -1) -> bytes:
        while not self._chunks and not self._eof:
            self._reader = asyncio.get_running_loop().create_future()
            await self._reader
        if self._error is not None:
            raise self._error
        if not self._chunks:
            return b""
        head = self._chunks[0]
        if 0 <= n < len(head):
            chunk, self._chunks[0] = head[:n], head[n:]
        else:
            chunk = self._chunks.popleft()
        self._buffered -= len(chunk)
        self.delivered += len(chunk)
        self._writer = _wake(self._writer)
        return chunk


def _wake(waiter: asyncio.Future[None] | None) -> asyncio.Future[None] | None:
    """Wake a waiter if there is one; always None (the slot is free again)."""
    if waiter is not None and not waiter.done():
        waiter.set_result(None)
    return None


class LayerFeed:
    """Where the unpacker gets one layer's bytes: live from its download, or from content after.

    Download side: :meth:`begin` (with the offset the ingest resumes at),
    :meth:`push` per chunk, :meth:`eof` when the stream ended verified, then
    :meth:`succeed` once committed or :meth:`fail`. A blob already in the
    content store just :meth:`succeed` s. Unpacker side: :meth:`open`, then
    :meth:`release` when the applier is done with the stream, and
    :meth:`wait_committed` before committing the snapshot.
    """

    def __init__(self, desc: Descriptor, *, backlog: int = TEE_BACKLOG) -> None:
        loop = asyncio.get_running_loop()
        self.descriptor = desc
        self.backlog_limit = backlog
        #: True once the unpacker took the live route
        self.live = False
        self._backlog: list[bytes] | None = [] if backlog > 0 else None  # 0: never teed (benchmarks)
        self._backlog_size = 0
        self._tee: TeeStream | None = None
        self._begun: asyncio.Future[None] = loop.create_future()
        self._committed: asyncio.Future[None] = loop.create_future()
        self._committed.add_done_callback(_retrieve)

    # -- download side ------------------------------------------------------------

    def begin(self, offset: int) -> None:
        """The download starts at ``offset`` (> 0: resumed, so never teed)."""
        if offset:
            self._backlog = None
        _settle(self._begun)

    async def push(self, chunk: bytes) -> None:
        if self._tee is not None:
            await self._tee.put(chunk)
        elif self._backlog is not None:
            if self._backlog_size + len(chunk) > self.backlog_limit:
                self._backlog = None  # too late to tee: the unpacker will read the content store
            else:
                self._backlog.append(chunk)
                self._backlog_size += len(chunk)

    def eof(self) -> None:
        """The whole blob arrived (and the registry stream verified it)."""
        if self._tee is not None:
            self._tee.close()

    def succeed(self) -> None:
        """The blob is committed in the content store."""
        self._backlog = None
        if self._tee is not None:
            self._tee.close()
        _settle(self._begun)
        if not self._committed.done():
            self._committed.set_result(None)

    def fail(self, exc: BaseException) -> None:
        self._backlog = None
        if self._tee is not None:
            self._tee.fail(exc)
        _settle(self._begun)
        if not self._committed.done():
            if isinstance(exc, asyncio.CancelledError):
                self._committed.cancel()
            else:
                self._committed.set_exception(exc)

    @property
    def committed(self) -> bool:
        return (
            self._committed.done() and not self._committed.cancelled() and self._committed.exception() is None
        )

    # -- unpacker side ------------------------------------------------------------

    async def open(self, content: ContentStore) -> ByteStream:
        """The layer's bytes from the start: a tee if the download can still be joined, else content."""
        await asyncio.shield(self._begun)
        if not self._committed.done() and self._backlog is not None:
            tee = TeeStream(self.backlog_limit)
            tee.prefill(self._backlog)
            self._backlog = None
            self._tee = tee
            self.live = True
            return tee
        await self.wait_committed()
        return ContentStream(await content.reader(self.descriptor.digest))

    async def wait_committed(self) -> None:
        """Return once the blob is committed; raise the download's error if it failed."""
        await asyncio.shield(self._committed)

    def release(self, stream: ByteStream) -> None:
        """The applier is done with ``stream`` (a tee stops buffering; the download goes on)."""
        if stream is self._tee:
            self._tee.detach()


def _settle(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _retrieve(fut: asyncio.Future[None]) -> None:
    if not fut.cancelled():
        fut.exception()  # a failed download is reported by its own task; no "never retrieved" noise


Hold = Callable[[str], Awaitable[None]]


class Unpacker:
    """Applies an image's layers in chain order onto one snapshotter (namespace-bound, leased).

    ``hold(chain_id)`` puts a chain id under the caller's lease before it
    is looked at, so that a snapshot being reused cannot be collected
    halfway through the unpack.
    """

    def __init__(
        self,
        *,
        image: str,
        snapshotter: Snapshotter,
        applier: Applier,
        content: ContentStore,
        hold: Hold | None = None,
        tracker: ProgressTracker | None = None,
    ) -> None:
        self.image = image
        self.snapshotter = snapshotter
        self.applier = applier
        self.content = content
        self.hold = hold
        self.tracker = tracker
        #: layers applied from their download (for tests and logs)
        self.teed = 0

    async def unpack(
        self, layers: Sequence[Descriptor], diff_ids: Sequence[str], feeds: dict[str, LayerFeed]
    ) -> list[str]:
        """Apply ``layers`` (whose blobs come through ``feeds``, by digest); the chain ids, bottom first."""
        chain = chain_ids(diff_ids)
        parent = ""
        for i, (desc, diff_id, chain_id) in enumerate(zip(layers, diff_ids, chain, strict=True)):
            if self.hold is not None:
                await self.hold(chain_id)
            if await self._exists(chain_id):
                log.debug("unpack.reuse", image=self.image, layer=desc.digest, chain_id=chain_id)
                self._state(desc.digest, State.REUSED)
            else:
                await self._apply(i, desc, diff_id, chain_id, parent, feeds[desc.digest])
            parent = chain_id
        return chain

    async def _exists(self, chain_id: str) -> bool:
        try:
            info = await self.snapshotter.stat(chain_id)
        except NotFound:
            return False
        if info.kind is not Kind.COMMITTED:
            raise FailedPrecondition(
                f"{self.image}: snapshot {chain_id} exists but is not committed; remove it and pull again"
            )
        return True

    async def _apply(
        self, index: int, desc: Descriptor, diff_id: str, chain_id: str, parent: str, feed: LayerFeed
    ) -> None:
        key = f"extract-{secrets.token_hex(6)}-{chain_id}"
        try:
            # Finished even if the pull is cancelled meanwhile: a prepare that
            # completes in its thread after we stopped waiting would leave an
            # extract snapshot nobody removes.
            mounts = await _to_completion(self.snapshotter.prepare(key, parent))
        except asyncio.CancelledError:
            await self._remove(key, missing_ok=True)
            raise
        committed = False
        try:
            stream = await feed.open(self.content)
            self._state(desc.digest, State.UNPACKING, live=feed.live)
            try:
                diff = await self.applier.apply(desc, mounts, stream)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                feed.release(stream)  # the download goes on without us
                # Bytes that fail their digest explain any apply error: report the mismatch.
                await feed.wait_committed()
                if isinstance(exc, BerthError):
                    raise type(exc)(f"{self.image}: {exc.message}") from exc
                raise
            finally:
                feed.release(stream)
                if isinstance(stream, ContentStream):
                    await stream.close()
            await feed.wait_committed()  # the compressed digest is verified before anything is committed
            if diff.digest != diff_id:
                raise FailedPrecondition(
                    f"{self.image}: layer {desc.digest}: diff id mismatch: the image config says "
                    f"{diff_id}, the layer unpacks to {diff.digest}"
                )
            try:
                await self.snapshotter.commit(chain_id, key)
                committed = True
            except AlreadyExists:  # another unpack committed the same chain meanwhile: use that one
                log.debug("unpack.commit.exists", image=self.image, chain_id=chain_id)
        finally:
            if not committed:
                await self._remove(key)
        if feed.live:
            self.teed += 1
        self._state(desc.digest, State.UNPACKED)
        log.info(
            "unpack.layer",
            image=self.image,
            layer=desc.digest,
            index=index,
            chain_id=chain_id,
            live=feed.live,
        )

    async def _remove(self, key: str, *, missing_ok: bool = False) -> None:
        """Remove an extract snapshot, to completion even while the pull is being cancelled."""
        try:
            await _to_completion(self.snapshotter.remove(key))
        except NotFound:
            if not missing_ok:
                log.warning("unpack.remove_failed", image=self.image, key=key, error="not found")
        except BerthError as exc:  # GC takes what is left once the lease is gone
            log.warning("unpack.remove_failed", image=self.image, key=key, error=str(exc))

    def _state(self, digest: str, state: State, live: bool | None = None) -> None:
        if self.tracker is not None and digest in self.tracker.progress.blobs:
            self.tracker.state(digest, state, live=live)


async def _to_completion(aw: Awaitable[T]) -> T:
    """Await ``aw`` to its end even if the caller is cancelled, then re-raise the cancellation.

    Cleanup steps (and the creation they undo) must not be cut in half by
    the cancellation of a pull's task group, which can arrive more than once.
    """
    task = asyncio.ensure_future(aw)
    cancelled = False
    while not task.done():
        try:
            await asyncio.wait({task})  # cancelling the wait leaves the task running
        except asyncio.CancelledError:
            cancelled = True
    if cancelled:
        if not task.cancelled():
            task.exception()  # retrieved: the cancellation is what the caller gets
        raise asyncio.CancelledError
    return task.result()


async def abort_quietly(content: ContentStore, ref: str) -> None:
    with contextlib.suppress(NotFound):
        await content.abort(ref)
