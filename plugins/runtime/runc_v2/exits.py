"""Task exits onto the bus: each ``/tasks/exit`` published exactly once, and replayed after a restart.

Exits reach the manager three ways, and each is published on the bus as
``/tasks/exit`` exactly once per (namespace, container, process, pid):

* the shim forwards its TaskExit event (the usual way);
* the shim dies (SIGKILL, OOM killer): every process it held that had not
  exited is reported exited with status 137, and the ``delete`` bootstrap
  cleans up the runc container and the rootfs mount;
* after a berthd restart, :mod:`.recovery` finds a task stopped while berthd
  was down. Such exits are retained on the bus for ``recovery_event_grace``
  seconds and replayed to subscriptions made meanwhile, so the CRI plugin or a client that
  subscribes right after start does see them.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from datetime import UTC, datetime

import structlog

from daemon.events import Envelope, EventBus
from daemon.protocols import ExitStatus
from protos.containerd.events import TaskExit

log = structlog.get_logger("berth.runtime")

EXIT_TOPIC = "/tasks/exit"
#: remembered (namespace, container, process, pid) of published exits, for deduplication
EXIT_MEMORY = 16384


class ExitPublisher:
    """Puts shim events on the bus, deduplicating exits and retaining them during the replay window.

    ``record(namespace, exit)`` is called once for every exit that is new,
    before it is published, so whoever sees the event finds the exit recorded.
    """

    def __init__(self, bus: EventBus, grace: float, record: Callable[[str, TaskExit], None]) -> None:
        self._bus = bus
        self._grace = grace
        self._record = record
        self._published: OrderedDict[tuple[str, str, str, int], None] = OrderedDict()
        self._replay_until = 0.0

    def open_replay_window(self) -> None:
        """From now until ``grace`` has passed, exits are retained on the bus for replay.

        Exits found at start-up (and those shims forward right after it)
        happened while berthd was down; clients (``ctr events``, the CRI) can
        only subscribe once berthd is back, so the bus keeps them for
        subscriptions made with ``replay=True`` (the Events service's, the CRI's).
        """
        self._replay_until = time.monotonic() + self._grace

    def on_envelope(self, env: Envelope) -> None:
        """An event from a shim (or made by the manager): record exits, dedupe them, put it on the bus."""
        if env.topic == EXIT_TOPIC:
            event = env.event
            try:
                exit_ = event if isinstance(event, TaskExit) else TaskExit().parse(bytes(event.value))
            except Exception:  # noqa: BLE001 - a malformed event is passed on as it came
                exit_ = None
            if exit_ is not None:
                key = (env.namespace, exit_.container_id, exit_.id or exit_.container_id, exit_.pid)
                if key in self._published:
                    log.debug("runtime.exit_duplicate", namespace=env.namespace, id=exit_.container_id)
                    return
                self._published[key] = None
                while len(self._published) > EXIT_MEMORY:
                    self._published.popitem(last=False)
                self._record(env.namespace, exit_)
                if time.monotonic() < self._replay_until:
                    self._bus.forward(env, retain=self._grace)
                    return
        self._bus.forward(env)

    def publish_exit(self, namespace: str, container_id: str, exec_id: str, exit_: ExitStatus) -> None:
        """Publish (through deduplication) an exit the manager found itself."""
        event = TaskExit(
            container_id=container_id,
            id=exec_id or container_id,
            pid=exit_.pid,
            exit_status=exit_.exit_status,
            exited_at=exit_.exited_at,
        )
        self.on_envelope(Envelope(datetime.now(UTC), namespace, EXIT_TOPIC, event))
