"""Container exits: ``/tasks/exit`` and ``/tasks/oom`` of ``k8s.io`` from the bus, recorded once.

An exit makes the container EXITED with its code and reason
(``Completed``/``Error``/``OOMKilled`` when a ``/tasks/oom`` was seen
before), deletes the task and emits CONTAINER_STOPPED. StopContainer's wait
and the restart reconcile record exits through :meth:`ExitWatcher.exited` too,
so whichever sees an exit first records it and the others find it done.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import betterproto
import structlog

from daemon.errors import BerthError, NotFound
from daemon.events import Envelope, EventBus, Subscription
from daemon.protocols import TaskManager
from daemon.typeurl import decode_any
from plugins.cri.container.model import (
    EXITED,
    NAMESPACE,
    REASON_COMPLETED,
    REASON_ERROR,
    REASON_OOM,
)
from plugins.cri.container.stats import CpuRates
from plugins.cri.store import CriContainer, CriStore
from protos.containerd.events import TaskExit, TaskOom
from protos.runtime import v1 as cri

log = structlog.get_logger("berth.cri.containers")

Emit = Callable[[CriContainer, cri.ContainerEventType], Awaitable[None]]


class ExitWatcher:
    """Watches the bus for the containers of ``store``; ``emit`` sends the CRI container event."""

    def __init__(
        self, *, store: CriStore, tasks: TaskManager, bus: EventBus, rates: CpuRates, emit: Emit
    ) -> None:
        self.store = store
        self.tasks = tasks
        self.bus = bus
        self._rates = rates
        self._emit = emit
        self._oom: set[str] = set()
        self._sub: Subscription | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[Any]] = set()

    def start(self) -> None:
        """Subscribe (with replay: exits while the daemon was down are seen too) and start watching."""
        self._sub = self.bus.subscribe(
            topic_prefix="/tasks", namespace=NAMESPACE, maxsize=8192, name="cri-containers", replay=True
        )
        self._watcher = asyncio.create_task(self._watch(self._sub), name="cri-container-exits")

    async def close(self) -> None:
        if self._sub is not None:
            self._sub.close()
        tasks = [t for t in (self._watcher, *self._background) if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _watch(self, sub: Subscription) -> None:
        async for env in sub:
            try:
                self._on_event(env)
            except Exception:  # one bad event must not end the watcher
                log.exception("cri.container.event_failed", topic=env.topic)

    def _on_event(self, env: Envelope) -> None:
        if env.topic not in ("/tasks/exit", "/tasks/oom"):
            return  # (decoding every task event's Any costs ~0.5 ms each; only these two matter)
        event = env.event
        if isinstance(event, betterproto.lib.google.protobuf.Any):
            event = decode_any(event)
        if env.topic == "/tasks/oom" and isinstance(event, TaskOom):
            if event.container_id in self.store.containers:
                self._oom.add(event.container_id)
            return
        if env.topic != "/tasks/exit" or not isinstance(event, TaskExit):
            return
        if event.id not in ("", event.container_id):
            return  # an exec
        c = self.store.containers.get(event.container_id)
        if c is None:
            return
        at = event.exited_at if event.exited_at and event.exited_at.year > 1970 else datetime.now(UTC)
        task = asyncio.create_task(self.exited(c, event.exit_status, int(at.timestamp() * 1e9)))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def exited(
        self, c: CriContainer, exit_code: int, finished_at: int, *, reason: str = "", message: str = ""
    ) -> None:
        """Record an exit once (EXITED, code, reason), delete the task, emit CONTAINER_STOPPED."""
        async with c.lock:
            if c.status.state == EXITED:
                return
            c.status.state = EXITED
            c.status.exit_code = exit_code
            c.status.finished_at = finished_at
            if not reason:
                oom = c.id in self._oom
                reason = REASON_OOM if oom else REASON_COMPLETED if exit_code == 0 else REASON_ERROR
            c.status.reason, c.status.message = reason, message or c.status.message
            self._oom.discard(c.id)
            self._rates.forget(c.id)
            await self.store.save_status(c)
            with contextlib.suppress(NotFound):
                try:
                    await self.tasks.delete(NAMESPACE, c.id)
                except BerthError as exc:
                    if not isinstance(exc, NotFound):
                        log.warning("cri.container.task_delete_failed", id=c.id, error=exc.message)
        log.info("cri.container.exited", id=c.id, exit_code=exit_code, reason=reason)
        await self._emit(c, cri.ContainerEventType.CONTAINER_STOPPED_EVENT)
