"""The ``runc`` command line, as the shim uses it.

Every call goes through :meth:`Reaper.run` (the shim's single ``waitpid``
owner) and logs to ``<bundle>/log.json`` in runc's JSON format, as
containerd's shim does; a failing call raises :class:`RuncError` carrying
runc's own last error message from that log (``exec: "nope": executable file
not found in $PATH``), or its output when it logged nothing.

Calls that start container processes (create, exec) hand the process's stdio
fds to runc, which passes them on; runc's own output then goes to the log only.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from plugins.runtime.runc_v2.shim.reaper import Reaper

DEFAULT_BINARY = "runc"


class RuncError(Exception):
    """A runc command failed; ``str()`` is runc's message."""


@dataclass(frozen=True)
class Stdio:
    """fds a runc child starts with (dup-ed by the spawn; the caller keeps and closes its own)."""

    stdin: int | None = None
    stdout: int | None = None
    stderr: int | None = None


class Runc:
    """One runc configuration: binary, ``--root``, cgroup driver; logs to ``bundle/log.json``."""

    def __init__(
        self,
        reaper: Reaper,
        *,
        root: str,
        bundle: str,
        binary: str = DEFAULT_BINARY,
        systemd_cgroup: bool = False,
    ) -> None:
        self._reaper = reaper
        self.root = root
        self.bundle = Path(bundle)
        self.binary = binary or DEFAULT_BINARY
        self.systemd_cgroup = systemd_cgroup
        self.log = self.bundle / "log.json"

    def argv(self, *args: str) -> list[str]:
        return [
            self.binary,
            *("--root", self.root, "--log", str(self.log), "--log-format", "json"),
            *(["--systemd-cgroup"] if self.systemd_cgroup else []),
            *args,
        ]

    async def _run(self, what: str, args: list[str], stdio: Stdio | None = None) -> str:
        offset = _size(self.log)  # one stat(2): not worth a trip to a thread before every runc call
        if stdio is None:
            status, output = await self._reaper.run(self.argv(*args))
        else:
            # The child's stdio must not be a pipe we read to EOF: the container keeps it.
            null = os.open(os.devnull, os.O_RDWR)
            try:
                status, output = await self._reaper.run(
                    self.argv(*args),
                    stdin=null if stdio.stdin is None else stdio.stdin,
                    stdout=null if stdio.stdout is None else stdio.stdout,
                    stderr=null if stdio.stderr is None else stdio.stderr,
                )
            finally:
                os.close(null)
        text = output.decode(errors="replace")
        if status != 0:
            message = await asyncio.to_thread(last_error, self.log, offset)
            if not message:
                message = text.strip().splitlines()[-1] if text.strip() else f"exit status {status}"
            raise RuncError(f"runc {what}: {message}")
        return text

    async def create(
        self, container_id: str, *, pid_file: str, stdio: Stdio, console_socket: str = ""
    ) -> None:
        args = ["create", "--bundle", str(self.bundle), "--pid-file", pid_file]
        if console_socket:
            args += ["--console-socket", console_socket]
        await self._run("create", [*args, container_id], stdio)

    async def start(self, container_id: str) -> None:
        await self._run("start", ["start", container_id])

    async def exec(
        self,
        container_id: str,
        *,
        process_file: str,
        pid_file: str,
        stdio: Stdio,
        console_socket: str = "",
    ) -> None:
        args = ["exec", "--detach", "--process", process_file, "--pid-file", pid_file]
        if console_socket:
            args += ["--console-socket", console_socket]
        await self._run("exec", [*args, container_id], stdio)

    async def kill(self, container_id: str, signal: int, *, all: bool = False) -> None:  # noqa: A002
        await self._run("kill", ["kill", *(["--all"] if all else []), container_id, str(signal)])

    async def delete(self, container_id: str, *, force: bool = False) -> None:
        await self._run("delete", ["delete", *(["--force"] if force else []), container_id])

    async def pause(self, container_id: str) -> None:
        await self._run("pause", ["pause", container_id])

    async def resume(self, container_id: str) -> None:
        await self._run("resume", ["resume", container_id])

    async def update(self, container_id: str, resources_file: str) -> None:
        await self._run("update", ["update", "--resources", resources_file, container_id])

    async def ps(self, container_id: str) -> list[int]:
        output = await self._run("ps", ["ps", "--format", "json", container_id])
        try:
            pids = json.loads(output) or []
        except ValueError as exc:
            raise RuncError(f"runc ps: unparseable output {output[:200]!r}") from exc
        return [int(pid) for pid in pids]


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def last_error(log: Path, offset: int = 0) -> str:
    """The last error runc logged to ``log`` after byte ``offset`` ("" if none)."""
    message = ""
    with contextlib.suppress(OSError), open(log, "rb") as f:
        f.seek(offset)
        for line in f.read().decode(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                entry = json.loads(line)
                if isinstance(entry, dict) and entry.get("level") in ("error", "fatal"):
                    message = str(entry.get("msg", message))
    return message
