"""The ttrpc Events service shims publish to: ``containerd.services.events.ttrpc.v1.Events/Forward``.

Shims (berth's and containerd's) connect to TTRPC_ADDRESS, ``<grpc
address>.ttrpc``, and forward each event as an envelope (namespace, topic,
``Any``). The server hands every envelope to ``sink`` (the task manager),
which records exits and puts events on the bus. An envelope without a
namespace, topic or event is refused with InvalidArgument, so a shim retries
nothing that can never be taken.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import UTC, datetime

import betterproto.lib.google.protobuf as pb
import structlog

from daemon.errors import InvalidArgument
from daemon.events import Envelope
from daemon.ttrpc import Method, TtrpcServer
from protos.containerd.services.events.v1 import ForwardRequest

log = structlog.get_logger("berth.runtime.forward")

EVENTS_SERVICE = "containerd.services.events.ttrpc.v1.Events"


class ForwardServer:
    def __init__(self, sink: Callable[[Envelope], None]) -> None:
        self._sink = sink
        self._server = TtrpcServer({EVENTS_SERVICE: {"Forward": Method(ForwardRequest, self.forward)}})

    async def start(self, path: str | os.PathLike[str]) -> None:
        await self._server.start(path)

    async def stop(self) -> None:
        await self._server.stop()

    async def forward(self, request: ForwardRequest) -> pb.Empty:
        env = request.envelope
        if env is None or not env.topic or not env.namespace:
            raise InvalidArgument("envelope: topic and namespace must be set")
        if env.event is None or not env.event.type_url:
            raise InvalidArgument(f"envelope {env.topic}: event must be set (an Any with a type_url)")
        ts = env.timestamp if env.timestamp and env.timestamp.year > 1970 else datetime.now(UTC)
        self._sink(Envelope(timestamp=ts, namespace=env.namespace, topic=env.topic, event=env.event))
        return pb.Empty()
