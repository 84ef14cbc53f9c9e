"""CRI pods and containers: berth's CRI plugin against containerd's, through one CRI client.

    .venv/bin/python -m bench.cri [--pods N] [--containers N] [--list-calls N] [--quick] [--json]

berthd and a private containerd 1.6 with its CRI plugin run side by side on
temporary roots, each with its own CNI conf dir (Debian's bridge +
host-local + portmap, a bridge and a /22 of its own, no gateway, no
masquerade, no route off the machine), its own pod cgroup parent and the
same busybox image imported into ``k8s.io``. containerd needs a sandbox
image: a busybox whose entrypoint sleeps, imported as ``localhost/pause:bench``
(nothing is pulled; the machine has no network). berth runs no pause
container. Every call goes through the same betterproto ``runtime.v1``
stub over grpclib. In one run:

1. **sequential start**: ``--pods`` pods per daemon, one after the other,
   the daemons taking turns (the first alternating): RunPodSandbox, then
   CreateContainer + StartContainer of one ``sleep`` container, each timed.
2. **memory** with 0 pods (after the image import), ``--pods`` and twice
   that: RSS and PSS (``smaps_rollup``) of the daemon and of its shims
   (every process whose command line or environment names the daemon's
   directory: shims, berth's shim fork server); containers' own processes
   (containerd's pause included) are not counted.
3. **concurrent start**: ``--pods`` more pods per daemon (the same
   runp+create+start), 4 clients on 4 connections at once: pods per second.
4. **List** with the ``2 * --pods`` started containers, then again after
   creating (not starting: they cost no process) more containers in the
   concurrent pods up to ``--containers``: ListContainers and ListPodSandbox
   without a filter, ``--list-calls`` each, alternating daemons, with the
   daemon's CPU per call. The client's own betterproto cost of the biggest
   ListContainers answer (encode and parse, in this process) is measured to
   tell how much of berth's latency its server-side encoding can be.
5. **sequential stop**: StopPodSandbox + RemovePodSandbox of the pods of
   step 1, daemons taking turns, each timed.

Every pod is then stopped and removed through CRI; in ``finally`` the
daemons are stopped, every leftover shim (by PID) and every process in the
pod cgroups killed, the cgroups, bridges and mounts removed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import secrets
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import betterproto
from grpclib.client import Channel, UnaryUnaryMethod
from grpclib.exceptions import GRPCError

from bench.daemons import (
    CTR,
    BenchError,
    Daemon,
    berthd_daemon,
    containerd_daemon,
    exit_status,
    machine,
    make_base,
    quiet_logs,
    remove_base,
    require_containerd,
    stop_all,
    terminate_as_interrupt,
    wait_ready,
)
from bench.report import Figure, Metric, distribution, format_table, rounded
from daemon.cli import podnet
from protos.runtime import v1 as cri

IMAGE = "docker.io/library/busybox:latest"
PAUSE_IMAGE = "localhost/pause:bench"
K8S = "k8s.io"
CNI_BIN = Path("/usr/lib/cni")
CALL_TIMEOUT = 120.0
CLIENTS = 4
NS = cri.NamespaceMode


class Raw:
    """Message bytes as they are on the wire: grpclib's codec calls these two methods and no others.

    Timing a List with this reply type leaves the client's protobuf parse out,
    which otherwise is most of the latency of a big List for either daemon.
    """

    def __init__(self, data: bytes = b"") -> None:
        self.data = data

    def SerializeToString(self) -> bytes:
        return self.data

    @classmethod
    def FromString(cls, data: bytes) -> Raw:
        return cls(data)


@dataclass
class Pod:
    id: str
    config: cri.PodSandboxConfig
    containers: int = 0


@dataclass
class Memory:
    pods: int
    daemon_rss_kib: int
    daemon_pss_kib: int
    shims: int
    shims_rss_kib: int
    shims_pss_kib: int


@dataclass
class Side:
    """One daemon, its pod network and cgroup parent, and what was measured against it."""

    name: str
    daemon: Daemon
    dir: Path
    bridge: str
    subnet: str
    cgroup_parent: str
    version: str = ""
    channel: Channel | None = None
    pods: list[Pod] = field(default_factory=list)
    lat_ms: dict[str, list[float]] = field(default_factory=dict)
    cpu_ms: dict[str, float] = field(default_factory=dict)
    pods_per_s: float = float("nan")
    memory: list[Memory] = field(default_factory=list)

    def chan(self) -> Channel:
        if self.channel is None:
            self.channel = Channel(path=self.daemon.address)
        return self.channel

    @property
    def rt(self) -> cri.RuntimeServiceStub:
        return cri.RuntimeServiceStub(self.chan(), timeout=CALL_TIMEOUT)

    def record(self, what: str, seconds: float) -> None:
        self.lat_ms.setdefault(what, []).append(seconds * 1000)


# -- setup ---------------------------------------------------------------------------------------------------


def conflist(side_dir: Path, bridge: str, subnet: str) -> dict[str, Any]:
    """A pod network that reaches only its own pods: no gateway, no masquerade, no default route."""
    return podnet.conflist("bench-pods", bridge, subnet, side_dir / "ipam", portmap=True)


def write_network(side_dir: Path, bridge: str, subnet: str) -> Path:
    net = side_dir / "net.d"
    net.mkdir(parents=True)
    (net / "10-bench.conflist").write_text(json.dumps(conflist(side_dir, bridge, subnet)))
    return net


def berth_config(net: Path) -> str:
    return f"""
[plugins."berth.cri.v1.cri"]
conf_dir = "{net}"
bin_dirs = ["{CNI_BIN}"]
"""


def containerd_cri_config(base: Path, net: Path) -> str:
    """CRI on a private root: local sandbox image, our CNI dirs, runc state and netns under ``base``.

    ``restrict_oom_score_adj``: the machine has no CAP_SYS_RESOURCE and the
    sandbox's default -998 would fail. The runc ``Root`` keeps the shims away
    from the system's /run/containerd/runc.
    """
    return f"""
  [plugins."io.containerd.grpc.v1.cri"]
    sandbox_image = "{PAUSE_IMAGE}"
    stream_server_address = "127.0.0.1"
    stream_server_port = "0"
    restrict_oom_score_adj = true
    disable_apparmor = true
    netns_mounts_under_state_dir = true
    enable_unprivileged_ports = false
    enable_unprivileged_icmp = false
    [plugins."io.containerd.grpc.v1.cri".containerd]
      snapshotter = "overlayfs"
      default_runtime_name = "runc"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
        runtime_type = "io.containerd.runc.v2"
        [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
          Root = "{base / "runc"}"
          SystemdCgroup = false
    [plugins."io.containerd.grpc.v1.cri".cni]
      bin_dir = "{CNI_BIN}"
      conf_dir = "{net}"
      max_conf_num = 1
"""


def archives(base: Path) -> tuple[Path, Path]:
    """The busybox image and containerd's pause image (busybox whose entrypoint sleeps), as OCI archives."""
    from tests.support.oci import busybox_image, oci_archive

    image = oci_archive(busybox_image("gzip"), base / "busybox.tar", image_name=IMAGE)
    pause = busybox_image("gzip", entrypoint=["/bin/sleep"], cmd=["2147483647"])
    return image, oci_archive(pause, base / "pause.tar", image_name=PAUSE_IMAGE)


def ctr_import(d: Daemon, archive: Path) -> None:
    argv = [CTR, "--address", d.address, "--namespace", K8S, "images", "import", str(archive)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise BenchError(f"{d.name}: {' '.join(argv)} exited {proc.returncode}: {proc.stderr.strip()}")


async def wait_cri_ready(side: Side, limit_s: float = 30.0) -> None:
    """Status until RuntimeReady and NetworkReady are both true (containerd's CRI starts after its API)."""
    deadline = time.monotonic() + limit_s
    last = ""
    while time.monotonic() < deadline:
        side.daemon.check_alive()
        try:
            resp = await side.rt.status(cri.StatusRequest())
            conds = {c.type: c for c in resp.status.conditions}
            if all(t in conds and conds[t].status for t in ("RuntimeReady", "NetworkReady")):
                return
            last = "; ".join(f"{c.type}={c.status} {c.reason} {c.message}" for c in conds.values())
        except GRPCError as exc:
            last = f"{exc.status.name}: {exc.message}"
        await asyncio.sleep(0.1)
    raise BenchError(f"{side.name}: CRI not ready after {limit_s}s ({last})")


async def wait_image(side: Side, ref: str, limit_s: float = 30.0) -> None:
    """containerd's CRI learns of ``ctr import`` from an event: wait until ImageStatus knows ``ref``."""
    stub = cri.ImageServiceStub(side.chan(), timeout=CALL_TIMEOUT)
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        resp = await stub.image_status(cri.ImageStatusRequest(image=cri.ImageSpec(image=ref)))
        if resp.image.id:
            return
        await asyncio.sleep(0.1)
    raise BenchError(f"{side.name}: CRI does not see image {ref} after {limit_s}s")


# -- CRI calls -----------------------------------------------------------------------------------------------


def pod_config(side: Side, name: str) -> cri.PodSandboxConfig:
    return cri.PodSandboxConfig(
        metadata=cri.PodSandboxMetadata(name=name, namespace="bench", uid=f"uid-{name}", attempt=0),
        hostname=name,
        log_directory=str(side.dir / "logs" / name),
        labels={"app": "bench", "pod": name},
        annotations={"bench": "cri"},
        linux=cri.LinuxPodSandboxConfig(
            cgroup_parent=side.cgroup_parent,
            security_context=cri.LinuxSandboxSecurityContext(
                namespace_options=cri.NamespaceOption(network=NS.POD, pid=NS.CONTAINER, ipc=NS.POD)
            ),
        ),
    )


def container_config(name: str) -> cri.ContainerConfig:
    return cri.ContainerConfig(
        metadata=cri.ContainerMetadata(name=name, attempt=0),
        image=cri.ImageSpec(image=IMAGE),
        command=["sleep", "3600"],
        log_path=f"{name}.log",
        labels={"app": "bench", "container": name},
        linux=cri.LinuxContainerConfig(
            security_context=cri.LinuxContainerSecurityContext(
                namespace_options=cri.NamespaceOption(network=NS.POD, pid=NS.CONTAINER, ipc=NS.POD)
            )
        ),
    )


async def run_pod(side: Side, rt: cri.RuntimeServiceStub, name: str, timed: bool) -> Pod:
    """RunPodSandbox, then CreateContainer + StartContainer of one ``sleep``; timed into ``side.lat_ms``."""
    config = pod_config(side, name)
    Path(config.log_directory).mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - one mkdir
    t0 = time.perf_counter()
    sid = (await rt.run_pod_sandbox(cri.RunPodSandboxRequest(config=config))).pod_sandbox_id
    pod = Pod(sid, config)
    side.pods.append(pod)
    t1 = time.perf_counter()
    cid = (
        await rt.create_container(
            cri.CreateContainerRequest(
                pod_sandbox_id=sid, config=container_config("c0"), sandbox_config=config
            )
        )
    ).container_id
    pod.containers += 1
    t2 = time.perf_counter()
    await rt.start_container(cri.StartContainerRequest(container_id=cid))
    t3 = time.perf_counter()
    if timed:
        side.record("RunPodSandbox", t1 - t0)
        side.record("CreateContainer", t2 - t1)
        side.record("StartContainer", t3 - t2)
        side.record("CreateContainer+StartContainer", t3 - t1)
        side.record("runp+create+start", t3 - t0)
    return pod


async def stop_remove(side: Side, rt: cri.RuntimeServiceStub, pod: Pod, timed: bool) -> None:
    t0 = time.perf_counter()
    await rt.stop_pod_sandbox(cri.StopPodSandboxRequest(pod_sandbox_id=pod.id))
    t1 = time.perf_counter()
    await rt.remove_pod_sandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=pod.id))
    t2 = time.perf_counter()
    side.pods.remove(pod)
    if timed:
        side.record("StopPodSandbox", t1 - t0)
        side.record("RemovePodSandbox", t2 - t1)
        side.record("StopPodSandbox+RemovePodSandbox", t2 - t0)


def turns(sides: list[Side], i: int) -> list[Side]:
    """Both sides, the first alternating with ``i``, so neither always runs on the warmer machine."""
    return sides if i % 2 == 0 else list(reversed(sides))


async def in_workers(calls: list[Callable[[cri.RuntimeServiceStub], Awaitable[None]]], side: Side) -> float:
    """Run ``calls`` on :data:`CLIENTS` workers, each with its own connection; returns the wall time."""
    queue = list(reversed(calls))

    async def worker() -> None:
        channel = Channel(path=side.daemon.address)
        try:
            rt = cri.RuntimeServiceStub(channel, timeout=CALL_TIMEOUT)
            while queue:
                await queue.pop()(rt)
        finally:
            channel.close()

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(CLIENTS)))
    return time.perf_counter() - start


# -- memory --------------------------------------------------------------------------------------------------


def _kib(pid: int, file: str, key: str) -> int:
    for line in Path(f"/proc/{pid}/{file}").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise BenchError(f"no {key} in /proc/{pid}/{file}")


def helper_pids(side_dir: Path, exclude: set[int]) -> list[int]:
    """Processes whose command line or environment names ``side_dir``: the daemon's shims and helpers."""
    mark = str(side_dir).encode() + b"/"
    me = os.getpid()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        if pid in exclude or pid == me:
            continue
        with contextlib.suppress(OSError):
            if mark in (entry / "cmdline").read_bytes() or mark in (entry / "environ").read_bytes():
                found.append(pid)
    return sorted(found)


def measure_memory(side: Side) -> Memory:
    pid = side.daemon.pid
    rss = pss = 0
    shims = helper_pids(side.dir, {pid})
    for p in shims:
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            rss += _kib(p, "status", "VmRSS")
            pss += _kib(p, "smaps_rollup", "Pss")
    return Memory(
        len(side.pods), _kib(pid, "status", "VmRSS"), _kib(pid, "smaps_rollup", "Pss"), len(shims), rss, pss
    )


# -- the phases ----------------------------------------------------------------------------------------------


async def sequential_start(sides: list[Side], n: int) -> list[Pod]:
    first: dict[str, list[Pod]] = {s.name: [] for s in sides}
    for i in range(n):
        for side in turns(sides, i):
            first[side.name].append(await run_pod(side, side.rt, f"seq-{i}", timed=True))
    return [p for s in sides for p in first[s.name]]


async def concurrent_start(sides: list[Side], n: int) -> None:
    for side in sides:

        def call(i: int, side: Side = side) -> Callable[[cri.RuntimeServiceStub], Awaitable[None]]:
            async def one(rt: cri.RuntimeServiceStub) -> None:
                await run_pod(side, rt, f"par-{i}", timed=False)

            return one

        wall = await in_workers([call(i) for i in range(n)], side)
        side.pods_per_s = n / wall


async def fill_containers(side: Side, pods: list[Pod], total: int) -> None:
    """Create (never start) containers in ``pods``, round robin, until the daemon holds ``total``."""
    have = sum(p.containers for p in side.pods)
    calls = []
    for k in range(max(0, total - have)):
        pod = pods[k % len(pods)]

        def call(pod: Pod = pod, k: int = k) -> Callable[[cri.RuntimeServiceStub], Awaitable[None]]:
            async def one(rt: cri.RuntimeServiceStub) -> None:
                req = cri.CreateContainerRequest(
                    pod_sandbox_id=pod.id, config=container_config(f"x{k}"), sandbox_config=pod.config
                )
                await rt.create_container(req)
                pod.containers += 1

            return one

        calls.append(call())
    await in_workers(calls, side)


async def list_latency(sides: list[Side], calls: int, tag: str) -> None:
    """ListContainers and ListPodSandbox, unfiltered; checks each answer holds every object of the side."""
    for side in sides:  # warm-up, and the check
        containers = (await side.rt.list_containers(cri.ListContainersRequest())).containers
        pods = (await side.rt.list_pod_sandbox(cri.ListPodSandboxRequest())).items
        want_c, want_p = sum(p.containers for p in side.pods), len(side.pods)
        if len(containers) != want_c or len(pods) != want_p:
            raise BenchError(
                f"{side.name}: lists {len(containers)} containers and {len(pods)} pods, "
                f"expected {want_c} and {want_p}"
            )
    for what in ("ListContainers", "ListPodSandbox", "ListContainers unparsed", "ListPodSandbox unparsed"):
        name = f"{what} {tag}"
        cpu0 = {s.name: s.daemon.cpu_seconds() for s in sides}
        for i in range(calls):
            for side in turns(sides, i):
                t0 = time.perf_counter()
                if what == "ListContainers":
                    await side.rt.list_containers(cri.ListContainersRequest())
                elif what == "ListPodSandbox":
                    await side.rt.list_pod_sandbox(cri.ListPodSandboxRequest())
                else:
                    method = f"/runtime.v1.RuntimeService/{what.split()[0]}"
                    await UnaryUnaryMethod(side.chan(), method, Raw, Raw)(Raw(), timeout=CALL_TIMEOUT)
                side.record(name, time.perf_counter() - t0)
        for side in sides:
            side.cpu_ms[name] = (side.daemon.cpu_seconds() - cpu0[side.name]) * 1000 / calls


async def betterproto_cost(sides: list[Side], rounds: int = 10) -> dict[str, Any]:
    """In this process: betterproto encode and parse of each side's unfiltered List answers, and their size.

    The same library code berthd runs to encode its answer, on the same
    message: set against berthd's CPU per call, it says how much of that is
    protobuf encoding.
    """
    out: dict[str, Any] = {}
    for side in sides:
        answers: list[tuple[str, int, betterproto.Message]] = []
        containers = await side.rt.list_containers(cri.ListContainersRequest())
        answers.append(("ListContainers", len(containers.containers), containers))
        pods = await side.rt.list_pod_sandbox(cri.ListPodSandboxRequest())
        answers.append(("ListPodSandbox", len(pods.items), pods))
        for what, n, resp in answers:
            raw = bytes(resp)
            enc, dec = [], []
            for _ in range(rounds):
                t0 = time.perf_counter()
                bytes(resp)
                t1 = time.perf_counter()
                type(resp)().parse(raw)
                t2 = time.perf_counter()
                enc.append((t1 - t0) * 1000)
                dec.append((t2 - t1) * 1000)
            out[f"{side.name} {what}"] = {
                "items": n,
                "bytes": len(raw),
                "encode_ms": statistics.median(enc),
                "parse_ms": statistics.median(dec),
            }
    return out


async def sequential_stop(sides: list[Side], first: list[Pod]) -> None:
    by_side = {s.name: [p for p in first if p in s.pods] for s in sides}
    n = max(len(v) for v in by_side.values())
    for i in range(n):
        for side in turns(sides, i):
            if i < len(by_side[side.name]):
                await stop_remove(side, side.rt, by_side[side.name][i], timed=True)


async def session(sides: list[Side], base: Path, args: argparse.Namespace) -> dict[str, Any]:
    """:func:`measure`, then every pod removed through CRI, even when it failed, in the same event loop."""
    try:
        return await measure(sides, base, args)
    finally:
        await cri_cleanup(sides)


async def measure(sides: list[Side], base: Path, args: argparse.Namespace) -> dict[str, Any]:
    for side in sides:
        side.version = await wait_ready(side.daemon)
    image, pause = await asyncio.to_thread(archives, base)
    for side in sides:
        await asyncio.to_thread(ctr_import, side.daemon, image)
    await asyncio.to_thread(ctr_import, sides[1].daemon, pause)
    for side in sides:
        await wait_cri_ready(side)
        await wait_image(side, IMAGE)
    await wait_image(sides[1], PAUSE_IMAGE)
    for side in sides:
        side.memory.append(measure_memory(side))
    # one warm-up pod each (first-use costs: image lookups, CNI cache), not timed
    for side in sides:
        await stop_remove(side, side.rt, await run_pod(side, side.rt, "warm-up", timed=False), timed=False)

    first = await sequential_start(sides, args.pods)
    for side in sides:
        side.memory.append(measure_memory(side))
    await concurrent_start(sides, args.pods)
    for side in sides:
        side.memory.append(measure_memory(side))

    low = 2 * args.pods
    await list_latency(sides, args.list_calls, f"{low} containers")
    high = args.containers
    if high > low:
        for side in sides:
            await fill_containers(side, [p for p in side.pods if p not in first], high)
        await list_latency(sides, args.list_calls, f"{high} containers")
    proto = await betterproto_cost(sides)

    await sequential_stop(sides, first)
    for side in sides:
        await remove_all(side)
    return {"betterproto": proto, "list_sizes": [low, high] if high > low else [low]}


async def remove_all(side: Side) -> None:
    """Stop and remove every pod of ``side`` (what CRI lists, not only what we recorded), 4 at a time."""
    listed = (await side.rt.list_pod_sandbox(cri.ListPodSandboxRequest())).items

    def call(sid: str) -> Callable[[cri.RuntimeServiceStub], Awaitable[None]]:
        async def one(rt: cri.RuntimeServiceStub) -> None:
            await rt.stop_pod_sandbox(cri.StopPodSandboxRequest(pod_sandbox_id=sid))
            await rt.remove_pod_sandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=sid))

        return one

    await in_workers([call(p.id) for p in listed], side)
    side.pods.clear()


# -- cleanup -------------------------------------------------------------------------------------------------


async def cri_cleanup(sides: list[Side]) -> None:
    for side in sides:
        if side.daemon.exited() is None:
            try:
                await asyncio.wait_for(remove_all(side), 300)
            except Exception as exc:  # noqa: BLE001 - the processes and mounts are cleaned up below
                print(f"{side.name}: removing the pods through CRI failed: {exc!r}", file=sys.stderr)
        if side.channel is not None:
            side.channel.close()
            side.channel = None


def _cgroup_dirs(parent: str) -> list[Path]:
    """Every directory of the pod cgroup parent in every v1 hierarchy and in the unified one."""
    root = Path("/sys/fs/cgroup")
    out = []
    for hierarchy in root.iterdir():
        top = hierarchy / parent.lstrip("/")
        if top.is_dir():
            out += sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True)
            out.append(top)
    return out


def host_cleanup(sides: list[Side]) -> None:
    """After the daemons stopped: kill leftover shims and container processes by PID; cgroups, bridges."""
    for side in sides:
        for pid in helper_pids(side.dir, set()):
            print(f"{side.name}: killing leftover process {pid}", file=sys.stderr)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        dirs = _cgroup_dirs(side.cgroup_parent)
        for d in dirs:
            with contextlib.suppress(OSError):
                for line in (d / "cgroup.procs").read_text().split():
                    print(f"{side.name}: killing leftover container process {line}", file=sys.stderr)
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(int(line), signal.SIGKILL)
        deadline = time.monotonic() + 10
        for d in dirs:
            while d.exists():
                try:
                    d.rmdir()
                except OSError:
                    if time.monotonic() > deadline:
                        print(f"{side.name}: could not remove cgroup {d}", file=sys.stderr)
                        break
                    time.sleep(0.05)
        subprocess.run(["ip", "link", "del", side.bridge], capture_output=True, timeout=30)


# -- figures -------------------------------------------------------------------------------------------------


def metrics_of(b: Side, c: Side, list_sizes: list[int]) -> list[Metric]:
    def lat(what: str, unit: str = "ms") -> Metric:
        return Metric(what, unit, distribution(b.lat_ms.get(what, [])), distribution(c.lat_ms.get(what, [])))

    def one(x: float) -> Figure:
        return Figure(x, None, 1)

    out = [
        lat(k)
        for k in (
            "RunPodSandbox",
            "CreateContainer",
            "StartContainer",
            "CreateContainer+StartContainer",
            "runp+create+start",
            "StopPodSandbox",
            "RemovePodSandbox",
            "StopPodSandbox+RemovePodSandbox",
        )
    ]
    out.append(Metric(f"pods per second, {CLIENTS} clients", "pods/s", one(b.pods_per_s), one(c.pods_per_s)))
    for size in list_sizes:
        for what in ("ListContainers", "ListPodSandbox"):
            key = f"{what} {size} containers"
            raw = f"{what} unparsed {size} containers"
            out.append(lat(key))
            out.append(lat(raw))
            out.append(Metric(f"{key}, daemon CPU", "ms/call", one(b.cpu_ms[key]), one(c.cpu_ms[key])))
    for mb, mc in zip(b.memory, c.memory, strict=True):
        n = mb.pods
        out += [
            Metric(
                f"daemon RSS, {n} pods", "MiB", one(mb.daemon_rss_kib / 1024), one(mc.daemon_rss_kib / 1024)
            ),
            Metric(
                f"daemon+shims RSS, {n} pods",
                "MiB",
                one((mb.daemon_rss_kib + mb.shims_rss_kib) / 1024),
                one((mc.daemon_rss_kib + mc.shims_rss_kib) / 1024),
            ),
            Metric(
                f"daemon+shims PSS, {n} pods",
                "MiB",
                one((mb.daemon_pss_kib + mb.shims_pss_kib) / 1024),
                one((mc.daemon_pss_kib + mc.shims_pss_kib) / 1024),
            ),
            Metric(f"shim processes, {n} pods", "n", one(mb.shims), one(mc.shims)),
        ]
    return out


def goals(b: Side, c: Side, list_sizes: list[int], pods: int) -> list[str]:
    def med(side: Side, key: str) -> float:
        return statistics.median(side.lat_ms[key])

    start = med(b, "runp+create+start") / med(c, "runp+create+start")
    lines = [f"pod start (runp+create+start median) <= 0.8x containerd: {start:.2f}x, "]
    lines[0] += "met" if start <= 0.8 else "missed"
    top = list_sizes[-1]
    for what in ("ListContainers", "ListPodSandbox"):
        r = med(b, f"{what} {top} containers") / med(c, f"{what} {top} containers")
        lines.append(
            f"{what} at {top} containers no slower than containerd: {r:.2f}x, {'met' if r <= 1 else 'missed'}"
        )
    mb = next(m for m in b.memory if m.pods == pods)
    mc = next(m for m in c.memory if m.pods == pods)
    for what, xb, xc in (
        ("daemon RSS", mb.daemon_rss_kib, mc.daemon_rss_kib),
        ("daemon+shims RSS", mb.daemon_rss_kib + mb.shims_rss_kib, mc.daemon_rss_kib + mc.shims_rss_kib),
        ("daemon+shims PSS", mb.daemon_pss_kib + mb.shims_pss_kib, mc.daemon_pss_kib + mc.shims_pss_kib),
    ):
        r = xb / xc
        lines.append(f"{what} at {pods} pods <= containerd's: {r:.2f}x, {'met' if r <= 1 else 'missed'}")
    return lines


# -- main ----------------------------------------------------------------------------------------------------


def make_sides(base: Path) -> list[Side]:
    tag = secrets.token_hex(3)
    third = secrets.randbelow(60) * 4  # two /22s inside 10.246.0.0/16
    sides = []
    for name, letter, subnet in (
        ("berth", "b", f"10.246.{third}.0/22"),
        ("containerd", "c", f"10.246.{third + 4 if third < 236 else 0}.0/22"),
    ):
        side_dir = base / letter
        bridge = f"bb{letter}{tag}"
        parent = f"/bench-cri-{tag}-{letter}"
        if name == "berth":
            net = write_network(base / "bnet", bridge, subnet)
            daemon = berthd_daemon(side_dir, config=berth_config(net), by="bench/cri.py")
        else:
            net = write_network(base / "cnet", bridge, subnet)
            daemon = containerd_daemon(
                side_dir, config=containerd_cri_config(side_dir, net), by="bench/cri.py", cri=True
            )
        sides.append(Side(name, daemon, side_dir, bridge, subnet, parent))
    return sides


R = TypeVar("R")


def run_on_sides(
    base: Path, session: Callable[[list[Side]], Coroutine[Any, Any, R]]
) -> tuple[list[Side], R | None, int]:
    """Start both sides' daemons under ``base``, run ``session`` on them, and always clean up.

    Returns the sides, the session's result (None when it failed) and the exit code
    to return then; Ctrl-C and SIGTERM end the run with the cleanup done.
    """
    sides: list[Side] = []
    failed = True
    with terminate_as_interrupt():
        try:
            sides = make_sides(base)
            for s in sides:
                s.daemon.start()
            result = asyncio.run(session(sides))
            failed = False
            return sides, result, 0
        except KeyboardInterrupt as exc:
            print("interrupted; cleaning up", file=sys.stderr)
            return sides, None, exit_status(exc)
        except BenchError as exc:
            print(f"bench failed: {exc}", file=sys.stderr)
            return sides, None, 1
        except GRPCError as exc:
            print(f"bench failed: a call answered {exc.status.name}: {exc.message}", file=sys.stderr)
            return sides, None, 1
        finally:
            stop_all([s.daemon for s in sides], show_logs=failed)
            host_cleanup(sides)
            remove_base(base)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.cri", description=__doc__.split("\n\n")[0] if __doc__ else "")
    p.add_argument("--pods", type=int, help="pods started one by one, and again 4 at a time (50)")
    p.add_argument("--containers", type=int, help="containers held for the big List (500)")
    p.add_argument("--list-calls", type=int, help="calls of each List per daemon and size (30)")
    p.add_argument("--quick", action="store_true", help="defaults of 10 pods, 100 containers, 10 List calls")
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    args = p.parse_args(argv)
    for key, full, quick in (("pods", 50, 10), ("containers", 500, 100), ("list_calls", 30, 10)):
        if getattr(args, key) is None:
            setattr(args, key, quick if args.quick else full)
    if min(args.pods, args.list_calls) < 1:
        p.error("--pods and --list-calls must be at least 1")
    if 2 * args.pods > 1000:
        p.error("--pods: at most 500 (each side's pod network is a /22)")
    if not require_containerd():
        return 1
    if os.geteuid() != 0 or not (CNI_BIN / "bridge").exists():
        print(f"bench.cri needs root and Debian's containernetworking-plugins in {CNI_BIN}", file=sys.stderr)
        return 1

    quiet_logs()
    info: dict[str, Any] = {"machine": machine(), **vars(args)}
    base = make_base()
    started = time.monotonic()
    sides, extra, code = run_on_sides(base, lambda sides: session(sides, base, args))
    if extra is None:
        return code

    b, c = sides
    metrics = metrics_of(b, c, extra["list_sizes"])
    info["elapsed_s"] = round(time.monotonic() - started, 1)
    info["machine"]["loadavg_end"] = os.getloadavg()
    if args.json:
        out = {
            **info,
            "versions": {s.name: s.version for s in sides},
            "metrics": [{**dataclasses.asdict(m), "ratio": m.ratio} for m in metrics],
            "betterproto": extra["betterproto"],
            "goals": goals(b, c, extra["list_sizes"], args.pods),
        }
        print(json.dumps(rounded(out), indent=2))
        return 0
    print(
        f"berth {b.version} vs containerd {c.version}; CRI through one betterproto client; {args.pods} pods "
        f"one by one and {args.pods} with {CLIENTS} clients, one `sleep` container each; List with "
        f"{' and '.join(map(str, extra['list_sizes']))} containers (beyond {2 * args.pods}: created, not "
        f"started); {args.list_calls} List calls; {info['elapsed_s']}s; load "
        f"{info['machine']['loadavg'][0]:.1f} -> {info['machine']['loadavg_end'][0]:.1f}"
    )
    print(format_table(metrics))
    for name, bp in extra["betterproto"].items():
        print(
            f"betterproto in the client, {name} answer ({bp['items']} items, "
            f"{bp['bytes']:,} bytes): encode {bp['encode_ms']:.1f} ms, parse {bp['parse_ms']:.1f} ms"
        )
    for line in goals(b, c, extra["list_sizes"], args.pods):
        print("goal: " + line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
