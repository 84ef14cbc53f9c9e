"""After a restart: the loaded containers made to agree with the runtime's tasks.

A task still running stays (or becomes) RUNNING; one that exited meanwhile
becomes EXITED with its real exit code (the runtime replays the exit, and
its State answers it too); a RUNNING container whose task is gone becomes
EXITED with code 255, reason ``Unknown``.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Protocol

import structlog

from daemon.errors import BerthError, NotFound
from daemon.protocols import TaskManager, TaskStatus
from plugins.cri.container.model import (
    EXITED,
    NAMESPACE,
    REASON_UNKNOWN,
    RUNNING,
    UNKNOWN,
    UNKNOWN_EXIT_CODE,
)
from plugins.cri.store import CriContainer, CriStore, now_ns

log = structlog.get_logger("berth.cri.containers")


class Exited(Protocol):
    """:meth:`~.exits.ExitWatcher.exited`: records an exit once."""

    async def __call__(
        self, c: CriContainer, exit_code: int, finished_at: int, *, reason: str = "", message: str = ""
    ) -> None: ...


async def reconcile(store: CriStore, tasks: TaskManager, exited: Exited) -> None:
    for c in list(store.containers.values()):
        if c.status.state == EXITED:
            continue
        try:
            st = await tasks.get(NAMESPACE, c.id)
        except NotFound:
            if c.status.state in (RUNNING, UNKNOWN):
                await exited(
                    c,
                    UNKNOWN_EXIT_CODE,
                    now_ns(),
                    reason=REASON_UNKNOWN,
                    message="task lost across restart",
                )
            continue
        except BerthError as exc:
            log.warning("cri.container.reconcile_failed", id=c.id, error=exc.message)
            continue
        if st.status == TaskStatus.STOPPED:
            at = st.exited_at or datetime.now(UTC)
            await exited(c, st.exit_status, int(at.timestamp() * 1e9))
        elif st.status in (TaskStatus.RUNNING, TaskStatus.PAUSED) and c.status.state != RUNNING:
            c.status.state, c.status.pid = RUNNING, st.pid
            await store.save_status(c)
    log.info("cri.containers.reconciled", containers=len(store.containers))
