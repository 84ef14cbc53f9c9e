"""The manager's records of tasks and their processes: what must survive the shim (the last exit)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import UTC, datetime

from daemon.errors import NotFound
from daemon.protocols import ExitStatus, ProcessState, TaskIO, TaskStatus
from plugins.runtime.runc_v2.bundle import Bundle, LogReader
from plugins.runtime.runc_v2.shims import Shim

#: 128 + SIGKILL: what a process of a shim that died is reported to have exited with
KILLED_STATUS = 137


class Process:
    """The manager's record of one process: what it was started with and, once known, its exit."""

    def __init__(self, container_id: str, exec_id: str, io: TaskIO, pid: int = 0) -> None:
        self.container_id = container_id
        self.exec_id = exec_id
        self.io = io
        self.pid = pid
        self.exit: ExitStatus | None = None
        self.exited = asyncio.Event()

    def record_exit(self, exit_: ExitStatus) -> None:
        if self.exit is None:
            self.exit = exit_
            self.exited.set()

    def snapshot(self, status: TaskStatus) -> ProcessState:
        ended = self.exit
        return ProcessState(
            container_id=self.container_id,
            exec_id=self.exec_id,
            pid=self.pid,
            status=TaskStatus.STOPPED if ended is not None else status,
            io=self.io,
            exit_status=ended.exit_status if ended else 0,
            exited_at=ended.exited_at if ended else None,
        )


@dataclass
class Task:
    namespace: str
    id: str
    bundle: Bundle
    shim: Shim
    init: Process
    execs: dict[str, Process] = field(default_factory=dict)
    log: LogReader | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def process(self, exec_id: str) -> Process:
        if not exec_id:
            return self.init
        found = self.execs.get(exec_id)
        if found is None:
            raise NotFound(f"task {self.id!r}: exec {exec_id!r}: not found")
        return found


def task_status(value: int) -> TaskStatus:
    """A shim's status number as a TaskStatus; one this berth does not know is UNKNOWN."""
    try:
        return TaskStatus(int(value))
    except ValueError:
        return TaskStatus.UNKNOWN


def when(ts: datetime | None) -> datetime:
    return ts if ts is not None and ts.year > 1970 else datetime.now(UTC)
