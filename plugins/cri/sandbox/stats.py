"""Pod statistics: CPU and memory from the shims' cgroup metrics, network from inside the pod's netns.

CPU and memory come from ``TaskManager.stats`` (containerd's
``io.containerd.cgroups.v1.Metrics`` or ``.v2.Metrics``, as an Any) per
task, decoded as a container's own stats are (:mod:`plugins.cri.container.stats`:
working set = usage minus inactive file pages, available = limit minus working
set). ``usage_nano_cores`` needs two samples: :class:`CpuRates` remembers the
last one per id.

Network figures are ``/proc/net/dev`` of the pod's network namespace, read by
a short-lived thread that joins the namespace with setns(2) and reads
``/proc/thread-self/net/dev``. The thread ends right after, so no thread of
the daemon is ever left in a pod's namespace (pooled threads are never used).
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import os
import threading
from dataclasses import dataclass

from daemon.errors import FailedPrecondition
from daemon.protocols import Opaque
from plugins.cri.container.stats import decode
from protos.runtime import v1 as cri

CLONE_NEWNET = 0x40000000

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


@dataclass(frozen=True)
class Usage:
    """One task's CPU (ns used) and memory figures, summed into a pod's."""

    cpu_ns: int = 0
    memory_usage: int = 0
    working_set: int = 0
    rss: int = 0
    page_faults: int = 0
    major_page_faults: int = 0
    available: int = 0

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            self.cpu_ns + other.cpu_ns,
            self.memory_usage + other.memory_usage,
            self.working_set + other.working_set,
            self.rss + other.rss,
            self.page_faults + other.page_faults,
            self.major_page_faults + other.major_page_faults,
            self.available + other.available,
        )


def usage_of(metrics: Opaque | None) -> Usage:
    """One task's figures, decoded as its ContainerStats are (:func:`plugins.cri.container.stats.decode`,
    so a pod's and a container's numbers agree); zeros for none or an unknown type."""
    sample = decode(metrics, 0)
    if sample is None:
        return Usage()
    return Usage(
        cpu_ns=sample.cpu_usage_ns,
        memory_usage=sample.memory_usage,
        working_set=sample.working_set,
        rss=sample.rss,
        page_faults=sample.page_faults,
        major_page_faults=sample.major_page_faults,
        available=sample.available,
    )


class CpuRates:
    """``usage_nano_cores`` from consecutive samples of the same id (0 on the first)."""

    def __init__(self) -> None:
        self._last: dict[str, tuple[int, int]] = {}

    def rate(self, key: str, timestamp_ns: int, cpu_ns: int) -> int:
        last = self._last.get(key)
        self._last[key] = (timestamp_ns, cpu_ns)
        if last is None or timestamp_ns <= last[0] or cpu_ns < last[1]:
            return 0
        return (cpu_ns - last[1]) * 1_000_000_000 // (timestamp_ns - last[0])

    def forget(self, key: str) -> None:
        self._last.pop(key, None)


def cpu_pb(usage: Usage, timestamp: int, nano_cores: int) -> cri.CpuUsage:
    return cri.CpuUsage(
        timestamp=timestamp,
        usage_core_nano_seconds=cri.UInt64Value(usage.cpu_ns),
        usage_nano_cores=cri.UInt64Value(nano_cores),
    )


def memory_pb(usage: Usage, timestamp: int) -> cri.MemoryUsage:
    return cri.MemoryUsage(
        timestamp=timestamp,
        working_set_bytes=cri.UInt64Value(usage.working_set),
        available_bytes=cri.UInt64Value(usage.available),
        usage_bytes=cri.UInt64Value(usage.memory_usage),
        rss_bytes=cri.UInt64Value(usage.rss),
        page_faults=cri.UInt64Value(usage.page_faults),
        major_page_faults=cri.UInt64Value(usage.major_page_faults),
    )


# -- network -------------------------------------------------------------------------------


def parse_net_dev(text: str) -> dict[str, tuple[int, int, int, int]]:
    """``/proc/net/dev``: interface -> (rx_bytes, rx_errors, tx_bytes, tx_errors)."""
    out: dict[str, tuple[int, int, int, int]] = {}
    for line in text.splitlines()[2:]:
        name, sep, rest = line.partition(":")
        if not sep:
            continue
        cols = rest.split()
        if len(cols) < 11:
            continue
        out[name.strip()] = (int(cols[0]), int(cols[2]), int(cols[8]), int(cols[10]))
    return out


def _read_in_netns(netns_path: str, result: list[str | BaseException]) -> None:
    try:
        fd = os.open(netns_path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            if _libc.setns(fd, CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise OSError(err, os.strerror(err))
        finally:
            os.close(fd)
        with open("/proc/thread-self/net/dev") as f:
            result.append(f.read())
    except BaseException as exc:  # noqa: BLE001 - handed to the caller
        result.append(exc)


def _net_dev_blocking(netns_path: str) -> str:
    result: list[str | BaseException] = []
    thread = threading.Thread(target=_read_in_netns, args=(netns_path, result), name="netns-stats")
    thread.start()
    thread.join()
    value = result[0] if result else FailedPrecondition("netns stats: no result")
    if isinstance(value, BaseException):
        raise FailedPrecondition(f"read /proc/net/dev in {netns_path}: {value}")
    return value


async def network_usage(netns_path: str, timestamp: int, default: str = "eth0") -> cri.NetworkUsage:
    """The pod's interfaces (``lo`` left out, as cadvisor does) and the default one."""
    text = await asyncio.to_thread(_net_dev_blocking, netns_path)
    interfaces = []
    default_pb = cri.NetworkInterfaceUsage()
    for name, (rx, rx_err, tx, tx_err) in sorted(parse_net_dev(text).items()):
        if name == "lo":
            continue
        entry = cri.NetworkInterfaceUsage(
            name=name,
            rx_bytes=cri.UInt64Value(rx),
            rx_errors=cri.UInt64Value(rx_err),
            tx_bytes=cri.UInt64Value(tx),
            tx_errors=cri.UInt64Value(tx_err),
        )
        interfaces.append(entry)
        if name == default:
            default_pb = entry
    return cri.NetworkUsage(timestamp=timestamp, default_interface=default_pb, interfaces=interfaces)
