"""Hands the shim's task events to berthd, surviving berthd restarts.

The shim publishes ``/tasks/create``, ``/tasks/exit`` ... by calling ttrpc
``containerd.services.events.ttrpc.v1.Events/Forward`` at ``$TTRPC_ADDRESS``,
as containerd's shims do. berthd may be down (upgrade, crash) while containers
keep running and exiting, so delivery is decoupled from publishing:

* :meth:`Publisher.publish` only stamps and enqueues (never blocks, never fails);
* :meth:`Publisher.run` delivers in order over one connection, one call at a
  time; when berthd is unreachable it reconnects with capped exponential
  backoff and keeps everything queued. Delivery is at least once: an event
  whose reply was lost with the connection is sent again;
* the queue is bounded: when full, the oldest event that is not a
  ``/tasks/exit`` is dropped (logged). Exits are never dropped: they are the
  one thing berthd cannot learn otherwise, so the bound yields for them;
* :meth:`Publisher.close` flushes what it can within a timeout before the shim exits.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from datetime import UTC, datetime

import betterproto
import betterproto.lib.google.protobuf as pb
import structlog

from daemon.errors import DeadlineExceeded, Unavailable
from daemon.ttrpc import TtrpcClient
from daemon.ttrpc.services import EVENTS_SERVICE
from daemon.typeurl import pack_any
from protos.containerd.services.events.ttrpc.v1 import ForwardRequest
from protos.containerd.types import Envelope

log = structlog.get_logger(__name__)

EXIT_TOPIC = "/tasks/exit"
#: The ttrpc metadata key carrying the namespace (containerd's ttrpc namespace header).
NAMESPACE_HEADER = "containerd-namespace-ttrpc"

MAX_QUEUED = 10_000
CALL_TIMEOUT = 5.0
BACKOFF_MIN = 0.05
BACKOFF_MAX = 2.0

#: Failures after which the same event is tried again; other errors mean berthd refused it for good.
_RETRYABLE = (Unavailable, DeadlineExceeded, ConnectionError)


class Publisher:
    """The shim's outbox of events for berthd at ``ttrpc_address`` (a socket path or ``unix://`` URL).

    An empty ``ttrpc_address`` (no ``$TTRPC_ADDRESS``: a shim started by hand)
    means nobody listens: events are logged and discarded.
    """

    def __init__(
        self,
        ttrpc_address: str,
        namespace: str,
        *,
        max_queued: int = MAX_QUEUED,
        backoff_max: float = BACKOFF_MAX,
        call_timeout: float = CALL_TIMEOUT,
    ) -> None:
        self._path = ttrpc_address.removeprefix("unix://")
        self._namespace = namespace
        self._max_queued = max_queued
        self._backoff_max = backoff_max
        self._call_timeout = call_timeout
        self._queue: collections.deque[Envelope] = collections.deque()
        self._inflight: Envelope | None = None
        self._wakeup = asyncio.Event()
        self._drained = asyncio.Event()
        self._drained.set()
        self._client: TtrpcClient | None = None
        self._runner: asyncio.Task[None] | None = None
        self._closed = False
        self.dropped = 0

    @property
    def pending(self) -> int:
        """Events not yet acknowledged by berthd (queued plus the one in flight)."""
        return len(self._queue) + (self._inflight is not None)

    def publish(self, topic: str, event: betterproto.Message) -> None:
        """Enqueue ``event`` under ``topic``, stamped now; delivery happens in :meth:`run`."""
        if not self._path:
            log.debug("publisher.no_address", topic=topic)
            return
        envelope = Envelope(
            timestamp=datetime.now(UTC), namespace=self._namespace, topic=topic, event=pack_any(event)
        )
        if len(self._queue) >= self._max_queued:
            self._drop_oldest()
        self._queue.append(envelope)
        self._drained.clear()
        self._wakeup.set()

    async def run(self) -> None:
        """Deliver queued events until cancelled (by :meth:`close`).

        Only one runner delivers: a second ``run()``, or one starting after close, returns at once.
        """
        if not self._path or self._runner is not None or self._closed:
            return
        await self._deliver()

    async def _deliver(self) -> None:
        self._runner = asyncio.current_task()
        backoff = BACKOFF_MIN
        try:
            while True:
                if not self._queue:
                    self._drained.set()
                    self._wakeup.clear()
                    await self._wakeup.wait()
                    continue
                envelope = self._inflight = self._queue.popleft()
                try:
                    await self._forward(envelope)
                except _RETRYABLE as exc:
                    self._queue.appendleft(envelope)
                    self._inflight = None
                    await self._disconnect()
                    log.debug("publisher.retry", path=self._path, error=str(exc), backoff=backoff)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, self._backoff_max)
                    continue
                except Exception as exc:  # noqa: BLE001 - berthd answered, and refused this event for good
                    log.error("publisher.rejected", topic=envelope.topic, error=str(exc))
                self._inflight = None
                backoff = BACKOFF_MIN
        finally:
            if self._inflight is not None:
                self._queue.appendleft(self._inflight)
                self._inflight = None
            await self._disconnect()

    async def close(self, timeout: float) -> None:  # noqa: ASYNC109 - a flush budget, not a call deadline
        """Deliver what can be delivered within ``timeout`` seconds, then stop :meth:`run`.

        Starts a runner if none is running, so a shim that never got to run one still flushes.
        """
        own: asyncio.Task[None] | None = None
        if self._runner is None and self._path and self._queue:
            # A run() task created but not started yet returns at once: it will see closed.
            own = asyncio.create_task(self._deliver(), name="publisher")
        self._closed = True
        try:
            async with asyncio.timeout(timeout):
                await self._drained.wait()
        except TimeoutError:
            log.warning("publisher.undelivered", path=self._path, pending=self.pending)
        for runner in (self._runner, own):
            if runner is not None and not runner.done():
                runner.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await runner
        await self._disconnect()

    async def _forward(self, envelope: Envelope) -> None:
        if self._client is None or self._client.closed:
            self._client = await TtrpcClient.connect(self._path)
            log.info("publisher.connected", path=self._path, pending=self.pending)
        await self._client.call(
            EVENTS_SERVICE,
            "Forward",
            ForwardRequest(envelope=envelope),
            pb.Empty,
            timeout=self._call_timeout,
            metadata={NAMESPACE_HEADER: self._namespace},
        )

    async def _disconnect(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            try:
                await client.close()
            except asyncio.CancelledError:
                # A peer that already hung up makes close() see its receiver's cancellation;
                # only a cancellation of this task is real.
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise
            except OSError as exc:
                log.debug("publisher.close_failed", error=str(exc))

    def _drop_oldest(self) -> None:
        for index, queued in enumerate(self._queue):
            if queued.topic != EXIT_TOPIC:
                del self._queue[index]
                self.dropped += 1
                log.warning("publisher.dropped", topic=queued.topic, queued=len(self._queue))
                return
        log.warning("publisher.over_bound", queued=len(self._queue), reason="only exit events are queued")
