"""A container's cgroup: where it is, its metrics, its removal, its OOM events.

The cgroup is found the way containerd's shim finds it: from the init's
``/proc/<pid>/cgroup`` right after ``runc create``, against this host's cgroup
mounts (``/proc/self/mountinfo``). The mode follows containerd too: *unified*
(v2) only when ``/sys/fs/cgroup`` itself is a cgroup2 mount; a hybrid host (v1
controllers plus an empty cgroup2 beside them) is v1.

Metrics are containerd's ``io.containerd.cgroups.v1.Metrics`` and
``io.containerd.cgroups.v2.Metrics`` (protos/io/containerd/cgroups), filled
from the cgroup files the same way containerd/cgroups reads them. Reading is
plain file I/O on a pseudo-filesystem: callers run it in a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from protos.io.containerd.cgroups import v1, v2

log = structlog.get_logger(__name__)

CGROUP_ROOT = "/sys/fs/cgroup"
MAX_UINT64 = 2**64 - 1


@dataclass
class Cgroup:
    """One process's cgroup: v1 controller -> directory, or the single v2 directory."""

    unified: bool
    v1: dict[str, Path] = field(default_factory=dict)
    v2: Path | None = None

    def dirs(self) -> list[Path]:
        found = [self.v2] if self.v2 is not None else []
        return sorted({*found, *self.v1.values()})


# -- discovery ----------------------------------------------------------------


@dataclass(frozen=True)
class _MountPoint:
    root: str  # the cgroup path the mount shows at its mount point
    point: str
    controllers: frozenset[str]  # empty for cgroup2


def _mounts(mountinfo: str) -> list[tuple[str, _MountPoint]]:
    found: list[tuple[str, _MountPoint]] = []
    for line in Path(mountinfo).read_text().splitlines():
        left, _, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if len(fields) < 5 or len(tail) < 3 or tail[0] not in ("cgroup", "cgroup2"):
            continue
        controllers = frozenset(o for o in tail[2].split(",") if o not in ("rw", "ro") and "=" not in o)
        named = frozenset(o for o in tail[2].split(",") if o.startswith("name="))
        found.append((tail[0], _MountPoint(fields[3], fields[4], controllers | named)))
    return found


def is_unified(mountinfo: str = "/proc/self/mountinfo") -> bool:
    return any(kind == "cgroup2" and mp.point == CGROUP_ROOT for kind, mp in _mounts(mountinfo))


def _join(mount: _MountPoint, path: str) -> Path:
    relative = os.path.relpath(path, mount.root) if mount.root != "/" else path.lstrip("/")
    return Path(mount.point) / relative if relative != "." else Path(mount.point)


def find(pid: int, *, proc: str = "/proc", mountinfo: str = "/proc/self/mountinfo") -> Cgroup:
    """The cgroup of ``pid`` on this host (OSError if the process is gone)."""
    mounts = _mounts(mountinfo)
    cgroup = Cgroup(unified=any(k == "cgroup2" and mp.point == CGROUP_ROOT for k, mp in mounts))
    for line in Path(proc, str(pid), "cgroup").read_text().splitlines():
        _, names, path = line.split(":", 2)
        if not names:
            for kind, mp in mounts:
                if kind == "cgroup2":
                    cgroup.v2 = _join(mp, path)
                    break
            continue
        for name in names.split(","):
            for kind, mp in mounts:
                if kind == "cgroup" and name in mp.controllers:
                    cgroup.v1[name.removeprefix("name=")] = _join(mp, path)
                    break
    return cgroup


def remove(cgroup: Cgroup) -> list[Path]:
    """rmdir the container's cgroup directories runc left behind; returns those still there.

    Only empty groups can go (rmdir fails on one holding processes), so this
    never disturbs a live container. A directory that is the mount point itself
    (the process was in the root cgroup) is never touched.
    """
    left: list[Path] = []
    for path in cgroup.dirs():
        if str(path) == CGROUP_ROOT or os.path.ismount(path):
            continue
        try:
            path.rmdir()
            log.info("shim.cgroup_removed", path=str(path))
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("shim.cgroup_remove_failed", path=str(path), error=str(exc))
            left.append(path)
    return left


# -- file parsing -------------------------------------------------------------


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except (FileNotFoundError, OSError):
        return None


def _uint(text: str | None) -> int:
    """A counter or limit; ``max`` (v2 'no limit') is the largest uint64, as containerd reports."""
    if text is None:
        return 0
    text = text.strip()
    if text == "max":
        return MAX_UINT64
    try:
        return min(int(text), MAX_UINT64) if int(text) >= 0 else 0
    except ValueError:
        return 0


def _keyed(text: str | None) -> dict[str, int]:
    """``key value`` lines (memory.stat, cpu.stat, memory.events)."""
    out: dict[str, int] = {}
    for line in (text or "").splitlines():
        parts = line.split()
        if len(parts) == 2:
            out[parts[0]] = _uint(parts[1])
    return out


# -- v1 -----------------------------------------------------------------------

#: memory.stat key -> MemoryStat field of v1 (the non-"total_" half; totals map alike)
_V1_MEMORY = {
    "cache": "cache",
    "rss": "rss",
    "rss_huge": "rss_huge",
    "mapped_file": "mapped_file",
    "dirty": "dirty",
    "writeback": "writeback",
    "pgpgin": "pg_pg_in",
    "pgpgout": "pg_pg_out",
    "pgfault": "pg_fault",
    "pgmajfault": "pg_maj_fault",
    "inactive_anon": "inactive_anon",
    "active_anon": "active_anon",
    "inactive_file": "inactive_file",
    "active_file": "active_file",
    "unevictable": "unevictable",
}


def _memory_entry(base: Path, prefix: str) -> v1.MemoryEntry:
    return v1.MemoryEntry(
        limit=_uint(_read(base / f"{prefix}.limit_in_bytes")),
        usage=_uint(_read(base / f"{prefix}.usage_in_bytes")),
        max=_uint(_read(base / f"{prefix}.max_usage_in_bytes")),
        failcnt=_uint(_read(base / f"{prefix}.failcnt")),
    )


def _blkio(base: Path, name: str) -> list[v1.BlkIoEntry]:
    entries: list[v1.BlkIoEntry] = []
    for line in (_read(base / name) or "").splitlines():
        parts = line.split()
        if len(parts) not in (2, 3) or ":" not in parts[0]:
            continue
        major, _, minor = parts[0].partition(":")
        op = parts[1] if len(parts) == 3 else ""
        entries.append(v1.BlkIoEntry(op=op, major=_uint(major), minor=_uint(minor), value=_uint(parts[-1])))
    return entries


def stats_v1(dirs: dict[str, Path]) -> v1.Metrics:
    """containerd's v1 Metrics from the controller directories that exist."""
    metrics = v1.Metrics()
    if (pids := dirs.get("pids")) is not None:
        metrics.pids = v1.PidsStat(current=_uint(_read(pids / "pids.current")), limit=_pids_limit(pids))
    cpu = v1.CpuStat()
    if (acct := dirs.get("cpuacct")) is not None:
        ticks = os.sysconf("SC_CLK_TCK")
        times = _keyed(_read(acct / "cpuacct.stat"))
        cpu.usage = v1.CpuUsage(
            total=_uint(_read(acct / "cpuacct.usage")),
            user=times.get("user", 0) * 1_000_000_000 // ticks,
            kernel=times.get("system", 0) * 1_000_000_000 // ticks,
            per_cpu=[_uint(v) for v in (_read(acct / "cpuacct.usage_percpu") or "").split()],
        )
    if (cpu_dir := dirs.get("cpu")) is not None:
        throttle = _keyed(_read(cpu_dir / "cpu.stat"))
        cpu.throttling = v1.Throttle(
            periods=throttle.get("nr_periods", 0),
            throttled_periods=throttle.get("nr_throttled", 0),
            throttled_time=throttle.get("throttled_time", 0),
        )
    metrics.cpu = cpu
    if (memory := dirs.get("memory")) is not None:
        raw = _keyed(_read(memory / "memory.stat"))
        stat = v1.MemoryStat(
            hierarchical_memory_limit=raw.get("hierarchical_memory_limit", 0),
            hierarchical_swap_limit=raw.get("hierarchical_memsw_limit", 0),
            usage=_memory_entry(memory, "memory"),
            swap=_memory_entry(memory, "memory.memsw"),
            kernel=_memory_entry(memory, "memory.kmem"),
            kernel_tcp=_memory_entry(memory, "memory.kmem.tcp"),
        )
        for key, name in _V1_MEMORY.items():
            setattr(stat, name, raw.get(key, 0))
            setattr(stat, f"total_{name}", raw.get(f"total_{key}", 0))
        metrics.memory = stat
        oom = _keyed(_read(memory / "memory.oom_control"))
        metrics.memory_oom_control = v1.MemoryOomControl(
            oom_kill_disable=oom.get("oom_kill_disable", 0),
            under_oom=oom.get("under_oom", 0),
            oom_kill=oom.get("oom_kill", 0),
        )
    if (blkio := dirs.get("blkio")) is not None:
        stat_names = [
            "io_service_bytes_recursive",
            "io_serviced_recursive",
            "io_queued_recursive",
            "io_service_time_recursive",
            "io_wait_time_recursive",
            "io_merged_recursive",
            "io_time_recursive",
            "sectors_recursive",
        ]
        blk = v1.BlkIoStat()
        for name in stat_names:
            setattr(blk, name, _blkio(blkio, f"blkio.{name}"))
        if not blk.io_serviced_recursive:
            # CFQ's files are empty with other IO schedulers; containerd then reads the throttle ones.
            blk.io_service_bytes_recursive = _blkio(blkio, "blkio.throttle.io_service_bytes")
            blk.io_serviced_recursive = _blkio(blkio, "blkio.throttle.io_serviced")
        metrics.blkio = blk
    if (hugetlb := dirs.get("hugetlb")) is not None:
        for limit in sorted(hugetlb.glob("hugetlb.*.limit_in_bytes")):
            size = limit.name.split(".")[1]
            metrics.hugetlb.append(
                v1.HugetlbStat(
                    usage=_uint(_read(hugetlb / f"hugetlb.{size}.usage_in_bytes")),
                    max=_uint(_read(hugetlb / f"hugetlb.{size}.max_usage_in_bytes")),
                    failcnt=_uint(_read(hugetlb / f"hugetlb.{size}.failcnt")),
                    pagesize=size,
                )
            )
    return metrics


def _pids_limit(base: Path) -> int:
    text = (_read(base / "pids.max") or "").strip()
    return 0 if text in ("", "max") else _uint(text)


# -- v2 -----------------------------------------------------------------------

_V2_MEMORY = [
    "anon",
    "file",
    "kernel_stack",
    "slab",
    "sock",
    "shmem",
    "file_mapped",
    "file_dirty",
    "file_writeback",
    "anon_thp",
    "inactive_anon",
    "active_anon",
    "inactive_file",
    "active_file",
    "unevictable",
    "slab_reclaimable",
    "slab_unreclaimable",
    "pgfault",
    "pgmajfault",
    "workingset_refault",
    "workingset_activate",
    "workingset_nodereclaim",
    "pgrefill",
    "pgscan",
    "pgsteal",
    "pgactivate",
    "pgdeactivate",
    "pglazyfree",
    "pglazyfreed",
    "thp_fault_alloc",
    "thp_collapse_alloc",
]


def stats_v2(path: Path) -> v2.Metrics:
    """containerd's v2 Metrics from one unified cgroup directory."""
    metrics = v2.Metrics()
    metrics.pids = v2.PidsStat(current=_uint(_read(path / "pids.current")), limit=_pids_limit(path))
    cpu = _keyed(_read(path / "cpu.stat"))
    metrics.cpu = v2.CpuStat(
        usage_usec=cpu.get("usage_usec", 0),
        user_usec=cpu.get("user_usec", 0),
        system_usec=cpu.get("system_usec", 0),
        nr_periods=cpu.get("nr_periods", 0),
        nr_throttled=cpu.get("nr_throttled", 0),
        throttled_usec=cpu.get("throttled_usec", 0),
    )
    raw = _keyed(_read(path / "memory.stat"))
    memory = v2.MemoryStat(**{name: raw.get(name, 0) for name in _V2_MEMORY})
    memory.usage = _uint(_read(path / "memory.current"))
    memory.usage_limit = _uint(_read(path / "memory.max"))
    memory.swap_usage = _uint(_read(path / "memory.swap.current"))
    memory.swap_limit = _uint(_read(path / "memory.swap.max"))
    memory.max_usage = _uint(_read(path / "memory.peak"))
    memory.swap_max_usage = _uint(_read(path / "memory.swap.peak"))
    metrics.memory = memory
    events = _keyed(_read(path / "memory.events"))
    if events:
        metrics.memory_events = v2.MemoryEvents(
            low=events.get("low", 0),
            high=events.get("high", 0),
            max=events.get("max", 0),
            oom=events.get("oom", 0),
            oom_kill=events.get("oom_kill", 0),
        )
    for line in (_read(path / "io.stat") or "").splitlines():
        device, *pairs = line.split()
        major, _, minor = device.partition(":")
        values = dict(p.split("=", 1) for p in pairs if "=" in p)
        metrics.io.usage.append(
            v2.IoEntry(
                major=_uint(major),
                minor=_uint(minor),
                rbytes=_uint(values.get("rbytes")),
                wbytes=_uint(values.get("wbytes")),
                rios=_uint(values.get("rios")),
                wios=_uint(values.get("wios")),
            )
        )
    for current in sorted(path.glob("hugetlb.*.current")):
        size = current.name.split(".")[1]
        metrics.hugetlb.append(
            v2.HugeTlbStat(
                current=_uint(_read(current)), max=_uint(_read(path / f"hugetlb.{size}.max")), pagesize=size
            )
        )
    return metrics


# -- OOM (v1) -----------------------------------------------------------------


class OomWatch:
    """v1 OOM notifications of one memory cgroup (an eventfd on memory.oom_control).

    ``on_oom`` is called on the loop for each OOM; the eventfd also fires when
    the cgroup is removed, which ends the watch. v2 has no such fd (memory.events
    must be watched with inotify): not supported yet, Stats still reports the counts.
    """

    def __init__(self, memory_dir: Path, on_oom: Callable[[], None]) -> None:
        self._dir = memory_dir
        self._on_oom = on_oom
        self._efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        control = os.open(memory_dir / "memory.oom_control", os.O_RDONLY | os.O_CLOEXEC)
        try:
            (memory_dir / "cgroup.event_control").write_text(f"{self._efd} {control}")
        except BaseException:
            os.close(self._efd)
            raise
        finally:
            os.close(control)
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._efd, self._ready)

    def _ready(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self._efd)
        if not (self._dir / "memory.oom_control").exists():
            self.close()
            return
        self._on_oom()

    def close(self) -> None:
        if self._efd >= 0:
            self._loop.remove_reader(self._efd)
            os.close(self._efd)
            self._efd = -1
