"""A small typed client of berthd's containerd-compatible API.

Used by the ``berth`` CLI and by the integration tests, so both exercise the
same wire calls a third-party client would make.

Each service's generated module is imported by the first call to it, and its
stub made then: a CLI command pays for the services it calls, not for all
of them (importing a generated module builds every message class in it).
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import AsyncIterable, AsyncIterator, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    import betterproto.lib.google.protobuf as pb
    from betterproto.grpc.grpclib_client import ServiceStub
    from grpclib.client import Channel

    from protos.berth.services.gc.v1 import CollectResponse
    from protos.berth.services.images.v1 import ImportChunk, PullProgress, PullRequest, StoredImage
    from protos.containerd.services.content.v1 import Info as ContentInfo
    from protos.containerd.services.images.v1 import Image as PbImage
    from protos.containerd.services.introspection.v1 import Plugin, ServerResponse
    from protos.containerd.services.namespaces.v1 import Namespace
    from protos.containerd.services.snapshots.v1 import Info as SnapshotInfo
    from protos.containerd.services.version.v1 import VersionResponse
    from protos.containerd.types import Envelope

    StubT = TypeVar("StubT", bound=ServiceStub)
else:
    StubT = TypeVar("StubT")

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

    ``timeout`` bounds each unary call; transfers (pull, import, export),
    blob reads and event subscriptions stream for as long as they take.
    """

    def __init__(self, channel: Channel, address: str, namespace: str, timeout: float | None = 10.0) -> None:
        self.address = address
        self.namespace = namespace
        self._channel = channel
        self._timeout = timeout
        self._md = {NAMESPACE_HEADER: namespace}
        self._stubs: dict[tuple[type[Any], bool], Any] = {}

    def _stub(self, cls: type[StubT], *, bounded: bool = True) -> StubT:
        """The namespace's stub of service ``cls``; ``bounded``: its calls have the client's timeout."""
        stub = self._stubs.get((cls, bounded))
        if stub is None:
            timeout = self._timeout if bounded else None
            stub = self._stubs[(cls, bounded)] = cls(self._channel, timeout=timeout, metadata=self._md)
        return stub  # type: ignore[no-any-return]

    async def check_reachable(self) -> None:
        probe(self.address)

    async def version(self) -> VersionResponse:
        import betterproto.lib.google.protobuf as pb

        from protos.containerd.services.version.v1 import VersionStub

        return await self._stub(VersionStub).version(pb.Empty())

    async def server_info(self) -> ServerResponse:
        import betterproto.lib.google.protobuf as pb

        from protos.containerd.services.introspection.v1 import IntrospectionStub

        return await self._stub(IntrospectionStub).server(pb.Empty())

    async def plugins(self, filters: Sequence[str] = ()) -> list[Plugin]:
        from protos.containerd.services.introspection.v1 import IntrospectionStub, PluginsRequest

        return list(
            (await self._stub(IntrospectionStub).plugins(PluginsRequest(filters=list(filters)))).plugins
        )

    async def list_namespaces(self) -> list[Namespace]:
        from protos.containerd.services.namespaces.v1 import ListNamespacesRequest, NamespacesStub

        return list((await self._stub(NamespacesStub).list(ListNamespacesRequest())).namespaces)

    async def create_namespace(self, name: str, labels: dict[str, str]) -> Namespace:
        from protos.containerd.services.namespaces.v1 import CreateNamespaceRequest, Namespace, NamespacesStub

        req = CreateNamespaceRequest(namespace=Namespace(name=name, labels=labels))
        return (await self._stub(NamespacesStub).create(req)).namespace

    async def label_namespace(self, name: str, labels: dict[str, str]) -> Namespace:
        """Set labels (empty value clears one) through a field mask, like ``ctr namespaces label``."""
        import betterproto.lib.google.protobuf as pb

        from protos.containerd.services.namespaces.v1 import Namespace, NamespacesStub, UpdateNamespaceRequest

        mask = pb.FieldMask(paths=[f"labels.{k}" for k in labels])
        keep = {k: v for k, v in labels.items() if v}
        req = UpdateNamespaceRequest(namespace=Namespace(name=name, labels=keep), update_mask=mask)
        return (await self._stub(NamespacesStub).update(req)).namespace

    async def delete_namespace(self, name: str) -> None:
        from protos.containerd.services.namespaces.v1 import DeleteNamespaceRequest, NamespacesStub

        await self._stub(NamespacesStub).delete(DeleteNamespaceRequest(name=name))

    async def publish(self, topic: str, event: pb.Any) -> None:
        from protos.containerd.services.events.v1 import EventsStub, PublishRequest

        await self._stub(EventsStub).publish(PublishRequest(topic=topic, event=event))

    async def subscribe(self, filters: Sequence[str] = ()) -> AsyncIterator[Envelope]:
        from protos.containerd.services.events.v1 import EventsStub, SubscribeRequest

        stub = self._stub(EventsStub, bounded=False)
        async for env in stub.subscribe(SubscribeRequest(filters=list(filters))):
            yield env

    async def plugin_exports(self, type_: str) -> dict[str, str]:
        """The exports of the first loaded plugin of ``type_`` (e.g. the images plugin's defaults)."""
        for p in await self.plugins([f"type=={type_}"]):
            return dict(p.exports)
        return {}

    # -- images ---------------------------------------------------------------------

    async def list_images(self, filters: Sequence[str] = ()) -> list[PbImage]:
        from protos.containerd.services.images.v1 import ImagesStub, ListImagesRequest

        return list((await self._stub(ImagesStub).list(ListImagesRequest(filters=list(filters)))).images)

    async def get_image(self, name: str) -> PbImage:
        from protos.containerd.services.images.v1 import GetImageRequest, ImagesStub

        return (await self._stub(ImagesStub).get(GetImageRequest(name=name))).image

    async def delete_image(self, name: str, sync: bool = False) -> None:
        from protos.containerd.services.images.v1 import DeleteImageRequest, ImagesStub

        await self._stub(ImagesStub).delete(DeleteImageRequest(name=name, sync=sync))

    async def pull(self, request: PullRequest) -> AsyncIterator[PullProgress]:
        from protos.berth.services.images.v1 import TransferStub

        async for message in self._stub(TransferStub, bounded=False).pull(request):
            yield message

    async def import_archive(self, chunks: AsyncIterable[ImportChunk]) -> list[StoredImage]:
        from protos.berth.services.images.v1 import TransferStub

        return list((await self._stub(TransferStub, bounded=False).import_(chunks)).images)

    async def export(self, names: Sequence[str], platform: str = "") -> AsyncIterator[bytes]:
        from protos.berth.services.images.v1 import ExportRequest, TransferStub

        req = ExportRequest(names=list(names), platform=platform)
        async for chunk in self._stub(TransferStub, bounded=False).export(req):
            yield chunk.data

    # -- content --------------------------------------------------------------------

    async def list_content(self, filters: Sequence[str] = ()) -> list[ContentInfo]:
        from protos.containerd.services.content.v1 import ContentStub, ListContentRequest

        req = ListContentRequest(filters=list(filters))
        return [info async for resp in self._stub(ContentStub).list(req) for info in resp.info]

    async def read_content(self, digest: str) -> AsyncIterator[bytes]:
        from protos.containerd.services.content.v1 import ContentStub, ReadContentRequest

        async for resp in self._stub(ContentStub, bounded=False).read(ReadContentRequest(digest=digest)):
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
        from protos.containerd.services.content.v1 import ContentStub, DeleteContentRequest

        await self._stub(ContentStub).delete(DeleteContentRequest(digest=digest))

    # -- snapshots ------------------------------------------------------------------

    async def list_snapshots(self, snapshotter: str, filters: Sequence[str] = ()) -> list[SnapshotInfo]:
        from protos.containerd.services.snapshots.v1 import ListSnapshotsRequest, SnapshotsStub

        req = ListSnapshotsRequest(snapshotter=snapshotter, filters=list(filters))
        return [info async for resp in self._stub(SnapshotsStub).list(req) for info in resp.info]

    async def stat_snapshot(self, snapshotter: str, key: str) -> SnapshotInfo:
        from protos.containerd.services.snapshots.v1 import SnapshotsStub, StatSnapshotRequest

        req = StatSnapshotRequest(snapshotter=snapshotter, key=key)
        return (await self._stub(SnapshotsStub).stat(req)).info

    async def remove_snapshot(self, snapshotter: str, key: str) -> None:
        from protos.containerd.services.snapshots.v1 import RemoveSnapshotRequest, SnapshotsStub

        await self._stub(SnapshotsStub).remove(RemoveSnapshotRequest(snapshotter=snapshotter, key=key))

    # -- gc -------------------------------------------------------------------------

    async def collect_garbage(self) -> CollectResponse:
        from protos.berth.services.gc.v1 import CollectRequest, GarbageCollectorStub

        return await self._stub(GarbageCollectorStub).collect(CollectRequest())
