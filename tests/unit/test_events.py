"""The event bus: delivery, overflow policies, filtering, close semantics, threads, metrics."""

from __future__ import annotations

import asyncio
import inspect
import sys
import threading
import types
from dataclasses import dataclass
from datetime import UTC, datetime

import betterproto
import pytest
from betterproto.lib.google.protobuf import Any as ProtoAny
from grpclib.const import Status

from daemon import events, typeurl
from daemon.errors import FailedPrecondition, InvalidArgument, ResourceExhausted, Unavailable
from daemon.events import (
    Envelope,
    EventBus,
    Overflow,
    SlowConsumer,
    Subscription,
    SubscriptionClosed,
)

TIMEOUT = 5.0


@dataclass(eq=False, repr=False)
class TaskExit(betterproto.Message):
    container_id: str = betterproto.string_field(1)
    exit_status: int = betterproto.uint32_field(2)
    labels: dict[str, str] = betterproto.map_field(  # noqa: RUF009
        3, betterproto.TYPE_STRING, betterproto.TYPE_STRING
    )


typeurl.register_type(TaskExit)
TASK_EXIT_URL = "tests.unit.test_events.TaskExit"  # not generated under protos.: the full module path


def ev(n: int) -> TaskExit:
    return TaskExit(container_id=f"c{n}", exit_status=n)


def ids(envs: list[Envelope]) -> list[str]:
    return [e.event.container_id for e in envs]


def drain(sub: Subscription) -> list[Envelope]:
    out = []
    while (env := sub.get_nowait()) is not None:
        out.append(env)
    return out


async def get(sub: Subscription) -> Envelope:
    return await asyncio.wait_for(sub.get(), TIMEOUT)


# -- delivery -----------------------------------------------------------------


async def test_publish_delivers_an_envelope() -> None:
    bus = EventBus()
    sub = bus.subscribe(name="t")
    before = datetime.now(UTC)
    bus.publish("/tasks/exit", ev(1), "default")
    env = await get(sub)
    assert (env.topic, env.namespace, env.event.container_id) == ("/tasks/exit", "default", "c1")
    assert env.timestamp.tzinfo is not None and env.timestamp.utcoffset() == UTC.utcoffset(None)
    assert before <= env.timestamp <= datetime.now(UTC)
    assert bus.published == 1


async def test_get_waits_for_a_publish() -> None:
    bus = EventBus()
    sub = bus.subscribe()
    waiter = asyncio.create_task(sub.get())
    await asyncio.sleep(0)  # let it block
    assert not waiter.done()
    bus.publish("/tasks/exit", ev(7), "default")
    env = await asyncio.wait_for(waiter, TIMEOUT)
    assert env.event.container_id == "c7"


async def test_cancelled_get_does_not_lose_later_events() -> None:
    bus = EventBus()
    sub = bus.subscribe()
    waiter = asyncio.create_task(sub.get())
    await asyncio.sleep(0)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    bus.publish("/tasks/exit", ev(1), "default")
    assert (await get(sub)).event.container_id == "c1"


async def test_publish_is_a_plain_function_usable_from_sync_callbacks() -> None:
    assert not inspect.iscoroutinefunction(EventBus.publish)
    bus = EventBus()
    sub = bus.subscribe()
    bus.publish("/tasks/start", ev(1), "default")  # returns at once, nothing to await
    assert sub.depth == 1
    loop = asyncio.get_running_loop()
    loop.call_soon(bus.publish, "/tasks/exit", ev(2), "default")  # e.g. a child-watcher callback
    assert ids([await get(sub), await get(sub)]) == ["c1", "c2"]


async def test_publish_threadsafe_from_a_worker_thread() -> None:
    bus = EventBus()
    sub = bus.subscribe()
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            for n in range(5):
                bus.publish_threadsafe("/tasks/exit", ev(n), "default")
        except BaseException as exc:  # noqa: BLE001 - reported by the assert below
            errors.append(exc)

    thread = threading.Thread(target=worker)
    thread.start()
    await asyncio.to_thread(thread.join, TIMEOUT)
    assert errors == []
    assert ids([await get(sub) for _ in range(5)]) == [f"c{n}" for n in range(5)]
    # on the loop thread itself it delivers at once
    bus.publish_threadsafe("/tasks/exit", ev(9), "default")
    assert ids(drain(sub)) == ["c9"]


def test_publish_threadsafe_needs_a_loop() -> None:
    bus = EventBus()  # created and used outside any loop
    with pytest.raises(FailedPrecondition, match="no event loop"):
        bus.publish_threadsafe("/tasks/exit", ev(1), "default")


@pytest.mark.parametrize(
    "topic", ["", "tasks/exit", "/", "/tasks//exit", "/tasks/", "/tasks/ex it", "/tasks/\u00e9"]
)
def test_publish_rejects_bad_topics(topic: str) -> None:
    bus = EventBus()
    with pytest.raises(InvalidArgument, match="topic"):
        bus.publish(topic, ev(1), "default")
    assert bus.published == 0


def test_publish_accepts_containerd_topics() -> None:
    bus = EventBus()
    for topic in ("/tasks/exit", "/snapshot/prepare", "/images/create", "/a.b/c_d-e/F9"):
        bus.publish(topic, ev(1), "default")
    assert bus.published == 4


def test_publish_rejects_empty_namespace() -> None:
    bus = EventBus()
    with pytest.raises(InvalidArgument, match="namespace"):
        bus.publish("/tasks/exit", ev(1), "")
    with pytest.raises(InvalidArgument, match="namespace"):
        bus.forward(Envelope(datetime.now(UTC), "", "/tasks/exit", ev(1)))


async def test_forward_keeps_the_envelope_as_received() -> None:
    bus = EventBus()
    sub = bus.subscribe()
    stamp = datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)
    raw = typeurl.pack_any(ev(3))
    bus.forward(Envelope(stamp, "k8s.io", "/tasks/exit", raw))
    env = await get(sub)
    assert env.timestamp == stamp and env.event is raw
    decoded = typeurl.decode_any(env.event)
    assert isinstance(decoded, TaskExit) and decoded.container_id == "c3"


# -- overflow -----------------------------------------------------------------


def test_drop_oldest_keeps_the_newest() -> None:
    bus = EventBus()
    sub = bus.subscribe(maxsize=3, overflow=Overflow.DROP_OLDEST, name="slow")
    for n in range(1, 6):
        bus.publish("/tasks/exit", ev(n), "default")
    assert sub.dropped == 2 and bus.dropped == 2
    assert [(s.name, s.depth, s.maxsize, s.dropped, s.overflow) for s in bus.stats()] == [
        ("slow", 3, 3, 2, Overflow.DROP_OLDEST)
    ]
    assert ids(drain(sub)) == ["c3", "c4", "c5"]


def test_drop_oldest_is_the_default() -> None:
    sub = EventBus().subscribe()
    assert sub.overflow is Overflow.DROP_OLDEST and sub.maxsize == 1024


def test_drop_newest_keeps_the_oldest() -> None:
    bus = EventBus()
    sub = bus.subscribe(maxsize=3, overflow=Overflow.DROP_NEWEST)
    for n in range(1, 6):
        bus.publish("/tasks/exit", ev(n), "default")
    assert sub.dropped == 2 and bus.dropped == 2
    assert ids(drain(sub)) == ["c1", "c2", "c3"]
    bus.publish("/tasks/exit", ev(6), "default")  # room again
    assert ids(drain(sub)) == ["c6"]


async def test_disconnect_delivers_what_was_queued_then_raises_slow_consumer() -> None:
    bus = EventBus()
    sub = bus.subscribe(maxsize=2, overflow=Overflow.DISCONNECT, name="grpc")
    other = bus.subscribe(maxsize=10)
    for n in range(1, 5):
        bus.publish("/tasks/exit", ev(n), "default")
    assert sub.closed and sub.dropped == 1 and bus.dropped == 1
    assert [s.name for s in bus.stats()] == [other.name]  # no longer fed
    received = []
    with pytest.raises(SlowConsumer) as info:
        async for env in sub:
            received.append(env)
    assert ids(received) == ["c1", "c2"]
    assert isinstance(info.value, ResourceExhausted) and info.value.status is Status.RESOURCE_EXHAUSTED
    assert '"grpc"' in str(info.value)
    assert ids(drain(other)) == ["c1", "c2", "c3", "c4"]  # others unaffected


async def test_disconnect_wakes_a_waiting_consumer_after_the_queue_drains() -> None:
    bus = EventBus()
    sub = bus.subscribe(maxsize=1, overflow=Overflow.DISCONNECT)
    bus.publish("/tasks/exit", ev(1), "default")
    assert (await get(sub)).event.container_id == "c1"
    waiter = asyncio.create_task(sub.get())
    await asyncio.sleep(0)
    bus.publish("/tasks/exit", ev(2), "default")  # fills the queue (size 1)
    assert (await asyncio.wait_for(waiter, TIMEOUT)).event.container_id == "c2"
    bus.publish("/tasks/exit", ev(3), "default")
    bus.publish("/tasks/exit", ev(4), "default")  # overflow
    assert (await get(sub)).event.container_id == "c3"
    with pytest.raises(SlowConsumer):
        await get(sub)


def test_maxsize_must_be_positive() -> None:
    bus = EventBus()
    for bad in (0, -1, True):
        with pytest.raises(InvalidArgument, match="maxsize"):
            bus.subscribe(maxsize=bad)


# -- filtering ----------------------------------------------------------------

TOPICS = ["/tasks/exit", "/tasks/start", "/tasksfoo/x", "/images/create", "/containers/delete"]


def publish_all(bus: EventBus) -> None:
    n = 0
    for ns in ("default", "k8s.io"):
        for topic in TOPICS:
            n += 1
            bus.publish(topic, TaskExit(container_id=f"{ns}{topic}", exit_status=n), ns)


def seen(sub: Subscription) -> list[str]:
    return ids(drain(sub))


def test_topic_prefix_matches_whole_components() -> None:
    bus = EventBus()
    tasks = bus.subscribe(topic_prefix="/tasks")
    slash = bus.subscribe(topic_prefix="/tasks/")
    root = bus.subscribe(topic_prefix="/")
    exact = bus.subscribe(topic_prefix="/tasks/exit")
    publish_all(bus)
    want = ["default/tasks/exit", "default/tasks/start", "k8s.io/tasks/exit", "k8s.io/tasks/start"]
    assert seen(tasks) == want
    assert seen(slash) == want
    assert len(seen(root)) == 10
    assert seen(exact) == ["default/tasks/exit", "k8s.io/tasks/exit"]


def test_namespace_filter() -> None:
    bus = EventBus()
    sub = bus.subscribe(namespace="k8s.io", topic_prefix="/images")
    publish_all(bus)
    assert seen(sub) == ["k8s.io/images/create"]


def test_containerd_filter_strings() -> None:
    bus = EventBus()
    exit_only = bus.subscribe(filters=['topic=="/tasks/exit"'])
    either = bus.subscribe(filters=['topic=="/images/create"', "namespace==k8s.io,topic~=^/containers/"])
    by_field = bus.subscribe(filters=["event.exit_status==3"])  # uint fields compare as decimal text
    by_id = bus.subscribe(filters=['event.container_id~="^k8s\\\\.io/tasks/"'])
    publish_all(bus)
    assert seen(exit_only) == ["default/tasks/exit", "k8s.io/tasks/exit"]
    assert seen(either) == ["default/images/create", "k8s.io/images/create", "k8s.io/containers/delete"]
    assert seen(by_field) == ["default/tasksfoo/x"]
    assert seen(by_id) == ["k8s.io/tasks/exit", "k8s.io/tasks/start"]


def test_filters_see_inside_forwarded_any_events() -> None:
    bus = EventBus()
    sub = bus.subscribe(filters=["event.labels.io.k8s.pod==p1"])
    stamp = datetime.now(UTC)
    hit = typeurl.pack_any(TaskExit(container_id="a", labels={"io.k8s.pod": "p1"}))
    miss = typeurl.pack_any(TaskExit(container_id="b", labels={"io.k8s.pod": "p2"}))
    unknown = ProtoAny(type_url="nobody.knows.This", value=b"\x0a\x01z")
    for raw in (hit, miss, unknown):
        bus.forward(Envelope(stamp, "default", "/tasks/exit", raw))
    got = drain(sub)
    assert [e.event for e in got] == [hit]


def test_bad_filter_is_rejected_at_subscribe() -> None:
    bus = EventBus()
    with pytest.raises(InvalidArgument, match="filters: parse error"):
        bus.subscribe(filters=["topic=/tasks/exit"])
    assert bus.stats() == []


def test_envelope_adaptor_fields() -> None:
    env = Envelope(datetime.now(UTC), "ns", "/tasks/exit", ev(4))
    adapt = events.envelope_adaptor(env)
    assert adapt(["topic"]) == ("/tasks/exit", True)
    assert adapt(["namespace"]) == ("ns", True)
    assert adapt(["event", "container_id"]) == ("c4", True)
    assert adapt(["event", "nope"]) == ("", False)
    assert adapt(["timestamp"]) == ("", False)
    assert adapt([]) == ("", False)


async def test_many_subscribers_each_get_everything_in_order() -> None:
    bus = EventBus()
    subs = [bus.subscribe(name=f"s{i}") for i in range(50)]
    for n in range(20):
        bus.publish("/tasks/exit", ev(n), "default")
    want = [f"c{n}" for n in range(20)]
    for sub in subs:
        assert ids([await get(sub) for _ in range(20)]) == want
    assert bus.published == 20 and bus.dropped == 0


# -- close ----------------------------------------------------------------------


async def test_subscription_close_discards_and_ends_iteration() -> None:
    bus = EventBus()
    sub = bus.subscribe()
    bus.publish("/tasks/exit", ev(1), "default")
    sub.close()
    sub.close()  # idempotent
    assert sub.closed and bus.stats() == []
    assert [env async for env in sub] == []
    with pytest.raises(SubscriptionClosed):
        await sub.get()
    bus.publish("/tasks/exit", ev(2), "default")  # not queued anywhere
    assert sub.depth == 0


async def test_async_with_closes() -> None:
    bus = EventBus()
    async with bus.subscribe() as sub:
        bus.publish("/tasks/exit", ev(1), "default")
        assert (await get(sub)).event.container_id == "c1"
    assert sub.closed and bus.stats() == []


async def test_close_wakes_a_blocked_consumer() -> None:
    bus = EventBus()
    sub = bus.subscribe()

    async def consume() -> list[Envelope]:
        return [env async for env in sub]

    task = asyncio.create_task(consume())
    await asyncio.sleep(0)
    sub.close()
    assert await asyncio.wait_for(task, TIMEOUT) == []


async def test_bus_close_lets_queued_events_be_read_then_ends() -> None:
    bus = EventBus()
    a = bus.subscribe()
    b = bus.subscribe()
    bus.publish("/tasks/exit", ev(1), "default")
    bus.close()
    assert ids([env async for env in a]) == ["c1"]
    assert ids([env async for env in b]) == ["c1"]
    bus.publish("/tasks/exit", ev(2), "default")  # late publishers are harmless
    assert bus.published == 1
    with pytest.raises(Unavailable, match="closed"):
        bus.subscribe()


# -- type urls and metrics --------------------------------------------------------


def test_type_url() -> None:
    class Generated:  # stands for a class betterproto generated into protos/containerd/events
        pass

    Generated.__module__ = "protos.containerd.events"
    assert typeurl.type_url(Generated()) == "containerd.events.Generated"
    assert typeurl.type_url(ev(1)) == TASK_EXIT_URL
    assert typeurl.type_url(ProtoAny(type_url="containerd.events.TaskExit")) == "containerd.events.TaskExit"

    @dataclass(eq=False, repr=False)
    class Custom(betterproto.Message):
        __type_url__ = "example.com.Custom"
        x: str = betterproto.string_field(1)

    assert typeurl.type_url(Custom()) == "example.com.Custom"


def test_pack_and_decode_any() -> None:
    packed = typeurl.pack_any(ev(5))
    assert packed.type_url == TASK_EXIT_URL
    assert typeurl.pack_any(packed) is packed
    decoded = typeurl.decode_any(packed)
    assert isinstance(decoded, TaskExit) and decoded.exit_status == 5
    assert typeurl.decode_any(ProtoAny(type_url="no.such.Type")) is None
    assert typeurl.decode_any(ProtoAny(type_url="")) is None


def test_decode_any_finds_generated_classes_without_registration(monkeypatch: pytest.MonkeyPatch) -> None:
    module = types.ModuleType("protos.berthtest_generated")

    @dataclass(eq=False, repr=False)
    class ImageCreate(betterproto.Message):
        name: str = betterproto.string_field(1)

    ImageCreate.__module__ = module.__name__
    module.ImageCreate = ImageCreate  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, module.__name__, module)
    packed = ProtoAny(type_url="berthtest_generated.ImageCreate", value=bytes(ImageCreate(name="busybox")))
    assert typeurl.type_url(ImageCreate()) == "berthtest_generated.ImageCreate"
    decoded = typeurl.decode_any(packed)
    assert isinstance(decoded, ImageCreate) and decoded.name == "busybox"
    # a type.googleapis.com/ prefix is tolerated
    assert (
        typeurl.decode_any(ProtoAny(type_url="type.googleapis.com/berthtest_generated.ImageCreate"))
        is not None
    )


def test_bus_collector() -> None:
    bus = EventBus()
    bus.subscribe(name="cri", maxsize=2)
    bus.subscribe(name="cri", maxsize=5)
    gone = bus.subscribe(name="grpc", maxsize=1, overflow=Overflow.DISCONNECT)
    for n in range(3):
        bus.publish("/tasks/exit", ev(n), "default")
    assert gone.closed
    samples = {(s.name, tuple(sorted(s.labels.items()))): s for s in events.bus_collector(bus)()}
    assert samples[("berth_events_published_total", ())].value == 3
    assert samples[("berth_events_published_total", ())].type == "counter"
    assert samples[("berth_events_queue_depth", (("subscriber", "cri"),))].value == 2 + 3
    assert samples[("berth_events_dropped_total", (("subscriber", "cri"),))].value == 1
    # a closed subscriber's drops stay counted (counters never go down)
    assert samples[("berth_events_dropped_total", (("subscriber", "grpc"),))].value == 1
    assert ("berth_events_queue_depth", (("subscriber", "grpc"),)) not in samples


# -- retained envelopes (exits found at start-up) -------------------------------------------


def test_retained_envelopes_replay_to_later_replaying_subscriptions(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr("daemon.events.time.monotonic", lambda: now[0])
    bus = EventBus()
    early = bus.subscribe(name="early", replay=True)
    at = datetime.now(UTC)
    bus.forward(Envelope(at, "default", "/tasks/exit", ev(1)), retain=10.0)
    bus.forward(Envelope(at, "default", "/tasks/start", ev(2)))  # not retained
    assert ids(drain(early)) == ["c1", "c2"]  # live, once: replay happens at subscribe time only

    late = bus.subscribe(name="late", replay=True)
    assert ids(drain(late)) == ["c1"]
    assert drain(bus.subscribe(name="plain")) == []  # without replay: from now on only
    assert drain(bus.subscribe(name="other-ns", namespace="k8s.io", replay=True)) == []  # filters apply

    now[0] += 10.5  # retention over
    assert drain(bus.subscribe(name="too-late", replay=True)) == []
