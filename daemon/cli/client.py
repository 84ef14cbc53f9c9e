"""A small typed client of berthd's containerd-compatible API.

Used by the ``berth`` CLI and by the integration tests, so both exercise the
same wire calls a third-party client would make.
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import AsyncIterable, AsyncIterator, Sequence

import betterproto.lib.google.protobuf as pb
from grpclib.client import Channel

from protos.berth.services.gc.v1 import CollectRequest, CollectResponse, GarbageCollectorStub
from protos.berth.services.images.v1 import (
    ExportRequest,
    ImportChunk,
    PullProgress,
    PullRequest,
    StoredImage,
    TransferStub,
)
from protos.containerd.services.content.v1 import (
    ContentStub,
    DeleteContentRequest,
    ListContentRequest,
    ReadContentRequest,
)
from protos.containerd.services.content.v1 import Info as ContentInfo
from protos.containerd.services.events.v1 import EventsStub, PublishRequest, SubscribeRequest
from protos.containerd.services.images.v1 import (
    DeleteImageRequest,
    GetImageRequest,
    ImagesStub,
    ListImagesRequest,
)
from protos.containerd.services.images.v1 import Image as PbImage
from protos.containerd.services.introspection.v1 import (
    IntrospectionStub,
    Plugin,
    PluginsRequest,
    ServerResponse,
)
from protos.containerd.services.namespaces.v1 import (
    CreateNamespaceRequest,
    DeleteNamespaceRequest,
    ListNamespacesRequest,
    Namespace,
    NamespacesStub,
    UpdateNamespaceRequest,
)
from protos.containerd.services.snapshots.v1 import Info as SnapshotInfo
from protos.containerd.services.snapshots.v1 import (
    ListSnapshotsRequest,
    RemoveSnapshotRequest,
    SnapshotsStub,
    StatSnapshotRequest,
)
from protos.containerd.services.version.v1 import VersionResponse, VersionStub
from protos.containerd.types import Envelope

NAMESPACE_HEADER = "containerd-namespace"
#: Largest JSON document (index, manifest, config) the CLI reads into memory.
MAX_DOCUMENT = 16 << 20


class DaemonUnreachable(Exception):
    """berthd's socket cannot be reached; the message says what to check."""


def probe(address: str) -> None:
    """Fail fast, with an operator's message, when nobody listens at ``address``."""
    if not os.path.exists(address):
        raise DaemonUnreachable(f"cannot connect to berthd at {address}: no such file; is berthd running?")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(2.0)
        s.connect(address)
    except OSError as exc:
        why = {
            errno.ECONNREFUSED: "connection refused",
            errno.EACCES: "permission denied",
            errno.ENOENT: "no such file",
        }.get(exc.errno or 0, exc.strerror or str(exc))
        raise DaemonUnreachable(f"cannot connect to berthd at {address}: {why}; is berthd running?") from exc
    finally:
        s.close()


class Client:
    """The native API, one method per operation the CLI offers.

    ``timeout`` bounds each unary call; transfers (pull, import, export) and
    blob reads stream for as long as they take.
    """

    def __init__(self, channel: Channel, address: str, namespace: str, timeout: float | None = 10.0) -> None:
        self.address = address
        self.namespace = namespace
        md = {NAMESPACE_HEADER: namespace}
        self._version = VersionStub(channel, timeout=timeout, metadata=md)
        self._intro = IntrospectionStub(channel, timeout=timeout, metadata=md)
        self._ns = NamespacesStub(channel, timeout=timeout, metadata=md)
        self._events = EventsStub(channel, metadata=md)
        self._images = ImagesStub(channel, timeout=timeout, metadata=md)
        self._content = ContentStub(channel, timeout=timeout, metadata=md)
        self._content_stream = ContentStub(channel, metadata=md)
        self._snapshots = SnapshotsStub(channel, timeout=timeout, metadata=md)
        self._transfer = TransferStub(channel, metadata=md)
        self._gc = GarbageCollectorStub(channel, timeout=timeout, metadata=md)

    async def check_reachable(self) -> None:
        probe(self.address)

    async def version(self) -> VersionResponse:
        return await self._version.version(pb.Empty())

    async def server_info(self) -> ServerResponse:
        return await self._intro.server(pb.Empty())

    async def plugins(self, filters: Sequence[str] = ()) -> list[Plugin]:
        return list((await self._intro.plugins(PluginsRequest(filters=list(filters)))).plugins)

    async def list_namespaces(self) -> list[Namespace]:
        return list((await self._ns.list(ListNamespacesRequest())).namespaces)

    async def create_namespace(self, name: str, labels: dict[str, str]) -> Namespace:
        resp = await self._ns.create(CreateNamespaceRequest(namespace=Namespace(name=name, labels=labels)))
        return resp.namespace

    async def label_namespace(self, name: str, labels: dict[str, str]) -> Namespace:
        """Set labels (empty value clears one) through a field mask, like ``ctr namespaces label``."""
        mask = pb.FieldMask(paths=[f"labels.{k}" for k in labels])
        keep = {k: v for k, v in labels.items() if v}
        req = UpdateNamespaceRequest(namespace=Namespace(name=name, labels=keep), update_mask=mask)
        return (await self._ns.update(req)).namespace

    async def delete_namespace(self, name: str) -> None:
        await self._ns.delete(DeleteNamespaceRequest(name=name))

    async def publish(self, topic: str, event: pb.Any) -> None:
        await self._events.publish(PublishRequest(topic=topic, event=event))

    async def subscribe(self, filters: Sequence[str] = ()) -> AsyncIterator[Envelope]:
        async for env in self._events.subscribe(SubscribeRequest(filters=list(filters))):
            yield env

    async def plugin_exports(self, type_: str) -> dict[str, str]:
        """The exports of the first loaded plugin of ``type_`` (e.g. the images plugin's defaults)."""
        for p in await self.plugins([f"type=={type_}"]):
            return dict(p.exports)
        return {}

    # -- images ---------------------------------------------------------------------

    async def list_images(self, filters: Sequence[str] = ()) -> list[PbImage]:
        return list((await self._images.list(ListImagesRequest(filters=list(filters)))).images)

    async def get_image(self, name: str) -> PbImage:
        return (await self._images.get(GetImageRequest(name=name))).image

    async def delete_image(self, name: str, sync: bool = False) -> None:
        await self._images.delete(DeleteImageRequest(name=name, sync=sync))

    async def pull(self, request: PullRequest) -> AsyncIterator[PullProgress]:
        async for message in self._transfer.pull(request):
            yield message

    async def import_archive(self, chunks: AsyncIterable[ImportChunk]) -> list[StoredImage]:
        return list((await self._transfer.import_(chunks)).images)

    async def export(self, names: Sequence[str], platform: str = "") -> AsyncIterator[bytes]:
        async for chunk in self._transfer.export(ExportRequest(names=list(names), platform=platform)):
            yield chunk.data

    # -- content --------------------------------------------------------------------

    async def list_content(self, filters: Sequence[str] = ()) -> list[ContentInfo]:
        req = ListContentRequest(filters=list(filters))
        return [info async for resp in self._content.list(req) for info in resp.info]

    async def read_content(self, digest: str) -> AsyncIterator[bytes]:
        async for resp in self._content_stream.read(ReadContentRequest(digest=digest)):
            yield resp.data

    async def read_document(self, digest: str) -> bytes:
        """A small blob (a JSON document) whole; ValueError past :data:`MAX_DOCUMENT` bytes."""
        data = bytearray()
        async for chunk in self.read_content(digest):
            data += chunk
            if len(data) > MAX_DOCUMENT:
                raise ValueError(f"content {digest}: larger than {MAX_DOCUMENT} bytes, not a document")
        return bytes(data)

    async def delete_content(self, digest: str) -> None:
        await self._content.delete(DeleteContentRequest(digest=digest))

    # -- snapshots ------------------------------------------------------------------

    async def list_snapshots(self, snapshotter: str, filters: Sequence[str] = ()) -> list[SnapshotInfo]:
        req = ListSnapshotsRequest(snapshotter=snapshotter, filters=list(filters))
        return [info async for resp in self._snapshots.list(req) for info in resp.info]

    async def stat_snapshot(self, snapshotter: str, key: str) -> SnapshotInfo:
        return (await self._snapshots.stat(StatSnapshotRequest(snapshotter=snapshotter, key=key))).info

    async def remove_snapshot(self, snapshotter: str, key: str) -> None:
        await self._snapshots.remove(RemoveSnapshotRequest(snapshotter=snapshotter, key=key))

    # -- gc -------------------------------------------------------------------------

    async def collect_garbage(self) -> CollectResponse:
        return await self._gc.collect(CollectRequest())
