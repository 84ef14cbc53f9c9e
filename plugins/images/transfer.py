"""``berth.services.images.v1.Transfer``: pulls, imports and exports run inside berthd.

The service is a thin wire front of the images plugin's
:class:`~plugins.images.service.ImageService`; what it adds is the streaming:

* **Pull** turns the service's progress callback (called after every chunk)
  into ``PullProgress`` messages: one for every change of a blob's status, and
  byte counts at most every :data:`PROGRESS_INTERVAL` seconds in between. A
  client that reads slowly never makes the daemon queue byte updates: an
  unsent byte-only message is replaced by the next one, state changes are all
  kept (there are a handful per blob). ``layers`` lists every blob of the pull
  (index, manifest, config, layers, in the order they were found), the blob's
  kind in the descriptor annotation :data:`ANNOTATION_KIND`. The last message
  has phase ``done`` and the stored image. A failed pull ends the stream with
  the error's status (after the messages that showed it fail).
* **Import** hands the client's chunks to ``import_archive`` as an async byte
  stream read lazily, one message at a time, so memory stays at one chunk
  whatever the archive's size (gRPC flow control holds the client back).
* **Export** writes the archive into a bounded pipe of :data:`EXPORT_CHUNK`
  byte messages (at most :data:`EXPORT_DEPTH` waiting), so a slow client slows
  the export down instead of the daemon buffering the archive.

Errors are the images plugin's BerthErrors, mapped to gRPC codes by the
server; requests are checked here first so a missing field is named as the
client spelled it (``reference``, ``names[1]``).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Generic, TypeVar

import structlog

from daemon.errors import InvalidArgument
from daemon.metadata import Image
from daemon.registry import InitContext, Registry
from daemon.server import request_namespace
from daemon.validate import required
from plugins.images.progress import BlobProgress, State
from plugins.images.progress import PullProgress as Progress
from plugins.images.registry.hosts import Credentials
from protos.berth.services.images.v1 import (
    Auth,
    ExportChunk,
    ExportRequest,
    ImportChunk,
    ImportResponse,
    LayerProgress,
    PullProgress,
    PullRequest,
    StoredImage,
    TransferBase,
)
from protos.containerd.types import Descriptor as PbDescriptor

if TYPE_CHECKING:
    from plugins.images.service import ImageService

log = structlog.get_logger("berth.api.transfer")

T = TypeVar("T")

#: Seconds between two byte-count messages of a pull (state changes go at once).
PROGRESS_INTERVAL = 0.1
#: Bytes per ExportChunk (well under grpclib's 4 MiB message limit).
EXPORT_CHUNK = 1 << 20
#: ExportChunks produced ahead of the client at most.
EXPORT_DEPTH = 2
#: Descriptor annotation of a LayerProgress naming the blob's kind (index, manifest, config, layer).
ANNOTATION_KIND = "io.berth.progress.kind"

PHASE_RESOLVING = "resolving"
PHASE_FETCHING = "fetching"
PHASE_UNPACKING = "unpacking"
PHASE_DONE = "done"

#: A blob that still receives bytes in these states (a teed layer unpacks while it downloads).
_RECEIVING = {State.WAITING, State.DOWNLOADING, State.UNPACKING}


def stored_image(image: Image) -> StoredImage:
    t = image.target
    out = StoredImage(
        name=image.name,
        target=PbDescriptor(
            media_type=t.media_type, digest=t.digest, size=t.size, annotations=dict(t.annotations)
        ),
        labels=dict(image.labels),
    )
    if image.created_at is not None:
        out.created_at = image.created_at
    if image.updated_at is not None:
        out.updated_at = image.updated_at
    return out


def credentials(auth: Auth | None) -> Credentials | None:
    """The request's credentials; None (use the configured ones) when it carries none."""
    if auth is None:
        return None
    if auth.token and (auth.username or auth.password):
        raise InvalidArgument("auth: set either token or username/password, not both")
    if auth.password and not auth.username:
        raise InvalidArgument("auth.username: must not be empty when auth.password is set")
    creds = Credentials(username=auth.username, password=auth.password, registry_token=auth.token)
    return creds or None


def layer_status(blob: BlobProgress, unpack: bool) -> str:
    """The wire status of a blob: downloading, waiting, applying, downloaded, done, exists, error.

    ``downloaded`` is a layer in the content store still waiting to be applied;
    a blob that needs nothing more is ``done``.
    """
    state = blob.state
    if state is State.DOWNLOADED:
        return "downloaded" if unpack and blob.kind == "layer" else "done"
    return {
        State.WAITING: "waiting",
        State.DOWNLOADING: "downloading",
        State.EXISTS: "exists",
        State.UNPACKING: "applying",
        State.UNPACKED: "done",
        State.REUSED: "exists",
        State.FAILED: "error",
    }[state]


def pull_phase(progress: Progress, unpack: bool) -> str:
    """resolving (no layer known yet), fetching (bytes still coming), unpacking, done."""
    if progress.done:
        return PHASE_DONE
    blobs = list(progress.blobs.values())
    if not any(b.kind == "layer" for b in blobs):
        return PHASE_RESOLVING
    if any(b.state in _RECEIVING and (b.offset < b.total or b.state is State.WAITING) for b in blobs):
        return PHASE_FETCHING
    return PHASE_UNPACKING if unpack else PHASE_FETCHING


def progress_message(progress: Progress, unpack: bool) -> PullProgress:
    layers = [
        LayerProgress(
            descriptor=PbDescriptor(digest=b.digest, size=b.total, annotations={ANNOTATION_KIND: b.kind}),
            status=layer_status(b, unpack),
            offset=b.offset,
            total=b.total,
        )
        for b in progress.blobs.values()
    ]
    return PullProgress(phase=pull_phase(progress, unpack), layers=layers)


class Pipe(Generic[T]):
    """A single-producer, single-consumer channel closed without awaiting (safe in ``finally``).

    :meth:`put` waits while ``depth`` items are unread (0: never);
    :meth:`put_nowait` never waits, and with ``replace`` it overwrites the
    last unread item when that one was also put with ``replace`` (a newer
    byte count makes an unsent older one useless).
    """

    def __init__(self, depth: int = 0) -> None:
        self._items: deque[tuple[T, bool]] = deque()
        self._depth = depth
        self._closed = False
        self._readable = asyncio.Event()
        self._writable = asyncio.Event()
        self._writable.set()

    async def put(self, item: T) -> None:
        while self._depth and len(self._items) >= self._depth:
            self._writable.clear()
            await self._writable.wait()
        self.put_nowait(item)

    def put_nowait(self, item: T, *, replace: bool = False) -> None:
        if self._closed:
            return
        if replace and self._items and self._items[-1][1]:
            self._items[-1] = (item, True)
        else:
            self._items.append((item, replace))
        self._readable.set()

    def close(self) -> None:
        self._closed = True
        self._readable.set()

    async def __aiter__(self) -> AsyncIterator[T]:
        while True:
            while not self._items:
                if self._closed:
                    return
                self._readable.clear()
                await self._readable.wait()
            item, _ = self._items.popleft()
            self._writable.set()
            yield item


class _PullFeed:
    """The progress callback of one Pull call: decides which changes become messages."""

    def __init__(
        self, unpack: bool, interval: float = PROGRESS_INTERVAL, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.unpack = unpack
        self.interval = interval
        self._clock = clock
        self.pipe: Pipe[PullProgress] = Pipe()
        self._states: tuple[tuple[str, State], ...] = ()
        self._phase = ""
        self._sent = -1e18
        #: The pull's progress once it is finished (it no longer changes then).
        self.last: Progress | None = None

    def __call__(self, progress: Progress) -> None:
        if progress.done:
            self.last = progress  # the final message, with the image, is the service's
            return
        states = tuple((b.digest, b.state) for b in progress.blobs.values())
        phase = pull_phase(progress, self.unpack)
        now = self._clock()
        changed = states != self._states or phase != self._phase
        if not changed and now - self._sent < self.interval:
            return
        self._states, self._phase, self._sent = states, phase, now
        self.pipe.put_nowait(progress_message(progress, self.unpack), replace=not changed)


async def _until_done(pipe: Pipe[T], task: asyncio.Task[object]) -> AsyncIterator[T]:
    """Yield what ``pipe`` carries; the pipe is closed when ``task`` ends (see the callers)."""
    task.add_done_callback(lambda _t: pipe.close())
    async for item in pipe:
        yield item


class TransferService(TransferBase):
    def __init__(self, images: ImageService) -> None:
        self.images = images

    async def pull(self, pull_request: PullRequest) -> AsyncIterator[PullProgress]:
        req = pull_request
        ref = required(req.reference.strip(), "reference")
        namespace = request_namespace()
        auth = credentials(req.auth)
        unpack = not req.no_unpack
        feed = _PullFeed(unpack)
        task: asyncio.Task[Image] = asyncio.get_running_loop().create_task(
            self.images.pull(
                namespace,
                ref,
                platform=req.platform or None,
                auth=auth,
                progress=feed,
                snapshotter=req.snapshotter or None,
                unpack=unpack,
            ),
            name=f"berth-transfer-pull-{ref}",
        )
        try:
            async for message in _until_done(feed.pipe, task):
                yield message
            image = task.result()  # the pull's error, if it failed
            last = progress_message(feed.last, unpack) if feed.last else PullProgress()
            last.phase = PHASE_DONE
            last.image = stored_image(image)
            yield last
        finally:
            await _cancel(task)

    async def import_(self, import_chunk_iterator: AsyncIterator[ImportChunk]) -> ImportResponse:
        namespace = request_namespace()
        chunks = import_chunk_iterator.__aiter__()
        first = await anext(chunks, None)
        if first is None:
            raise InvalidArgument("data: the stream carried no chunk (send the archive's bytes)")
        unpack = not first.no_unpack
        if unpack:  # NotFound now rather than after reading the whole archive
            self.images.db.snapshotter(self.images.snapshotter_name(first.snapshotter or None))
        source = ChunkStream(first.data, chunks)
        images = await self.images.import_archive(
            namespace,
            source,
            name=first.name or None,
            snapshotter=first.snapshotter or None,
            unpack=unpack,
        )
        skipped = await source.drain()  # the tar's trailing padding the reader did not need
        log.info(
            "transfer.import", namespace=namespace, images=[i.name for i in images], bytes=source.received
        )
        if skipped:
            log.debug("transfer.import.trailing", namespace=namespace, bytes=skipped)
        return ImportResponse(images=[stored_image(i) for i in images])

    async def export(self, export_request: ExportRequest) -> AsyncIterator[ExportChunk]:
        req = export_request
        if not req.names:
            raise InvalidArgument("names: must not be empty (name the images to export)")
        names = [required(n.strip(), f"names[{i}]") for i, n in enumerate(req.names)]
        namespace = request_namespace()
        sink = ChunkSink(EXPORT_CHUNK, EXPORT_DEPTH)

        async def produce() -> None:
            await self.images.export(namespace, names, sink, platform=req.platform or None)
            await sink.flush()

        task = asyncio.get_running_loop().create_task(produce(), name="berth-transfer-export")
        try:
            async for data in _until_done(sink.pipe, task):
                yield ExportChunk(data=data)
            task.result()
        finally:
            await _cancel(task)
        log.info("transfer.export", namespace=namespace, images=names, bytes=sink.written)


class ChunkStream:
    """The ``ByteStream`` ``import_archive`` reads: the client's chunks, fetched one at a time."""

    def __init__(self, first: bytes, rest: AsyncIterator[ImportChunk]) -> None:
        self._buf = memoryview(first)
        self._rest = rest
        self._eof = False
        self.received = len(first)

    async def read(self, n: int = -1) -> bytes:
        while not self._buf:
            if self._eof:
                return b""
            chunk = await anext(self._rest, None)
            if chunk is None:
                self._eof = True
                return b""
            self._buf = memoryview(chunk.data)
            self.received += len(chunk.data)
        if n < 0 or n >= len(self._buf):
            out, self._buf = bytes(self._buf), memoryview(b"")
        else:
            out, self._buf = bytes(self._buf[:n]), self._buf[n:]
        return out

    async def drain(self) -> int:
        """Read the stream to its end, discarding; the bytes skipped."""
        skipped = len(self._buf)
        self._buf = memoryview(b"")
        while not self._eof:
            chunk = await anext(self._rest, None)
            if chunk is None:
                self._eof = True
            else:
                skipped += len(chunk.data)
                self.received += len(chunk.data)
        return skipped


class ChunkSink:
    """The ``ArchiveSink`` of an export: small writes gathered into ``size``-byte chunks on a pipe."""

    def __init__(self, size: int, depth: int) -> None:
        self.size = size
        self.pipe: Pipe[bytes] = Pipe(depth)
        self._buf = bytearray()
        self.written = 0

    async def write(self, data: bytes) -> None:
        self._buf += data
        self.written += len(data)
        while len(self._buf) >= self.size:
            chunk = bytes(self._buf[: self.size])
            del self._buf[: self.size]
            await self.pipe.put(chunk)

    async def flush(self) -> None:
        if self._buf:
            chunk = bytes(self._buf)
            self._buf.clear()
            await self.pipe.put(chunk)


async def _cancel(task: asyncio.Task[T]) -> None:
    """Cancel ``task`` if it still runs (the client went away) and wait for it to unwind."""
    if not task.done():
        task.cancel()
        await asyncio.wait({task})
    if task.done() and not task.cancelled():
        task.exception()  # retrieved: raised to the client already, or nobody is left to tell


async def init(ic: InitContext) -> TransferService:
    return TransferService(ic.get("berth.images.v1"))


def register(registry: Registry) -> None:
    """Called by the images plugin's ``berth_register``: the service ships with the plugin it serves."""
    registry.add(type="berth.grpc.v1", id="transfer", init=init, requires=["berth.images.v1"])


__all__ = ["TransferService", "credentials", "progress_message", "register", "stored_image"]
