"""CRI streaming through real containers: berth's streaming server against containerd 1.6's, in one run.

    .venv/bin/python -m bench.streaming [--execs N] [--mb N] [--json]

berthd and a private containerd with its CRI plugin start side by side
(the setup of ``bench/cri.py``: own roots, CNI bridges, pod cgroup parents,
the same busybox in ``k8s.io``, containerd's local pause image). Each gets
one pod (pod network) with one container that writes a ``--mb`` file and
serves it with busybox ``httpd`` on :data:`PORT` inside the pod. Then,
through the project's own client (``daemon.streaming.client``: SPDY/3.1,
``v4.channel.k8s.io`` first, which containerd's kubelet-derived server also
accepts, and ``portforward.k8s.io``), the daemons taking turns:

* ``exec echo hi``: CRI Exec call -> SPDY upgrade -> streams -> output ->
  v4 exit status, ``--execs`` times each: median and p99;
* ``--mb`` MB through exec stdout (``head -c N /dev/zero``), MB/s;
* ``--mb`` MB through port-forward (an HTTP GET of the file), MB/s.

The best of :data:`ROUNDS` rounds is kept for each throughput. Every pod is
removed through CRI afterwards; the daemons are stopped and leftovers
cleaned up as ``bench/cri.py`` does, whatever happened.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import re
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from bench.cri import (
    CNI_BIN,
    IMAGE,
    PAUSE_IMAGE,
    Side,
    archives,
    container_config,
    cri_cleanup,
    ctr_import,
    pod_config,
    run_on_sides,
    turns,
    wait_cri_ready,
    wait_image,
)
from bench.daemons import (
    BenchError,
    machine,
    make_base,
    quiet_logs,
    require_containerd,
    wait_ready,
)
from bench.report import Figure, Metric, distribution, format_table, rounded
from daemon.errors import BerthError
from daemon.streaming import client
from daemon.streaming.errors import SessionClosedError, StreamResetError
from protos.runtime import v1 as cri

PORT = 8080
ROUNDS = 2
READY_TIMEOUT = 60.0


@dataclasses.dataclass
class Target:
    side: Side
    pod_id: str = ""
    container_id: str = ""
    echo_ms: list[float] = dataclasses.field(default_factory=list)
    exec_mb_s: float = float("nan")
    portforward_mb_s: float = float("nan")
    errors: list[str] = dataclasses.field(default_factory=list)

    async def attempt(self, what: str, run: Callable[[], Awaitable[float]]) -> float:
        """``run()``'s figure, or NaN with the failure kept in :attr:`errors` (the run goes on)."""
        try:
            return await run()
        except (BenchError, BerthError, StreamResetError, SessionClosedError) as exc:
            self.errors.append(f"{what}: {exc}")
            return float("nan")


async def start_server(t: Target, size: int) -> None:
    """A pod whose container writes ``size`` bytes to /tmp/w/big and serves it on :data:`PORT`."""
    side = t.side
    config = pod_config(side, "stream")
    Path(config.log_directory).mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - one mkdir
    t.pod_id = (await side.rt.run_pod_sandbox(cri.RunPodSandboxRequest(config=config))).pod_sandbox_id
    cc = container_config("srv")
    cc.command = [
        "sh",
        "-c",
        f"mkdir -p /tmp/w && head -c {size} /dev/zero > /tmp/w/big && touch /tmp/ready "
        f"&& exec httpd -f -p {PORT} -h /tmp/w",
    ]
    req = cri.CreateContainerRequest(pod_sandbox_id=t.pod_id, config=cc, sandbox_config=config)
    t.container_id = (await side.rt.create_container(req)).container_id
    await side.rt.start_container(cri.StartContainerRequest(container_id=t.container_id))
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        probe = await side.rt.exec_sync(
            cri.ExecSyncRequest(container_id=t.container_id, cmd=["test", "-e", "/tmp/ready"], timeout=10)
        )
        if probe.exit_code == 0:
            return
        if time.monotonic() > deadline:
            raise BenchError(f"{side.name}: the pod's server is not ready after {READY_TIMEOUT}s")
        await asyncio.sleep(0.1)


async def exec_echo(t: Target) -> float:
    start = time.perf_counter()
    req = cri.ExecRequest(container_id=t.container_id, cmd=["echo", "hi"], stdout=True, stderr=True)
    url = (await t.side.rt.exec(req)).url
    result = await client.run_command(url)
    elapsed_ms = (time.perf_counter() - start) * 1000
    if result.stdout != b"hi\n" or result.exit_code != 0:
        raise BenchError(f"{t.side.name}: exec echo hi gave {result.stdout!r}, status {result.status}")
    t.echo_ms.append(elapsed_ms)
    return elapsed_ms


async def exec_stdout(t: Target, size: int) -> float:
    """MB/s of ``size`` bytes of ``head -c`` through exec stdout (Exec call and status included)."""
    start = time.perf_counter()
    cmd = ["head", "-c", str(size), "/dev/zero"]
    url = (await t.side.rt.exec(cri.ExecRequest(container_id=t.container_id, cmd=cmd, stdout=True))).url
    got = 0
    async with await client.connect_command(url, stdout=True, stderr=False) as rc:
        while chunk := await rc.read_stdout():
            got += len(chunk)
        status = await rc.wait()
    elapsed = time.perf_counter() - start
    if got != size or status.exit_code != 0:
        raise BenchError(f"{t.side.name}: exec stdout carried {got} of {size} bytes, status {status}")
    return size / (1 << 20) / elapsed


async def portforward(t: Target, size: int) -> float:
    """MB/s of an HTTP GET of the ``size``-byte file through port-forward (PortForward call included)."""
    deadline = time.monotonic() + READY_TIMEOUT
    start = time.perf_counter()
    req = cri.PortForwardRequest(pod_sandbox_id=t.pod_id, port=[PORT])
    url = (await t.side.rt.port_forward(req)).url
    async with await client.connect_portforward(url) as pf:
        while True:  # httpd may not accept yet: a new stream pair on the same connection
            conn = await pf.open(PORT)
            await conn.write(b"GET /big HTTP/1.0\r\n\r\n")
            got = 0
            head = b""
            while chunk := await conn.read():
                if len(head) < 256:
                    head += chunk[:256]
                got += len(chunk)
            if got or time.monotonic() > deadline:
                break
            start = time.perf_counter()
    elapsed = time.perf_counter() - start
    if not re.match(rb"HTTP/1\.[01] 200", head) or got < size:
        raise BenchError(f"{t.side.name}: port-forward carried {got} bytes ({head[:40]!r}), wanted {size}+")
    return size / (1 << 20) / elapsed


async def measure(sides: list[Side], base: Path, args: argparse.Namespace) -> list[Target]:
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
    size = args.mb << 20
    targets = {s.name: Target(s) for s in sides}
    for t in targets.values():
        await start_server(t, size)
    for t in targets.values():  # warm-up: first connection, first exec in the container
        await t.attempt("exec echo hi", lambda t=t: exec_echo(t))  # type: ignore[misc]
        t.echo_ms.clear()
    for i in range(args.execs):
        for side in turns(sides, i):
            t = targets[side.name]
            await t.attempt("exec echo hi", lambda t=t: exec_echo(t))  # type: ignore[misc]
    for r in range(ROUNDS):
        for side in turns(sides, r):
            t = targets[side.name]
            got = await t.attempt("exec stdout", lambda t=t: exec_stdout(t, size))  # type: ignore[misc]
            t.exec_mb_s = max(t.exec_mb_s, got) if t.exec_mb_s == t.exec_mb_s else got
            got = await t.attempt("port-forward", lambda t=t: portforward(t, size))  # type: ignore[misc]
            t.portforward_mb_s = (
                max(t.portforward_mb_s, got) if t.portforward_mb_s == t.portforward_mb_s else got
            )
    return [targets[s.name] for s in sides]


async def session(sides: list[Side], base: Path, args: argparse.Namespace) -> list[Target]:
    try:
        return await measure(sides, base, args)
    finally:
        await cri_cleanup(sides)


def metrics_of(b: Target, c: Target, mb: int) -> list[Metric]:
    def one(x: float) -> Figure:
        return Figure(x, None, 1)

    return [
        Metric("exec echo hi round trip (SPDY)", "ms", distribution(b.echo_ms), distribution(c.echo_ms)),
        Metric(f"exec stdout, {mb} MB", "MB/s", one(b.exec_mb_s), one(c.exec_mb_s)),
        Metric(f"port-forward, {mb} MB", "MB/s", one(b.portforward_mb_s), one(c.portforward_mb_s)),
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="bench.streaming", description=__doc__.split("\n\n")[0] if __doc__ else ""
    )
    p.add_argument("--execs", type=int, default=200, help="exec echo hi round trips per daemon (200)")
    p.add_argument("--mb", type=int, default=100, help="MB through exec stdout and port-forward (100)")
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    args = p.parse_args(argv)
    if args.execs < 1 or args.mb < 1:
        p.error("--execs and --mb must be at least 1")
    if not require_containerd():
        return 1
    if os.geteuid() != 0 or not (CNI_BIN / "bridge").exists():
        print(f"bench.streaming needs root and containernetworking-plugins in {CNI_BIN}", file=sys.stderr)
        return 1
    quiet_logs()
    info: dict[str, Any] = {"machine": machine(), **vars(args)}
    base = make_base()
    started = time.monotonic()
    sides, targets, code = run_on_sides(base, lambda sides: session(sides, base, args))
    if targets is None:
        return code
    b, c = targets
    metrics = metrics_of(b, c, args.mb)
    info["elapsed_s"] = round(time.monotonic() - started, 1)
    info["machine"]["loadavg_end"] = os.getloadavg()
    if args.json:
        out = {
            **info,
            "versions": {s.name: s.version for s in sides},
            "metrics": [{**dataclasses.asdict(m), "ratio": m.ratio} for m in metrics],
            "errors": {t.side.name: t.errors for t in (b, c)},
        }
        print(json.dumps(rounded(out), indent=2))
        return 0
    print(
        f"berth {sides[0].version} vs containerd {sides[1].version}; CRI streaming through the project's "
        f"SPDY client into a pod-network busybox container; {args.execs} execs each, {args.mb} MB streams "
        f"(best of {ROUNDS}); {info['elapsed_s']}s; load {info['machine']['loadavg'][0]:.1f} -> "
        f"{info['machine']['loadavg_end'][0]:.1f}"
    )
    print(format_table(metrics))
    for t in (b, c):
        for error in sorted(set(t.errors)):
            print(f"{t.side.name}: {t.errors.count(error)} x failed: {error}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
