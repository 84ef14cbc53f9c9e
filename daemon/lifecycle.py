"""berthd's life: start in order, serve, stop in reverse.

Start: lock the root (one daemon per root), create the directories, bring up
the event bus and metrics, init the plugins in dependency order, then open
the API socket and the metrics endpoint. Stop (SIGTERM/SIGINT): close the
socket first so no new work arrives, end event streams, close plugins in
reverse order, remove the socket and release the lock. Each step's errors are
collected, never allowed to skip the steps after it.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import structlog

from daemon import __version__
from daemon.config import Config
from daemon.errors import BerthError, FailedPrecondition
from daemon.events import EventBus, bus_collector
from daemon.metrics import MetricsRegistry, Sample, process_collector
from daemon.metricsserver import MetricsServer
from daemon.registry import DaemonPaths, Registry, Status
from daemon.server import GrpcServer, instrument, normalize_address

log = structlog.get_logger("berth.daemon")

GRPC_TYPE = "berth.grpc.v1"
STOP_TIMEOUT = 8.0


class StartupError(BerthError):
    """berthd cannot start; the message is what the operator sees."""


@dataclass
class RootLock:
    """An flock on ``<root>/berthd.lock``, held for the daemon's life.

    flock is released by the kernel when the process dies, so a ``kill -9``
    never leaves a lock that blocks the next start.
    """

    path: Path
    fh: IO[str]

    @classmethod
    def acquire(cls, root: Path) -> RootLock:
        path = root / "berthd.lock"
        fh = open(path, "a+")  # noqa: SIM115 - held open for the daemon's life
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "unknown"
            fh.close()
            raise StartupError(
                f"root {root}: another berthd (pid {holder}) is already running on this root "
                f"(lock {path} is held)"
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()}\n")
        fh.flush()
        return cls(path, fh)

    def release(self) -> None:
        try:
            self.fh.seek(0)
            self.fh.truncate()
        finally:
            self.fh.close()


def _prepare_dir(path: Path, what: str) -> None:
    """Create ``path`` (0700) and prove it is writable, or say why not."""
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        probe = path / f".berthd-write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise StartupError(f"{what} {path}: not a writable directory: {exc.strerror or exc}") from exc


class Daemon:
    """One berthd: owns the registry outcome, bus, metrics and servers."""

    def __init__(self, config: Config, registry: Registry) -> None:
        self.config = config
        self.registry = registry
        self.root = Path(config.root)
        self.state = Path(config.state)
        self.address = normalize_address(config.grpc.address)
        self.bus = EventBus()
        self.metrics = MetricsRegistry()
        self.grpc = GrpcServer(self.address, config.grpc.uid, config.grpc.gid)
        self.metrics_server: MetricsServer | None = None
        self._lock: RootLock | None = None
        self._stop = asyncio.Event()

    async def start(self) -> None:
        _prepare_dir(self.root, "root")
        _prepare_dir(self.state, "state")
        self._lock = RootLock.acquire(self.root)
        try:
            await self._start_locked()
        except BaseException:
            await self.shutdown()
            raise

    async def _start_locked(self) -> None:
        log.info("daemon.starting", version=__version__, root=str(self.root), state=str(self.state))
        self.metrics.add_collector(process_collector())
        self.metrics.add_collector(bus_collector(self.bus))
        self.metrics.add_collector(self._plugin_collector)
        paths = DaemonPaths(root=self.root, state=self.state, address=self.address)
        await self.registry.init_all(
            paths=paths,
            configs=self.config.plugins,
            bus=self.bus,
            metrics=self.metrics,
            disabled=self.config.disabled_plugins,
        )
        self._check_required()
        servables = {
            s.full_name: s.instance
            for s in self.registry.states()
            if s.registration.type == GRPC_TYPE and s.status is Status.OK and s.instance is not None
        }
        await self.grpc.start(instrument(servables, self.metrics))
        if self.config.metrics.address:
            self.metrics_server = await MetricsServer.start(self.metrics, self.config.metrics.address)
            log.info("metrics.serving", address=self.config.metrics.address)
        log.info("daemon.ready", address=self.address, pid=os.getpid())

    def _check_required(self) -> None:
        failed = []
        for name in self.config.required_plugins:
            st = self.registry.state(name)
            if st.status is not Status.OK:
                failed.append(f"{name} ({st.status.value}: {st.error})")
        if failed:
            raise StartupError("required plugin not loaded: " + "; ".join(failed))

    def _plugin_collector(self) -> list[Sample]:
        return [
            Sample(
                "berth_plugin_status",
                1.0,
                {"plugin": s.full_name, "status": s.status.value},
                help="Plugins by init outcome (1 for the plugin's current status)",
                type="gauge",
            )
            for s in self.registry.states()
        ]

    def request_stop(self, why: str) -> None:
        if not self._stop.is_set():
            log.info("daemon.stopping", reason=why)
        self._stop.set()

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.request_stop, "SIGTERM")
        loop.add_signal_handler(signal.SIGINT, self.request_stop, "SIGINT")
        loop.add_signal_handler(
            signal.SIGHUP,
            lambda: log.info("daemon.sighup", action="none", note="config reload needs a restart"),
        )

    async def wait(self) -> None:
        await self._stop.wait()

    async def shutdown(self) -> None:
        """Reverse of start; every step runs even if an earlier one failed."""
        steps: list[tuple[str, Any]] = [
            ("grpc", self.grpc.stop),
            ("metrics", self._stop_metrics),
            ("bus", self._close_bus),
            ("plugins", self._close_plugins),
        ]
        for name, step in steps:
            try:
                await asyncio.wait_for(step(), STOP_TIMEOUT)
            except Exception as exc:  # noqa: BLE001 - keep going, report
                log.error("daemon.stop_step_failed", step=name, error=str(exc))
        if self._lock is not None:
            self._lock.release()
            self._lock = None
        log.info("daemon.stopped")

    async def _stop_metrics(self) -> None:
        if self.metrics_server is not None:
            await self.metrics_server.stop()
            self.metrics_server = None

    async def _close_bus(self) -> None:
        self.bus.close()

    async def _close_plugins(self) -> None:
        await self.registry.close_all()


async def run(config: Config, registry: Registry) -> int:
    """Run berthd until SIGTERM/SIGINT; the process exit code."""
    daemon = Daemon(config, registry)
    daemon.install_signal_handlers()
    try:
        await daemon.start()
    except (BerthError, FailedPrecondition) as exc:
        log.error("daemon.start_failed", error=str(exc))
        raise
    await daemon.wait()
    await daemon.shutdown()
    return 0
