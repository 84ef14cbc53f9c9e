"""The processes a shim tracks: each container's init and its execs, and their states.

States follow containerd's runc shim: CREATED (runc create / Exec done, not
started) -> RUNNING -> STOPPED; an init may also be PAUSED. An exit status,
once set, is kept until the process is deleted, so Wait after the exit answers
at once and State keeps reporting it.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from plugins.runtime.runc_v2.shim.cgroups import Cgroup, OomWatch
from plugins.runtime.runc_v2.shim.reaper import Exit
from plugins.runtime.runc_v2.shim.runc import Runc
from plugins.runtime.runc_v2.shim.stdio import ProcessIO
from protos.containerd.v1.types import Status


@dataclass
class Process:
    """An init (``exec_id == ""``) or exec process of one container."""

    container_id: str
    exec_id: str
    io: ProcessIO
    #: an exec's OCI Process JSON, for ``runc exec --process`` at Start
    spec: bytes = b""
    pid: int = 0
    status: Status = Status.CREATED
    exit_status: int = 0
    exited_at: datetime | None = None
    exited: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def id(self) -> str:
        """containerd's process id: the exec id, or the container id for the init."""
        return self.exec_id or self.container_id

    @property
    def running(self) -> bool:
        return self.pid > 0 and not self.exited.is_set()

    def set_exited(self, ended: Exit) -> None:
        self.status = Status.STOPPED
        self.exit_status = ended.status
        self.exited_at = ended.at
        self.exited.set()


@dataclass
class Container:
    """One task: the runc container, its init, its execs and what Create set up for it."""

    id: str
    bundle: Path
    runc: Runc
    init: Process
    execs: dict[str, Process] = field(default_factory=dict)
    rootfs_mounted: bool = False
    #: no PID namespace of its own: killing the init does not kill the rest (runc kill --all does)
    host_pid_namespace: bool = False
    cgroup: Cgroup | None = None
    oom: OomWatch | None = None
    #: the init's exit, held back until the execs' exits are published (containerd's order)
    init_exit: Exit | None = None

    def processes(self) -> list[Process]:
        return [self.init, *self.execs.values()]

    def running_execs(self) -> list[Process]:
        return [p for p in self.execs.values() if p.running]
