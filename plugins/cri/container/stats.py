"""A shim's cgroup statistics as CRI ``CpuUsage``/``MemoryUsage`` (containerd's ``containerMetrics``).

The shim answers ``io.containerd.cgroups.v1.Metrics`` (this node: cgroup v1)
or ``io.containerd.cgroups.v2.Metrics``. Working set is usage minus inactive
file pages, as cAdvisor and containerd count it. ``usage_nano_cores`` needs
two samples: :class:`CpuRates` keeps the last one per container.
"""

from __future__ import annotations

from dataclasses import dataclass

from daemon.protocols import Opaque
from protos.io.containerd.cgroups import v1 as cg1
from protos.io.containerd.cgroups import v2 as cg2
from protos.runtime import v1 as cri

V1_TYPE = "io.containerd.cgroups.v1.Metrics"
V2_TYPE = "io.containerd.cgroups.v2.Metrics"


@dataclass(frozen=True)
class Sample:
    """What the CRI reports of one cgroup at one time."""

    timestamp: int  # ns
    cpu_usage_ns: int
    memory_usage: int
    working_set: int
    rss: int
    page_faults: int
    major_page_faults: int
    available: int  # limit - working set, 0 without a limit


def decode(stats: Opaque | None, timestamp: int) -> Sample | None:
    """The sample in a shim's Stats answer; None when there is none or of an unknown type."""
    if stats is None:
        return None
    kind = stats.type_url.rsplit("/", 1)[-1]
    if kind == V1_TYPE:
        m1 = cg1.Metrics().parse(stats.value)
        mem = m1.memory
        usage = mem.usage.usage
        working = usage - mem.total_inactive_file if usage > mem.total_inactive_file else 0
        limit = mem.usage.limit if mem.usage.limit < (1 << 62) else 0
        return Sample(
            timestamp,
            m1.cpu.usage.total,
            usage,
            working,
            mem.total_rss,
            mem.total_pg_fault,
            mem.total_pg_maj_fault,
            max(limit - working, 0) if limit else 0,
        )
    if kind == V2_TYPE:
        m2 = cg2.Metrics().parse(stats.value)
        mem2 = m2.memory
        working = mem2.usage - mem2.inactive_file if mem2.usage > mem2.inactive_file else 0
        limit = mem2.usage_limit if mem2.usage_limit < (1 << 62) else 0
        return Sample(
            timestamp,
            m2.cpu.usage_usec * 1000,
            mem2.usage,
            working,
            mem2.anon,
            mem2.pgfault,
            mem2.pgmajfault,
            max(limit - working, 0) if limit else 0,
        )
    return None


class CpuRates:
    """``usage_nano_cores`` from the previous sample of each container (containerd keeps the same)."""

    def __init__(self) -> None:
        self._last: dict[str, tuple[int, int]] = {}

    def rate(self, container_id: str, sample: Sample) -> int | None:
        previous = self._last.get(container_id)
        self._last[container_id] = (sample.timestamp, sample.cpu_usage_ns)
        if previous is None or sample.timestamp <= previous[0] or sample.cpu_usage_ns < previous[1]:
            return None
        return (sample.cpu_usage_ns - previous[1]) * 1_000_000_000 // (sample.timestamp - previous[0])

    def forget(self, container_id: str) -> None:
        self._last.pop(container_id, None)


def cpu_usage(sample: Sample, nano_cores: int | None) -> cri.CpuUsage:
    out = cri.CpuUsage(
        timestamp=sample.timestamp, usage_core_nano_seconds=cri.UInt64Value(value=sample.cpu_usage_ns)
    )
    if nano_cores is not None:
        out.usage_nano_cores = cri.UInt64Value(value=nano_cores)
    return out


def memory_usage(sample: Sample) -> cri.MemoryUsage:
    return cri.MemoryUsage(
        timestamp=sample.timestamp,
        working_set_bytes=cri.UInt64Value(value=sample.working_set),
        available_bytes=cri.UInt64Value(value=sample.available),
        usage_bytes=cri.UInt64Value(value=sample.memory_usage),
        rss_bytes=cri.UInt64Value(value=sample.rss),
        page_faults=cri.UInt64Value(value=sample.page_faults),
        major_page_faults=cri.UInt64Value(value=sample.major_page_faults),
    )
