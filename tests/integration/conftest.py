"""Harness: the real ``berthd`` as a process on a temporary root.

Tests talk to it only through its socket (the typed client, the ``berth``
CLI, Debian's ``ctr``). Every daemon started here is stopped by PID in the
fixture's teardown, even when the test failed, and its temporary directories
are removed.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any

import pytest
from grpclib.client import Channel
from grpclib.exceptions import GRPCError

from daemon.cli.client import Client
from protos.containerd.services.events.v1 import EventsStub, SubscribeRequest
from protos.containerd.types import Envelope
from tests.support.process import stop_by_pid

BIN = Path(sys.executable).parent
READY_TIMEOUT = 30.0
CTR = shutil.which("ctr")


class Berthd:
    """One berthd process with its own root, state, socket and log file."""

    def __init__(self, base: Path, config: str | None = None, env: dict[str, str] | None = None) -> None:
        self.base = base
        self.root = base / "root"
        self.state = base / "state"
        self.address = str(base / "state" / "berth.sock")
        self.log_path = base / "berthd.log"
        self.config_path: Path | None = None
        if config is not None:
            self.config_path = base / "config.toml"
            self.config_path.write_text(config)
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None

    def argv(self, *extra: str) -> list[str]:
        args = [str(BIN / "berthd")]
        if self.config_path is not None:
            args += ["--config", str(self.config_path)]
        args += ["--root", str(self.root), "--state", str(self.state), "--address", self.address]
        return args + list(extra)

    def start(self, *extra: str) -> Berthd:
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child owns it
        self.proc = subprocess.Popen(self.argv(*extra), stdout=log, stderr=subprocess.STDOUT, env=self.env)
        log.close()
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    async def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        """Poll the Version RPC until it answers, the process dies, or time runs out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"berthd exited with {self.proc.returncode}:\n{self.log()}")
            if os.path.exists(self.address):
                try:
                    async with self.client() as c:
                        await c.version()
                    return
                except (TimeoutError, OSError, ConnectionError):
                    pass
                except Exception:  # noqa: BLE001 - not serving yet
                    pass
            await asyncio.sleep(0.05)
        raise AssertionError(f"berthd not ready after {timeout}s:\n{self.log()}")

    def wait_exit(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout)

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, sig)

    @asynccontextmanager
    async def client(self, namespace: str = "default", timeout: float | None = 10.0) -> AsyncIterator[Client]:
        channel = Channel(path=self.address)
        try:
            yield Client(channel, self.address, namespace, timeout)
        finally:
            channel.close()

    def channel(self) -> Channel:
        return Channel(path=self.address)

    def berth(self, *args: str, check: bool = False, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        """Run the ``berth`` CLI against this daemon."""
        return subprocess.run(
            [str(BIN / "berth"), "--address", self.address, *args],
            capture_output=True,
            text=True,
            check=check,
            timeout=timeout,
            env=self.env,
        )

    def stop(self) -> None:
        """Stop by PID: SIGTERM, then SIGKILL after a grace period."""
        if self.proc is not None:
            stop_by_pid(self.proc, grace=15)


#: cgroup parents runc creates for containers' cgroupsPath (/<namespace>/<id>; CRI pods under /k8s.io)
NAMESPACE_CGROUPS = ("default", "k8s.io")


def _namespace_cgroups() -> set[Path]:
    root = Path("/sys/fs/cgroup")
    hierarchies = [h for h in root.iterdir() if h.is_dir()] if root.is_dir() else []
    return {h / name for h in hierarchies for name in NAMESPACE_CGROUPS if (h / name).is_dir()}


@pytest.fixture(scope="session", autouse=True)
def namespace_cgroups_removed() -> Iterator[None]:
    """Empty per-namespace cgroup parents the runs created are removed at the end (runc leaves them).

    Only directories that did not exist before the session, and only when empty
    (rmdir refuses anything else): a real containerd's or berthd's are never touched.
    """
    before = _namespace_cgroups()
    yield
    for path in sorted(_namespace_cgroups() - before, key=lambda p: len(p.parts), reverse=True):
        with suppress(OSError):
            path.rmdir()


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short temporary directory: unix socket paths are limited to 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="berth-t-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def make_berthd(short_tmp: Path) -> Iterator[Callable[..., Berthd]]:
    """Factory of daemons; each gets its own subdirectory, all are stopped at teardown."""
    started: list[Berthd] = []

    def make(config: str | None = None, env: dict[str, str] | None = None, name: str | None = None) -> Berthd:
        base = short_tmp / (name or f"d{len(started)}")
        base.mkdir(parents=True, exist_ok=True)
        d = Berthd(base, config=config, env=env)
        started.append(d)
        return d

    try:
        yield make
    finally:
        for d in started:
            d.stop()


@pytest.fixture
async def berthd(make_berthd: Callable[..., Berthd]) -> Berthd:
    """A running daemon on embedded defaults."""
    d = make_berthd().start()
    await d.wait_ready()
    return d


@pytest.fixture
async def channel(berthd: Berthd) -> AsyncIterator[Channel]:
    """A raw gRPC channel to the ``berthd`` fixture, for the generated stubs; closed at teardown."""
    ch = berthd.channel()
    try:
        yield ch
    finally:
        ch.close()


def headers(ns: str, lease: str = "") -> dict[str, str]:
    """gRPC metadata as containerd's clients send it: the namespace, and the lease when one is given."""
    md = {"containerd-namespace": ns}
    if lease:
        md["containerd-lease"] = lease
    return md


async def grpc_error(call: Awaitable[Any]) -> GRPCError:
    """The GRPCError ``call`` must raise (the test fails if it returns)."""
    with pytest.raises(GRPCError) as err:
        await call
    return err.value


def ctr_argv(d: Berthd, *args: str, ns: str = "default") -> list[str]:
    """Debian's ``ctr`` pointed at ``d`` in namespace ``ns``."""
    assert CTR is not None, "ctr missing: `make deps` installs Debian's containerd package"
    return [CTR, "--address", d.address, "--namespace", ns, *args]


def ctr(d: Berthd, *args: str, ns: str = "default") -> subprocess.CompletedProcess[str]:
    """Run ``ctr`` against ``d`` (text output, not checked: see :func:`ok`)."""
    return subprocess.run(ctr_argv(d, *args, ns=ns), capture_output=True, text=True, timeout=60, check=False)


def ok(result: subprocess.CompletedProcess[str]) -> str:
    """The stdout of a command that must have succeeded (its stderr is the failure message)."""
    assert result.returncode == 0, result.stderr
    return result.stdout


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    """Poll ``predicate`` until truthy or the deadline passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class CliEvents:
    """``berth events`` as a child process whose lines are read by a thread.

    The subscription is established asynchronously inside the CLI, so tests
    call :meth:`first_line` with a producer that emits events until one line
    arrives (with a deadline) instead of guessing with a sleep.
    """

    def __init__(self, d: Berthd, *filters: str) -> None:
        self.proc = subprocess.Popen(
            [str(BIN / "berth"), "--address", d.address, "events", *filters],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    async def first_line(self, produce: Callable[[], Awaitable[None]], timeout: float = 20.0) -> str:
        deadline = time.monotonic() + timeout
        while not self.lines:
            if time.monotonic() > deadline:
                raise AssertionError("berth events printed nothing")
            if self.proc.poll() is not None:
                raise AssertionError(f"berth events exited {self.proc.returncode}")
            await produce()
            await asyncio.sleep(0.05)
        return self.lines[0]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._reader.join(timeout=5)


class Subscribed:
    """A live Subscribe stream whose topics match ``topic_re``; cancelled by :meth:`close`."""

    def __init__(self, channel: Channel, topic_re: str) -> None:
        self.got: list[Envelope] = []
        self.arrived = asyncio.Event()
        self._task = asyncio.create_task(self._run(EventsStub(channel), topic_re))

    async def _run(self, stub: EventsStub, topic_re: str) -> None:
        async for env in stub.subscribe(SubscribeRequest(filters=[f'topic~="{topic_re}"'])):
            self.got.append(env)
            self.arrived.set()

    async def wait_for(self, n: int, namespace: str | None = None, timeout: float = 10.0) -> list[Envelope]:
        """At least ``n`` events (of ``namespace`` if given), in arrival order."""

        def matching() -> list[Envelope]:
            return [e for e in self.got if namespace is None or e.namespace == namespace]

        async with asyncio.timeout(timeout):
            while len(matching()) < n:
                self.arrived.clear()
                await self.arrived.wait()
        return matching()

    async def close(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
