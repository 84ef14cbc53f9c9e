"""Publisher against a real TtrpcServer serving Events/Forward on a tmp socket.

The server stands in for berthd: it records every envelope it is handed, and
can be stopped and started again on the same path to play a berthd restart.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import betterproto.lib.google.protobuf as pb
import pytest

from daemon.errors import InvalidArgument
from daemon.ttrpc import TtrpcServer, request_metadata
from daemon.ttrpc.services import EVENTS_METHODS, EVENTS_SERVICE, bind
from daemon.typeurl import decode_any
from plugins.runtime.runc_v2.shim.publisher import NAMESPACE_HEADER, Publisher
from protos.containerd.events import TaskCreate, TaskExit, TaskStart
from protos.containerd.services.events.ttrpc.v1 import ForwardRequest
from protos.containerd.types import Envelope


class FakeBerthd:
    """Events/Forward recorder; ``reject`` makes it refuse topics for good."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.received: list[Envelope] = []
        self.metadata: list[dict[str, list[str]]] = []
        self.reject: set[str] = set()
        self.arrived = asyncio.Event()
        self.server: TtrpcServer | None = None

    async def forward(self, request: ForwardRequest) -> pb.Empty:
        if request.envelope.topic in self.reject:
            raise InvalidArgument(f"topic {request.envelope.topic!r}: rejected")
        self.received.append(request.envelope)
        self.metadata.append(request_metadata())
        self.arrived.set()
        return pb.Empty()

    async def start(self) -> None:
        self.server = TtrpcServer({EVENTS_SERVICE: bind(EVENTS_METHODS, self)})
        await self.server.start(self.path)

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop()
            self.server = None

    def topics(self) -> list[str]:
        return [envelope.topic for envelope in self.received]


async def until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


@pytest.fixture
async def berthd() -> AsyncIterator[FakeBerthd]:
    with tempfile.TemporaryDirectory(prefix="berth-pub-", dir="/tmp") as tmp:
        fake = FakeBerthd(Path(tmp) / "berthd.sock.ttrpc")
        await fake.start()
        try:
            yield fake
        finally:
            await fake.stop()


def exit_event(pid: int) -> TaskExit:
    return TaskExit(container_id=f"c{pid}", id=f"c{pid}", pid=pid, exit_status=pid % 256)


async def test_events_arrive_in_order_wrapped_in_envelopes(berthd: FakeBerthd) -> None:
    publisher = Publisher(f"unix://{berthd.path}", "ns1")
    runner = asyncio.create_task(publisher.run())
    try:
        publisher.publish("/tasks/create", TaskCreate(container_id="a", pid=10))
        publisher.publish("/tasks/start", TaskStart(container_id="a", pid=10))
        for pid in range(100):
            publisher.publish("/tasks/exit", exit_event(pid))
        await until(lambda: len(berthd.received) == 102)
    finally:
        await publisher.close(timeout=5)
    assert runner.done()
    assert berthd.topics() == ["/tasks/create", "/tasks/start", *["/tasks/exit"] * 100]
    first = berthd.received[0]
    assert first.namespace == "ns1"
    assert first.event.type_url == "containerd.events.TaskCreate"
    assert decode_any(first.event) == TaskCreate(container_id="a", pid=10)
    assert abs(first.timestamp.timestamp() - time.time()) < 60
    assert [decode_any(e.event).pid for e in berthd.received[2:]] == list(range(100))  # type: ignore[union-attr]
    assert berthd.metadata[0] == {NAMESPACE_HEADER: ["ns1"]}
    assert publisher.pending == 0


async def test_events_published_while_berthd_is_down_arrive_when_it_is_back(berthd: FakeBerthd) -> None:
    publisher = Publisher(str(berthd.path), "ns1", backoff_max=0.1)
    runner = asyncio.create_task(publisher.run())
    try:
        publisher.publish("/tasks/start", TaskStart(container_id="a", pid=1))
        await until(lambda: berthd.topics() == ["/tasks/start"])
        await berthd.stop()  # berthd goes away; the publisher's connection breaks
        publisher.publish("/tasks/exit", exit_event(1))
        publisher.publish("/tasks/delete", TaskStart(container_id="a", pid=1))
        await asyncio.sleep(0.3)  # several reconnect attempts fail meanwhile
        assert publisher.pending == 2
        assert not runner.done()
        await berthd.start()
        await until(lambda: len(berthd.received) == 3)
    finally:
        await publisher.close(timeout=5)
    assert berthd.topics() == ["/tasks/start", "/tasks/exit", "/tasks/delete"]
    assert decode_any(berthd.received[1].event) == exit_event(1)


async def test_close_flushes_queued_events(berthd: FakeBerthd) -> None:
    publisher = Publisher(str(berthd.path), "ns1")
    for pid in range(20):
        publisher.publish("/tasks/exit", exit_event(pid))
    assert publisher.pending == 20
    await publisher.close(timeout=5)  # no runner was started: close delivers itself
    assert len(berthd.received) == 20
    assert publisher.pending == 0


async def test_close_gives_up_after_its_timeout_when_berthd_stays_down(berthd: FakeBerthd) -> None:
    await berthd.stop()
    publisher = Publisher(str(berthd.path), "ns1", backoff_max=0.05)
    runner = asyncio.create_task(publisher.run())
    publisher.publish("/tasks/exit", exit_event(7))
    started = time.monotonic()
    await publisher.close(timeout=0.3)
    assert 0.25 <= time.monotonic() - started < 3
    assert runner.done()
    assert publisher.pending == 1  # kept, not lost: nobody took it


async def test_full_queue_drops_oldest_non_exit_events_never_exits(berthd: FakeBerthd) -> None:
    await berthd.stop()
    publisher = Publisher(str(berthd.path), "ns1", max_queued=4)
    publisher.publish("/tasks/create", TaskCreate(container_id="a"))
    publisher.publish("/tasks/exit", exit_event(1))
    publisher.publish("/tasks/start", TaskStart(container_id="a"))
    publisher.publish("/tasks/exit", exit_event(2))
    publisher.publish("/tasks/exit", exit_event(3))  # full: drops /tasks/create
    publisher.publish("/tasks/exit", exit_event(4))  # full: drops /tasks/start
    publisher.publish("/tasks/exit", exit_event(5))  # only exits left: the bound yields
    assert publisher.dropped == 2
    assert publisher.pending == 5
    await berthd.start()
    await publisher.close(timeout=5)
    assert berthd.topics() == ["/tasks/exit"] * 5
    assert [decode_any(e.event).pid for e in berthd.received] == [1, 2, 3, 4, 5]  # type: ignore[union-attr]


async def test_an_event_berthd_refuses_is_not_retried_forever(berthd: FakeBerthd) -> None:
    berthd.reject.add("/tasks/oom")
    publisher = Publisher(str(berthd.path), "ns1")
    runner = asyncio.create_task(publisher.run())
    try:
        publisher.publish("/tasks/oom", TaskStart(container_id="a"))
        publisher.publish("/tasks/exit", exit_event(1))
        await until(lambda: berthd.topics() == ["/tasks/exit"])
    finally:
        await publisher.close(timeout=5)
    assert runner.done()


async def test_without_an_address_events_are_discarded() -> None:
    publisher = Publisher("", "ns1")
    publisher.publish("/tasks/exit", exit_event(1))
    assert publisher.pending == 0
    await publisher.run()  # returns at once: nothing to deliver to
    await publisher.close(timeout=0.1)
