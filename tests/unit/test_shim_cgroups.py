"""The shim's cgroup reading: discovery from /proc/<pid>/cgroup + mountinfo, v1 and v2 metrics.

The trees are written by the tests (tmp_path), in the kernel's formats; the
same code against a real container is covered by tests/integration/test_shim.py.
"""

from __future__ import annotations

import os
from pathlib import Path

from plugins.runtime.runc_v2.shim import cgroups

MOUNTINFO_HYBRID = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,xattr,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw,nsdelegate
50 23 0:40 /kubepods /mnt/nested rw,relatime - cgroup cgroup rw,pids
"""

MOUNTINFO_UNIFIED = """\
31 23 0:28 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime - cgroup2 cgroup2 rw,nsdelegate
"""


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_find_on_a_hybrid_host_maps_each_controller_to_its_mount(tmp_path: Path) -> None:
    write(tmp_path / "mountinfo", MOUNTINFO_HYBRID)
    write(
        tmp_path / "proc/42/cgroup",
        "9:name=systemd:/c1\n7:pids:/kubepods/pod/c1\n4:memory:/c1\n2:cpu,cpuacct:/c1\n0::/c1\n",
    )
    found = cgroups.find(42, proc=str(tmp_path / "proc"), mountinfo=str(tmp_path / "mountinfo"))
    assert not found.unified
    assert found.v1 == {
        "systemd": Path("/sys/fs/cgroup/systemd/c1"),
        "pids": Path("/mnt/nested/pod/c1"),  # the mount shows /kubepods at its mount point
        "memory": Path("/sys/fs/cgroup/memory/c1"),
        "cpu": Path("/sys/fs/cgroup/cpu,cpuacct/c1"),
        "cpuacct": Path("/sys/fs/cgroup/cpu,cpuacct/c1"),
    }
    assert found.v2 == Path("/sys/fs/cgroup/unified/c1")


def test_find_on_a_unified_host(tmp_path: Path) -> None:
    write(tmp_path / "mountinfo", MOUNTINFO_UNIFIED)
    write(tmp_path / "proc/7/cgroup", "0::/berth/c2\n")
    found = cgroups.find(7, proc=str(tmp_path / "proc"), mountinfo=str(tmp_path / "mountinfo"))
    assert found.unified
    assert (found.v1, found.v2) == ({}, Path("/sys/fs/cgroup/berth/c2"))
    assert cgroups.is_unified(str(tmp_path / "mountinfo"))
    write(tmp_path / "hybrid", MOUNTINFO_HYBRID)
    assert not cgroups.is_unified(str(tmp_path / "hybrid"))


def test_v2_metrics_from_the_unified_files(tmp_path: Path) -> None:
    d = tmp_path / "c"
    write(d / "pids.current", "3\n")
    write(d / "pids.max", "max\n")
    write(
        d / "cpu.stat",
        "usage_usec 1500\nuser_usec 1000\nsystem_usec 500\nnr_periods 4\nnr_throttled 1\nthrottled_usec 20\n",
    )
    write(d / "memory.stat", "anon 4096\nfile 8192\nkernel_stack 16384\npgfault 77\nthp_collapse_alloc 2\n")
    write(d / "memory.current", "123456\n")
    write(d / "memory.max", "67108864\n")
    write(d / "memory.swap.current", "0\n")
    write(d / "memory.swap.max", "max\n")
    write(d / "memory.peak", "200000\n")
    write(d / "memory.events", "low 0\nhigh 1\nmax 2\noom 3\noom_kill 4\n")
    write(d / "io.stat", "8:0 rbytes=100 wbytes=200 rios=1 wios=2 dbytes=0 dios=0\n")
    write(d / "hugetlb.2MB.current", "0\n")
    write(d / "hugetlb.2MB.max", "max\n")
    metrics = cgroups.stats_v2(d)
    assert (metrics.pids.current, metrics.pids.limit) == (3, 0)
    assert (metrics.cpu.usage_usec, metrics.cpu.user_usec, metrics.cpu.system_usec) == (1500, 1000, 500)
    assert (metrics.cpu.nr_periods, metrics.cpu.nr_throttled, metrics.cpu.throttled_usec) == (4, 1, 20)
    memory = metrics.memory
    assert (memory.anon, memory.file, memory.kernel_stack, memory.pgfault) == (4096, 8192, 16384, 77)
    assert memory.thp_collapse_alloc == 2
    assert (memory.usage, memory.usage_limit, memory.max_usage) == (123456, 64 * 1024 * 1024, 200000)
    assert (memory.swap_usage, memory.swap_limit) == (0, cgroups.MAX_UINT64)
    events = metrics.memory_events
    assert (events.low, events.high, events.max, events.oom, events.oom_kill) == (0, 1, 2, 3, 4)
    [io] = metrics.io.usage
    assert (io.major, io.minor, io.rbytes, io.wbytes, io.rios, io.wios) == (8, 0, 100, 200, 1, 2)
    [huge] = metrics.hugetlb
    assert (huge.pagesize, huge.current, huge.max) == ("2MB", 0, cgroups.MAX_UINT64)
    assert bytes(metrics)  # encodes


def test_v2_metrics_of_a_group_without_controllers_are_zero(tmp_path: Path) -> None:
    metrics = cgroups.stats_v2(tmp_path)
    assert metrics.memory.usage == 0 and metrics.pids.current == 0 and metrics.io.usage == []


def test_v1_metrics_from_the_controller_files(tmp_path: Path) -> None:
    memory, cpu, pids, blkio = (tmp_path / n for n in ("memory", "cpu", "pids", "blkio"))
    write(
        memory / "memory.stat",
        "cache 10\nrss 20\npgpgin 5\ntotal_cache 11\ntotal_pgpgin 6\n"
        "hierarchical_memory_limit 1048576\nhierarchical_memsw_limit 2097152\n",
    )
    write(memory / "memory.usage_in_bytes", "4096\n")
    write(memory / "memory.limit_in_bytes", "1048576\n")
    write(memory / "memory.max_usage_in_bytes", "8192\n")
    write(memory / "memory.failcnt", "1\n")
    write(memory / "memory.oom_control", "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n")
    write(cpu / "cpuacct.usage", "999\n")
    write(cpu / "cpuacct.usage_percpu", "500 499\n")
    write(cpu / "cpuacct.stat", "user 1\nsystem 2\n")
    write(cpu / "cpu.stat", "nr_periods 3\nnr_throttled 1\nthrottled_time 50\n")
    write(pids / "pids.current", "2\n")
    write(pids / "pids.max", "100\n")
    write(blkio / "blkio.io_serviced_recursive", "")
    write(blkio / "blkio.throttle.io_service_bytes", "8:0 Read 4096\n8:0 Write 0\nTotal 4096\n")
    write(blkio / "blkio.throttle.io_serviced", "8:0 Read 1\nTotal 1\n")
    metrics = cgroups.stats_v1({"memory": memory, "cpu": cpu, "cpuacct": cpu, "pids": pids, "blkio": blkio})
    stat = metrics.memory
    assert (stat.cache, stat.rss, stat.pg_pg_in, stat.total_cache, stat.total_pg_pg_in) == (10, 20, 5, 11, 6)
    assert (stat.hierarchical_memory_limit, stat.hierarchical_swap_limit) == (1048576, 2097152)
    usage = stat.usage
    assert (usage.usage, usage.limit, usage.max, usage.failcnt) == (4096, 1048576, 8192, 1)
    assert metrics.memory_oom_control.oom_kill == 2
    ticks = os.sysconf("SC_CLK_TCK")
    assert metrics.cpu.usage.total == 999 and metrics.cpu.usage.per_cpu == [500, 499]
    assert (metrics.cpu.usage.user, metrics.cpu.usage.kernel) == (10**9 // ticks, 2 * 10**9 // ticks)
    assert (metrics.cpu.throttling.periods, metrics.cpu.throttling.throttled_time) == (3, 50)
    assert (metrics.pids.current, metrics.pids.limit) == (2, 100)
    # CFQ files empty: the throttle files are read, as containerd does
    assert [(e.op, e.major, e.value) for e in metrics.blkio.io_service_bytes_recursive] == [
        ("Read", 8, 4096),
        ("Write", 8, 0),
    ]
    assert [(e.op, e.value) for e in metrics.blkio.io_serviced_recursive] == [("Read", 1)]


def test_remove_takes_empty_groups_and_reports_busy_ones(tmp_path: Path) -> None:
    empty, busy = tmp_path / "memory" / "c1", tmp_path / "pids" / "c1"
    empty.mkdir(parents=True)
    write(busy / "cgroup.procs", "1\n")  # a plain directory with a file: rmdir fails as on a live group
    left = cgroups.remove(cgroups.Cgroup(unified=False, v1={"memory": empty, "pids": busy}))
    assert not empty.exists()
    assert left == [busy]
