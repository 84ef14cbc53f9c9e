"""The one in-process event bus: publish/subscribe with topics and namespaces.

Publishers (plugins, the runtime relaying shim events, the Events service's
Publish/Forward) call :meth:`EventBus.publish`, a plain ``def`` that never
blocks and never awaits: an exit must be recorded even while every consumer
is busy. Each subscriber has its own bounded queue; filtering happens at
publish time, so a queue only ever holds envelopes its subscriber wants, in
publish order.

When a subscriber falls behind and its queue is full, its :class:`Overflow`
policy decides, and every loss is counted (per subscriber, per bus, and in
metrics via :func:`bus_collector`):

* ``DROP_OLDEST`` (default): the oldest queued envelope makes room. A late
  consumer of state changes (CRI container events, caches) cares most about
  the newest state, and the publisher is never slowed down.
* ``DROP_NEWEST``: the new envelope is discarded; the queue keeps the
  earliest history. For consumers that replay a start sequence.
* ``DISCONNECT``: the subscription is ended instead of losing anything
  silently. Envelopes already queued are still delivered, then
  :meth:`Subscription.get` raises :class:`SlowConsumer` (ResourceExhausted).
  Used by streams whose client must know it missed events, e.g. the gRPC
  Events.Subscribe, which reports RESOURCE_EXHAUSTED so the client resyncs.

Topics follow containerd (``/tasks/exit``, ``/images/create``); events are
betterproto messages, or ``google.protobuf.Any`` when forwarded as received
(:mod:`daemon.typeurl` converts).

Threads: the bus belongs to one event loop. From a worker thread use
:meth:`EventBus.publish_threadsafe`, which hops to the loop with
``call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import itertools
import re
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from types import TracebackType
from typing import Any

import structlog
from betterproto.lib.google.protobuf import Any as ProtoAny

from daemon import filters
from daemon.errors import FailedPrecondition, InvalidArgument, ResourceExhausted, Unavailable
from daemon.metrics import Sample
from daemon.typeurl import decode_any

log = structlog.get_logger("berth.events")

#: envelopes kept for replaying subscriptions at most (the oldest go first)
RETAIN_MAX = 1024

_TOPIC_COMPONENT = re.compile(r"[A-Za-z0-9._-]+")


@dataclass(frozen=True)
class Envelope:
    """One published event, as subscribers receive it."""

    timestamp: datetime  # tz-aware UTC
    namespace: str
    topic: str
    event: Any  # a betterproto.Message, or google.protobuf.Any when forwarded raw


class Overflow(enum.Enum):
    """What a full subscriber queue does with the next envelope (module doc)."""

    DROP_OLDEST = "drop_oldest"
    DROP_NEWEST = "drop_newest"
    DISCONNECT = "disconnect"


class SubscriptionClosed(Unavailable):
    """The subscription was closed (by its owner or because the bus closed)."""


class SlowConsumer(ResourceExhausted):
    """A ``DISCONNECT`` subscriber's queue overflowed; it was cut off."""


@dataclass(frozen=True)
class SubscriberStats:
    name: str
    depth: int
    maxsize: int
    dropped: int
    overflow: Overflow


def envelope_adaptor(env: Envelope) -> filters.Adaptor:
    """Field paths of an envelope for filters: ``topic``, ``namespace``, ``event.<field>...``.

    ``timestamp`` is not filterable (as in containerd).
    """

    def adapt(fieldpath: Sequence[str]) -> tuple[str, bool]:
        if not fieldpath:
            return "", False
        head = fieldpath[0]
        if head == "topic":
            return env.topic, env.topic != ""
        if head == "namespace":
            return env.namespace, env.namespace != ""
        if head == "event":
            event = env.event
            if isinstance(event, ProtoAny):
                try:
                    event = decode_any(event)
                except Exception:  # noqa: BLE001 - undecodable: no fields, not a crash
                    return "", False
            return filters.field_value(event, fieldpath[1:], decode_any)
        return "", False

    return adapt


def validate_topic(topic: str) -> None:
    """containerd's rule: "/" then "/"-separated non-empty ``[A-Za-z0-9._-]`` components."""
    if not isinstance(topic, str) or not topic:
        raise InvalidArgument("topic: must not be empty")
    if not topic.startswith("/"):
        raise InvalidArgument(f'topic "{topic}": must start with "/"')
    if topic == "/":
        raise InvalidArgument('topic "/": must have at least one component')
    for component in topic[1:].split("/"):
        if not _TOPIC_COMPONENT.fullmatch(component):
            raise InvalidArgument(
                f'topic "{topic}": component "{component}" must be non-empty [A-Za-z0-9._-]'
            )


def _validate_namespace(namespace: str) -> None:
    if not isinstance(namespace, str) or not namespace:
        raise InvalidArgument("namespace: must not be empty")


# -- subscriptions ------------------------------------------------------------


class Subscription:
    """A subscriber's bounded queue: an async iterator of :class:`Envelope`.

    ``async for env in sub`` ends normally when the subscription is closed and
    raises :class:`SlowConsumer` after a ``DISCONNECT`` overflow. Used as
    ``async with bus.subscribe(...) as sub`` it is closed on exit.

    Close semantics: :meth:`close` (the owner) discards what is queued;
    :meth:`EventBus.close` and a ``DISCONNECT`` overflow let what is queued be
    read first, then end the iteration.
    """

    def __init__(
        self,
        bus: EventBus,
        *,
        ident: int,
        name: str,
        filter: filters.Filter,  # noqa: A002 - the filters module is taken
        topic_prefix: str | None,
        namespace: str | None,
        maxsize: int,
        overflow: Overflow,
    ) -> None:
        self.name = name
        self.maxsize = maxsize
        self.overflow = overflow
        self.dropped = 0
        self.ident = ident
        self._bus: EventBus | None = bus
        self._filter = filter
        self._prefix = topic_prefix.rstrip("/") if topic_prefix else None
        self._namespace = namespace
        self._queue: deque[Envelope] = deque()
        self._waiters: list[asyncio.Future[None]] = []
        self._end: SubscriptionClosed | SlowConsumer | None = None  # set once no more envelopes will come

    @property
    def depth(self) -> int:
        return len(self._queue)

    @property
    def closed(self) -> bool:
        return self._end is not None

    def wants(self, env: Envelope) -> bool:
        if self._namespace is not None and env.namespace != self._namespace:
            return False
        if self._prefix is not None and not (
            self._prefix == "" or env.topic == self._prefix or env.topic.startswith(self._prefix + "/")
        ):
            return False
        return self._filter is filters.ALWAYS or self._filter.match(envelope_adaptor(env))

    def _offer(self, env: Envelope) -> int:
        """Queue an envelope under the overflow policy; returns how many were dropped."""
        if self._end is not None:
            return 0
        if len(self._queue) < self.maxsize:
            self._queue.append(env)
            self._wake()
            return 0
        self.dropped += 1
        if self.dropped == 1:
            log.warning(
                "events.overflow", subscriber=self.name, maxsize=self.maxsize, policy=self.overflow.value
            )
        if self.overflow is Overflow.DROP_OLDEST:
            self._queue.popleft()
            self._queue.append(env)
        elif self.overflow is Overflow.DISCONNECT:
            self._finish(
                SlowConsumer(
                    f'event subscriber "{self.name}": queue full ({self.maxsize} events), disconnected'
                )
            )
        return 1

    def _finish(self, end: SubscriptionClosed | SlowConsumer, *, discard: bool = False) -> None:
        if self._end is None:
            self._end = end
        if discard:
            self._queue.clear()
        bus, self._bus = self._bus, None
        if bus is not None:
            bus._remove(self)
        self._wake()

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    async def get(self) -> Envelope:
        """The next envelope; raises SubscriptionClosed or SlowConsumer at the end."""
        while not self._queue:
            if self._end is not None:
                raise self._ended()
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.append(fut)
            await fut
        return self._queue.popleft()

    def get_nowait(self) -> Envelope | None:
        """The next queued envelope, or None if nothing is queued (end errors as ``get``)."""
        if self._queue:
            return self._queue.popleft()
        if self._end is not None:
            raise self._ended()
        return None

    def _ended(self) -> SubscriptionClosed | SlowConsumer:
        assert self._end is not None
        return type(self._end)(self._end.message)  # a fresh exception per raise: no growing traceback

    def close(self) -> None:
        """Stop receiving; queued envelopes are discarded. Idempotent."""
        self._finish(SubscriptionClosed(f'event subscriber "{self.name}": closed'), discard=True)

    def __aiter__(self) -> AsyncIterator[Envelope]:
        return self

    async def __anext__(self) -> Envelope:
        try:
            return await self.get()
        except SubscriptionClosed:
            raise StopAsyncIteration from None

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Subscription {self.name!r} depth={self.depth}/{self.maxsize} dropped={self.dropped}>"


class EventBus:
    """Fan-out of envelopes to subscriptions (see the module doc for policies)."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.published = 0
        self.dropped = 0
        self._loop = loop
        self._subs: dict[int, Subscription] = {}
        self._ids = itertools.count(1)
        self._dropped_by_name: dict[str, int] = {}
        self._closed = False
        self._retained: deque[tuple[float, Envelope]] = deque(maxlen=RETAIN_MAX)

    # -- publishing --------------------------------------------------------

    def publish(self, topic: str, event: Any, namespace: str) -> None:
        """Deliver an event to every matching subscriber; never blocks.

        Raises InvalidArgument for a bad topic or empty namespace. After
        :meth:`close` it is a no-op, so late publishers at shutdown are harmless.
        """
        validate_topic(topic)
        _validate_namespace(namespace)
        self._dispatch(Envelope(datetime.now(UTC), namespace, topic, event))

    def forward(self, envelope: Envelope, *, retain: float = 0.0) -> None:
        """Deliver an envelope as received (its timestamp and namespace kept).

        ``retain`` > 0: also keep it that many seconds for subscriptions made
        with ``replay=True`` (at most :data:`RETAIN_MAX` envelopes). The runtime
        retains the exits it finds at start-up: they happened while berthd was
        down, and a client can only subscribe once berthd is back.
        """
        validate_topic(envelope.topic)
        _validate_namespace(envelope.namespace)
        self._dispatch(envelope)
        if retain > 0 and not self._closed:
            self._retained.append((time.monotonic() + retain, envelope))

    def publish_threadsafe(self, topic: str, event: Any, namespace: str) -> None:
        """``publish`` from any thread: validated here, delivered on the bus's loop."""
        validate_topic(topic)
        _validate_namespace(namespace)
        env = Envelope(datetime.now(UTC), namespace, topic, event)
        loop = self._loop
        if loop is None:
            raise FailedPrecondition("event bus: no event loop attached (subscribe or publish on it first)")
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._dispatch(env)
        else:
            loop.call_soon_threadsafe(self._dispatch, env)

    def _dispatch(self, env: Envelope) -> None:
        if self._closed:
            log.debug("events.publish_after_close", topic=env.topic, namespace=env.namespace)
            return
        self._attach()
        self.published += 1
        for sub in tuple(self._subs.values()):
            try:
                wanted = sub.wants(env)
            except Exception:  # one broken filter must not stop delivery
                log.exception("events.filter_failed", subscriber=sub.name, topic=env.topic)
                continue
            if wanted and sub._offer(env):
                self.dropped += 1
                self._dropped_by_name[sub.name] = self._dropped_by_name.get(sub.name, 0) + 1

    def _attach(self) -> None:
        if self._loop is None:
            with contextlib.suppress(RuntimeError):
                self._loop = asyncio.get_running_loop()

    # -- subscribing -------------------------------------------------------

    def subscribe(
        self,
        *,
        filters: Sequence[str] = (),
        topic_prefix: str | None = None,
        namespace: str | None = None,
        maxsize: int = 1024,
        overflow: Overflow = Overflow.DROP_OLDEST,
        name: str = "",
        replay: bool = False,
    ) -> Subscription:
        """A new subscription receiving envelopes published from now on.

        With ``replay``, it first receives the matching retained envelopes
        (see :meth:`forward`) whose retention has not expired.

        * ``filters``: containerd filter strings over ``topic``, ``namespace``
          and ``event.<field>`` (OR across strings; see :mod:`daemon.filters`).
        * ``topic_prefix``: whole components, ``/tasks`` matches ``/tasks/exit``
          but not ``/tasksfoo``.
        * ``namespace``: exact match.
        * ``name``: shown in stats and metrics; use a role ("cri",
          "grpc-subscribe"), not a per-client id, to keep metric labels few.
        """
        if self._closed:
            raise Unavailable("event bus: closed")
        if isinstance(maxsize, bool) or not isinstance(maxsize, int) or maxsize < 1:
            raise InvalidArgument(f"maxsize: must be a positive integer, got {maxsize!r}")
        if not isinstance(overflow, Overflow):
            raise InvalidArgument(f"overflow: must be an Overflow, got {overflow!r}")
        if namespace is not None:
            _validate_namespace(namespace)
        parsed = filters_parse(filters)
        ident = next(self._ids)
        sub = Subscription(
            self,
            ident=ident,
            name=name or f"sub-{ident}",
            filter=parsed,
            topic_prefix=topic_prefix,
            namespace=namespace,
            maxsize=maxsize,
            overflow=overflow,
        )
        self._subs[ident] = sub
        self._attach()
        if replay:
            now = time.monotonic()
            for until, env in tuple(self._retained):
                if until > now and sub.wants(env):
                    sub._offer(env)
        log.debug("events.subscribe", subscriber=sub.name, filters=list(filters), maxsize=maxsize)
        return sub

    def _remove(self, sub: Subscription) -> None:
        self._subs.pop(sub.ident, None)

    def stats(self) -> list[SubscriberStats]:
        return [
            SubscriberStats(s.name, s.depth, s.maxsize, s.dropped, s.overflow) for s in self._subs.values()
        ]

    def dropped_by_name(self) -> dict[str, int]:
        """Drops per subscriber name since start, including closed subscribers (monotonic)."""
        return dict(self._dropped_by_name)

    def close(self) -> None:
        """End every subscription (queued envelopes stay readable); later publishes are ignored."""
        self._closed = True
        for sub in tuple(self._subs.values()):
            sub._finish(SubscriptionClosed(f'event subscriber "{sub.name}": event bus closed'))


filters_parse = filters.parse  # ``subscribe``'s parameter is named ``filters``


def bus_collector(bus: EventBus) -> Callable[[], Iterable[Sample]]:
    """A metrics collector for the bus: queue depth and drops per subscriber name, totals."""

    def collect() -> Iterable[Sample]:
        yield Sample(
            "berth_events_published_total",
            float(bus.published),
            help="Events published on the in-process bus.",
            type="counter",
        )
        depth: dict[str, int] = {}
        for st in bus.stats():
            depth[st.name] = depth.get(st.name, 0) + st.depth
        for name, value in sorted(depth.items()):
            yield Sample(
                "berth_events_queue_depth",
                float(value),
                {"subscriber": name},
                help="Envelopes waiting in subscriber queues.",
                type="gauge",
            )
        dropped = bus.dropped_by_name()
        for name in sorted(set(depth) | set(dropped)):
            yield Sample(
                "berth_events_dropped_total",
                float(dropped.get(name, 0)),
                {"subscriber": name},
                help="Envelopes dropped because a subscriber queue was full.",
                type="counter",
            )

    return collect
