"""A small typed client of berthd's containerd-compatible API.

Used by the ``berth`` CLI and by the integration tests, so both exercise the
same wire calls a third-party client would make.
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import AsyncIterator, Sequence

import betterproto.lib.google.protobuf as pb
from grpclib.client import Channel

from protos.containerd.services.events.v1 import EventsStub, PublishRequest, SubscribeRequest
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
from protos.containerd.services.version.v1 import VersionResponse, VersionStub
from protos.containerd.types import Envelope

NAMESPACE_HEADER = "containerd-namespace"


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
    """The native API, one method per operation the CLI offers."""

    def __init__(self, channel: Channel, address: str, namespace: str, timeout: float | None = 10.0) -> None:
        self.address = address
        self.namespace = namespace
        md = {NAMESPACE_HEADER: namespace}
        self._version = VersionStub(channel, timeout=timeout, metadata=md)
        self._intro = IntrospectionStub(channel, timeout=timeout, metadata=md)
        self._ns = NamespacesStub(channel, timeout=timeout, metadata=md)
        self._events = EventsStub(channel, metadata=md)

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
