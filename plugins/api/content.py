"""``containerd.services.content.v1.Content``: the namespaced content store on the wire.

Every call is scoped by the ``containerd-namespace`` header and reaches the
blobs through :attr:`daemon.metadata.MetadataDB.content`, so a namespace
sees only what it recorded and labels live in the metadata store.

Semantics are containerd's content service:

* ``List`` streams infos in chunks of :data:`LIST_CHUNK`; ``Read`` streams
  ``[offset, offset+size)`` (size 0: to the end) in chunks of
  :data:`READ_CHUNK`, each tagged with its offset.
* ``Write`` is one ingest per stream: the first message names the ``ref``
  (and may announce ``total`` and ``expected``) and takes the ingest's lock
  for the life of the stream; a second stream on the same ref gets
  UNAVAILABLE until the first ends. Then each message is one action:
  ``STAT`` reports the ingest (offset, total, digest so far, timestamps),
  ``WRITE`` appends ``data`` at ``offset``, ``COMMIT`` appends any data and
  commits against ``total``/``expected`` with ``labels``. A non-zero
  ``offset`` other than the ingest's is OUT_OF_RANGE; offset 0 on an ingest
  that already holds data restarts it. Every response carries the offset
  after the action and the digest so far. A stream that drops leaves the
  ingest for a later stream to resume at its offset (``Status`` tells it).
* The lease of the ``containerd-lease`` header holds the ingest, then the
  committed blob. AlreadyExists on open or commit means the namespace has
  the blob already: clients treat it as success.
* ``Delete`` publishes ``/content/delete`` and schedules a garbage collection.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import betterproto.lib.google.protobuf as pb
from grpclib.const import Status as Code
from grpclib.exceptions import GRPCError

from daemon.errors import InvalidArgument
from daemon.events import EventBus
from daemon.hookspecs import hookimpl
from daemon.metadata import MetadataDB, NamespacedContent
from daemon.metadata.validate import quote, validate_digest
from daemon.protocols import ContentInfo, ContentWriter, IngestStatus
from daemon.registry import InitContext, Registry
from daemon.server import request_lease, request_namespace
from daemon.validate import label_paths, required
from protos.containerd.events import ContentDelete
from protos.containerd.services.content.v1 import (
    AbortRequest,
    ContentBase,
    DeleteContentRequest,
    Info,
    InfoRequest,
    InfoResponse,
    ListContentRequest,
    ListContentResponse,
    ListStatusesRequest,
    ListStatusesResponse,
    ReadContentRequest,
    ReadContentResponse,
    Status,
    StatusRequest,
    StatusResponse,
    UpdateRequest,
    UpdateResponse,
    WriteAction,
    WriteContentRequest,
    WriteContentResponse,
)

#: Infos per List response (containerd sends blocks of 100).
LIST_CHUNK = 100
#: Bytes per Read response (containerd's copy buffer is 1 MiB).
READ_CHUNK = 1 << 20


def info_to_pb(info: ContentInfo) -> Info:
    return Info(
        digest=info.digest,
        size=info.size,
        created_at=info.created_at,
        updated_at=info.updated_at,
        labels=dict(info.labels),
    )


def status_to_pb(status: IngestStatus) -> Status:
    return Status(
        started_at=status.started_at,
        updated_at=status.updated_at,
        ref=status.ref,
        offset=status.offset,
        total=status.total,
        expected=status.expected,
    )


def _digest(value: str, field: str) -> str:
    return validate_digest(field, required(value, field))


def _non_negative(value: int, field: str) -> int:
    if value < 0:
        raise InvalidArgument(f"{field}: must not be negative, not {value}")
    return value


class ContentService(ContentBase):
    def __init__(self, content: NamespacedContent, bus: EventBus) -> None:
        self.content = content
        self.bus = bus

    async def info(self, info_request: InfoRequest) -> InfoResponse:
        digest = _digest(info_request.digest, "digest")
        return InfoResponse(info=info_to_pb(await self.content.info(request_namespace(), digest)))

    async def update(self, update_request: UpdateRequest) -> UpdateResponse:
        req = update_request
        digest = _digest(req.info.digest, "info.digest")
        paths = label_paths(req.update_mask.paths, f"content {digest}")
        # Only labels are mutable; size and times in the request are ignored, as in containerd.
        wanted = ContentInfo(digest, 0, req.info.created_at, req.info.updated_at, dict(req.info.labels))
        info = await self.content.update(request_namespace(), wanted, paths)
        return UpdateResponse(info=info_to_pb(info))

    async def list(self, list_content_request: ListContentRequest) -> AsyncIterator[ListContentResponse]:
        block: list[Info] = []
        async for info in self.content.walk(request_namespace(), list(list_content_request.filters)):
            block.append(info_to_pb(info))
            if len(block) >= LIST_CHUNK:
                yield ListContentResponse(info=block)
                block = []
        if block:
            yield ListContentResponse(info=block)

    async def delete(self, delete_content_request: DeleteContentRequest) -> pb.Empty:
        namespace = request_namespace()
        digest = _digest(delete_content_request.digest, "digest")
        await self.content.delete(namespace, digest)
        self.bus.publish("/content/delete", ContentDelete(digest=digest), namespace)
        return pb.Empty()

    async def read(self, read_content_request: ReadContentRequest) -> AsyncIterator[ReadContentResponse]:
        req = read_content_request
        digest = _digest(req.digest, "digest")
        offset = _non_negative(req.offset, "offset")
        size = _non_negative(req.size, "size")
        reader = await self.content.reader(request_namespace(), digest)
        try:
            if offset > reader.size:
                raise GRPCError(
                    Code.OUT_OF_RANGE, f"offset {offset}: read past the end of {digest} ({reader.size} bytes)"
                )
            end = reader.size if size == 0 else min(reader.size, offset + size)
            while offset < end:
                data = await reader.read_at(offset, min(READ_CHUNK, end - offset))
                if not data:
                    raise GRPCError(Code.DATA_LOSS, f"content {digest}: ended at {offset} of {end} bytes")
                yield ReadContentResponse(offset=offset, data=data)
                offset += len(data)
        finally:
            await reader.close()

    async def status(self, status_request: StatusRequest) -> StatusResponse:
        ref = required(status_request.ref, "ref")
        return StatusResponse(status=status_to_pb(await self.content.status(request_namespace(), ref)))

    async def list_statuses(self, list_statuses_request: ListStatusesRequest) -> ListStatusesResponse:
        statuses = await self.content.list_statuses(request_namespace(), list(list_statuses_request.filters))
        return ListStatusesResponse(statuses=[status_to_pb(s) for s in statuses])

    async def abort(self, abort_request: AbortRequest) -> pb.Empty:
        await self.content.abort(request_namespace(), required(abort_request.ref, "ref"))
        return pb.Empty()

    async def write(
        self, write_content_request_iterator: AsyncIterator[WriteContentRequest]
    ) -> AsyncIterator[WriteContentResponse]:
        requests = write_content_request_iterator
        first = await anext(requests, None)
        if first is None:
            return  # the client closed before asking anything
        namespace = request_namespace()
        ref = required(first.ref, "ref")
        total = _non_negative(first.total, "total")
        expected = validate_digest("expected", first.expected) if first.expected else ""
        writer = await self.content.writer(namespace, ref, total, expected, lease=request_lease())
        try:
            session = _WriteSession(self.content, namespace, ref, writer, total, expected)
            req: WriteContentRequest | None = first
            while req is not None:
                yield await session.handle(req)
                req = await anext(requests, None)
        finally:
            # A dropped stream cancels us: the close (lock release) must still finish.
            await asyncio.shield(writer.close())


class _WriteSession:
    """The state of one Write stream: the locked writer and what the client announced."""

    def __init__(
        self,
        content: NamespacedContent,
        namespace: str,
        ref: str,
        writer: ContentWriter,
        total: int,
        expected: str,
    ) -> None:
        self.content = content
        self.namespace = namespace
        self.ref = ref
        self.writer = writer
        self.total = total
        self.expected = expected
        self.digest = ""  # set once committed

    async def handle(self, req: WriteContentRequest) -> WriteContentResponse:
        if self.digest:
            raise InvalidArgument(
                f"ref {quote(self.ref)}: already committed as {self.digest}; end the stream"
            )
        if req.ref and req.ref != self.ref:
            raise InvalidArgument(f"ref: {quote(req.ref)} differs from the stream's ref {quote(self.ref)}")
        if req.expected:
            self.expected = validate_digest("expected", req.expected)
        if _non_negative(req.total, "total"):
            self.total = req.total
        offset = _non_negative(req.offset, "offset")
        w = self.writer
        resp = WriteContentResponse(action=req.action, offset=w.offset, total=self.total)
        if req.action == WriteAction.STAT:
            status = await self.content.status(self.namespace, self.ref)
            resp.started_at, resp.updated_at = status.started_at, status.updated_at
            resp.digest = w.digest()
            return resp
        if req.action not in (WriteAction.WRITE, WriteAction.COMMIT):
            raise InvalidArgument(f"action: unknown write action {int(req.action)}")
        if offset > 0 and offset != w.offset:
            raise GRPCError(
                Code.OUT_OF_RANGE,
                f"ref {quote(self.ref)}: write @{offset} must occur at current offset {w.offset}",
            )
        if offset == 0 and w.offset > 0:
            await w.truncate(0)  # containerd: a write at 0 restarts the ingest
        if req.data:
            await w.write(req.data)
        resp.offset = w.offset
        if req.action == WriteAction.COMMIT:
            self.digest = await w.commit(self.total, self.expected, dict(req.labels))
            resp.digest = self.digest
        else:
            resp.digest = w.digest()
        return resp


async def init(ic: InitContext) -> ContentService:
    db: MetadataDB = ic.get("berth.metadata.v1")
    return ContentService(db.content, ic.bus)


@hookimpl
def berth_register(registry: Registry) -> None:
    registry.add(
        type="berth.grpc.v1", id="content", init=init, requires=["berth.metadata.v1", "berth.events.v1"]
    )


__all__ = ["ContentService", "berth_register", "info_to_pb", "status_to_pb"]
