"""berthd and a private containerd as child processes of a benchmark, on temporary roots, stopped by PID.

Every benchmark of ``bench/`` starts both daemons side by side on a fresh
directory from :func:`make_base` (short, under /tmp: unix socket paths are
limited to 107 bytes), never touching the system's /run/containerd or
/var/lib/containerd, and in its ``finally`` calls :meth:`Daemon.stop` on each
and :func:`remove_base`, which first takes away whatever is still mounted
under the directory. :func:`terminate_as_interrupt` makes SIGTERM unwind like
Ctrl-C so that ``finally`` runs in both cases; a bench killed outright still
takes its daemons along (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import betterproto.lib.google.protobuf as pb
from grpclib.client import Channel
from grpclib.const import Status
from grpclib.exceptions import GRPCError, StreamTerminatedError

from daemon.cli.logs import quiet_logs as quiet_logs  # re-exported: warnings+ on stderr
from daemon.mount import mount_points_under, release
from protos.containerd.services.namespaces.v1 import CreateNamespaceRequest, Namespace, NamespacesStub
from protos.containerd.services.version.v1 import VersionStub

NAMESPACE_HEADER = "containerd-namespace"
CONTAINERD = "/usr/bin/containerd"
CTR = "/usr/bin/ctr"
READY_TIMEOUT = 30.0
STOP_GRACE = 10.0
PR_SET_PDEATHSIG = 1


class BenchError(Exception):
    """A daemon did not start, died, or failed a check of the bench; the message says which and why."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, unwound like Ctrl-C; the exit status is 128 + the signal's number."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"signal {signum}")
        self.signum = signum


def exit_status(exc: KeyboardInterrupt) -> int:
    """The conventional exit status of a bench stopped by Ctrl-C or SIGTERM."""
    return 128 + (exc.signum if isinstance(exc, Terminated) else signal.SIGINT)


@contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM to the bench unwinds like Ctrl-C, so the finally block still stops the daemons."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise Terminated(signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# -- processes -----------------------------------------------------------------------------------------------


_LIBC = ctypes.CDLL(None, use_errno=True)  # loaded before fork: the child only calls into it


def _die_with_parent() -> None:
    """Runs in the child before exec: if the bench is killed outright, the daemon gets SIGTERM too."""
    _LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


@dataclass
class Daemon:
    """One daemon process on its own temporary directory, known and stopped by PID."""

    name: str
    argv: list[str]
    address: str
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            # Own session: a Ctrl-C in the terminal reaches the bench only, which then stops
            # the daemons itself, in order, from its finally block.
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise BenchError(f"{self.name} was not started")
        return self.proc.pid

    def exited(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def check_alive(self) -> None:
        rc = self.exited()
        if rc is not None:
            raise BenchError(f"{self.name} exited with {rc} during the run")

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def _status_kib(self, key: str) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
        raise BenchError(f"{self.name}: no {key} in /proc/{self.pid}/status")

    def rss_kib(self) -> int:
        """VmRSS of the daemon's process, in KiB."""
        return self._status_kib("VmRSS")

    def peak_rss_kib(self) -> int:
        """VmHWM (the highest RSS since the process started), in KiB."""
        return self._status_kib("VmHWM")

    def cpu_seconds(self) -> float:
        """CPU seconds of the process (every thread) and of its children it has waited for.

        utime+stime+cutime+cstime of proc(5): a helper the daemon runs (e.g.
        containerd's ``unpigz``, a ``mount``) counts once it exited. A read of
        /proc, microseconds.
        """
        stat = Path(f"/proc/{self.pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2 :].split()  # fields[0] is field 3 (state) of proc(5)
        return sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after a grace period; by PID, and only our own child."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=STOP_GRACE)
        except subprocess.TimeoutExpired:
            print(f"{self.name} ignored SIGTERM for {STOP_GRACE}s; sending SIGKILL", file=sys.stderr)
            self.proc.kill()
            self.proc.wait()


def berthd_daemon(base: Path, *, name: str = "berth", config: str = "", by: str = "bench") -> Daemon:
    """berthd on embedded defaults plus ``config`` (TOML); its own file keeps /etc/berth out of the run."""
    base.mkdir()
    path = base / "config.toml"
    path.write_text(f"# written by {by}\nversion = 1\nimports = []\n{config}")
    address = str(base / "s" / "b.sock")
    berthd = Path(sys.executable).parent / "berthd"
    exe = str(berthd) if berthd.exists() else (shutil.which("berthd") or "berthd")
    argv = [exe, "--config", str(path), "--root", str(base / "r"), "--state", str(base / "s")]
    return Daemon(name, [*argv, "--address", address], address, base / "berthd.log")


def containerd_daemon(base: Path, *, config: str = "", by: str = "bench", cri: bool = False) -> Daemon:
    """A private containerd: every path it writes is under ``base``; CRI (CNI, stream server) is off.

    Its overlayfs snapshotter (the one ``ctr`` unpacks into by default) and
    native stay enabled; the others are disabled. ``config`` is appended
    (TOML, e.g. more ``[plugins."..."]`` tables). ``cri=True`` leaves the CRI
    plugin on: ``config`` must then give it a private table (sandbox image,
    CNI dirs, runc root, netns under the state dir; see ``bench/cri.py``).
    """
    base.mkdir()
    cri_off = "" if cri else '\n  "io.containerd.grpc.v1.cri",'

    address = str(base / "c.sock")
    path = base / "config.toml"
    path.write_text(
        f"""# written by {by}
version = 2
root = "{base / "r"}"
state = "{base / "s"}"
# CRI needs CNI and a streaming server; the other snapshotters probe the host and error out
# when unconfigured. The tracing IDs are absent from Debian's 1.6 build and keep a newer
# containerd from exporting spans.
disabled_plugins = [{cri_off}
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.zfs",
  "io.containerd.tracing.processor.v1.otlp",
  "io.containerd.internal.v1.tracing",
]

[grpc]
  address = "{address}"

[ttrpc]
  address = "{address}.ttrpc"

[debug]
  address = "{base / "d.sock"}"

[metrics]
  address = ""
  grpc_histogram = false

[plugins]
  [plugins."io.containerd.internal.v1.opt"]
    path = "{base / "opt"}"
{config}"""
    )
    return Daemon("containerd", [CONTAINERD, "--config", str(path)], address, base / "containerd.log")


def channel_for(d: Daemon) -> Channel:
    return Channel(path=d.address)


async def wait_ready(d: Daemon, limit_s: float = READY_TIMEOUT) -> str:
    """Poll Version until it answers (returns the version string), the process dies, or time runs out."""
    deadline = time.monotonic() + limit_s
    last = "socket not created"
    while time.monotonic() < deadline:
        rc = d.exited()
        if rc is not None:
            raise BenchError(f"{d.name} exited with {rc} while starting")
        if os.path.exists(d.address):  # noqa: ASYNC240 - one stat per poll
            channel = channel_for(d)
            try:
                resp = await VersionStub(channel, timeout=1.0).version(pb.Empty())
                return str(resp.version)
            except (OSError, TimeoutError, GRPCError, StreamTerminatedError) as exc:
                last = f"{type(exc).__name__}: {exc}"
            finally:
                channel.close()
        await asyncio.sleep(0.02)
    raise BenchError(f"{d.name} not serving at {d.address} after {limit_s}s ({last})")


async def ensure_namespace(d: Daemon, name: str) -> None:
    """Create namespace ``name`` on ``d`` unless it exists."""
    channel = channel_for(d)
    try:
        # containerd publishes the creation as an event of that namespace: it wants the header too.
        stub = NamespacesStub(channel, timeout=10.0, metadata={NAMESPACE_HEADER: name})
        await stub.create(CreateNamespaceRequest(namespace=Namespace(name=name)))
    except GRPCError as exc:
        if exc.status is not Status.ALREADY_EXISTS:
            raise BenchError(f"{d.name}: create namespace {name}: {exc.status.name}: {exc.message}") from None
    finally:
        channel.close()


def stop_all(daemons: list[Daemon], show_logs: bool) -> None:
    """Stop every daemon (in order); with ``show_logs``, print the tail of each one's log to stderr."""
    for d in daemons:
        d.stop()
        if show_logs and d.proc is not None:
            print(f"--- {d.name} log (tail) ---\n{d.log_tail()}", file=sys.stderr)


# -- the temporary directory ---------------------------------------------------------------------------------


def make_base() -> Path:
    """A fresh directory for one run: short, because unix socket paths are at most 107 bytes."""
    return Path(tempfile.mkdtemp(prefix="bb-", dir="/tmp"))


async def _release(targets: list[str]) -> None:
    for target in targets:
        try:
            await release(target)
        except Exception as exc:  # noqa: BLE001 - reported; the directory is then kept
            print(f"could not unmount {target}: {exc}", file=sys.stderr)


def remove_base(base: Path) -> None:
    """Unmount whatever is still mounted under ``base`` (deepest first), then delete it.

    Called after the daemons were stopped. A mount that cannot be taken away
    keeps the directory (deleting through a mount would delete what is below it).
    """
    leftover = mount_points_under(base)
    if leftover:
        print(f"unmounting {len(leftover)} leftover mount(s) under {base}", file=sys.stderr)
        asyncio.run(_release(sorted(leftover, key=len, reverse=True)))
        if mount_points_under(base):
            print(f"still mounted under {base}; not removing it", file=sys.stderr)
            return
    shutil.rmtree(base, ignore_errors=True)
    if base.exists():
        print(f"could not remove {base}", file=sys.stderr)


# -- the machine ---------------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    try:
        ctd = subprocess.run(
            [CONTAINERD, "--version"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError) as exc:
        ctd = f"unknown ({exc})"
    return {
        "date": time.strftime("%Y-%m-%d"),
        "nproc": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "containerd": ctd,
        "cpu_tick_s": 1 / os.sysconf("SC_CLK_TCK"),  # resolution of the daemon CPU figures
        "loadavg": os.getloadavg(),
    }


def require_containerd() -> bool:
    """True when the reference daemon is installed; otherwise says how to get it, on stderr."""
    if os.access(CONTAINERD, os.X_OK):
        return True
    print(f"{CONTAINERD} not found: apt-get install containerd (the reference daemon)", file=sys.stderr)
    return False
