"""``containerd.services.events.v1.Events``: the bus on the wire.

Publish and Forward put client events on the bus (namespace from the
``containerd-namespace`` header for Publish, from the envelope for Forward);
Subscribe streams envelopes matching containerd filter strings
(``topic``, ``namespace``, ``event.<field>``). A subscriber too slow to keep
up is disconnected with RESOURCE_EXHAUSTED rather than silently losing
events: a client that reconnects knows it missed some.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime

import betterproto.lib.google.protobuf as pb

from daemon import filters
from daemon.errors import InvalidArgument
from daemon.events import Envelope, EventBus, Overflow
from daemon.hookspecs import hookimpl
from daemon.registry import InitContext, Registry
from daemon.server import request_namespace
from daemon.typeurl import pack_any
from protos.containerd.services.events.v1 import EventsBase, ForwardRequest, PublishRequest, SubscribeRequest
from protos.containerd.types import Envelope as PbEnvelope

#: Queue length of one Subscribe stream before it is cut off.
SUBSCRIBER_QUEUE = 4096


def to_pb(env: Envelope) -> PbEnvelope:
    return PbEnvelope(
        timestamp=env.timestamp, namespace=env.namespace, topic=env.topic, event=pack_any(env.event)
    )


class EventsService(EventsBase):
    def __init__(self, bus: EventBus) -> None:
        self.bus = bus

    async def publish(self, publish_request: PublishRequest) -> pb.Empty:
        req = publish_request
        if req.event is None or not req.event.type_url:
            raise InvalidArgument("event: must be set (an Any with a type_url)")
        self.bus.publish(req.topic, req.event, request_namespace())
        return pb.Empty()

    async def forward(self, forward_request: ForwardRequest) -> pb.Empty:
        env = forward_request.envelope
        if env is None:
            raise InvalidArgument("envelope: must be set")
        if env.event is None or not env.event.type_url:
            raise InvalidArgument("envelope.event: must be set (an Any with a type_url)")
        ts = env.timestamp if env.timestamp and env.timestamp.year > 1970 else datetime.now(UTC)
        self.bus.forward(Envelope(timestamp=ts, namespace=env.namespace, topic=env.topic, event=env.event))
        return pb.Empty()

    async def subscribe(self, subscribe_request: SubscribeRequest) -> AsyncIterator[PbEnvelope]:
        wanted = list(subscribe_request.filters)
        filters.parse(wanted)  # InvalidArgument before the stream starts
        sub = self.bus.subscribe(
            filters=wanted,
            maxsize=SUBSCRIBER_QUEUE,
            overflow=Overflow.DISCONNECT,
            name="grpc.subscribe",
            replay=True,  # exits that happened while berthd was down (see EventBus.forward)
        )
        # Ends when the bus closes (daemon stopping); a subscriber that falls
        # SUBSCRIBER_QUEUE events behind gets SlowConsumer: RESOURCE_EXHAUSTED.
        async with sub:
            async for env in sub:
                yield to_pb(env)


async def init(ic: InitContext) -> EventsService:
    return EventsService(ic.get("berth.events.v1"))


@hookimpl
def berth_register(registry: Registry) -> None:
    registry.add(type="berth.grpc.v1", id="events", init=init, requires=["berth.events.v1"])
