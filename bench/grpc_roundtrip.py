"""gRPC round trips against berthd and Debian's containerd, side by side, from one Python client.

    .venv/bin/python -m bench.grpc_roundtrip [--calls N] [--budget S] [--json]
    .venv/bin/python bench/grpc_roundtrip.py [...]

One run starts both daemons on private temporary roots (never the system's
/run/containerd or /var/lib/containerd), measures the same operations against
each with the same client (grpclib and the betterproto stubs of ``protos/``),
prints a table and stops both daemons by PID. containerd is the yardstick:
figures only mean something as a ratio measured in the same run, on the same
machine, at the same moment.

What is measured, per daemon:

* unary ``Version`` latency, ``Namespaces.List`` latency and the latency of a
  ``Namespaces.Create`` + ``Namespaces.Delete`` pair (two durable writes:
  SQLite WAL for berth, bbolt for containerd), each N sequential calls after a
  warm-up;
* ``Version`` with 32 concurrent callers on one channel: per-call latency and
  calls per second;
* daemon CPU time per operation (utime+stime from /proc, all threads), which
  the client's own speed does not cap, and the daemons' RSS when idle after
  start and after the run.

Phases are split into rounds that alternate which daemon goes first, so a
drift of the machine (frequency, a noisy neighbour) falls on both. Every loop
is bounded by a count and by a time budget; a phase cut short by its budget is
flagged in the output.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import itertools
import json
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import betterproto.lib.google.protobuf as pb

from bench.daemons import (
    NAMESPACE_HEADER,
    BenchError,
    Daemon,
    berthd_daemon,
    channel_for,
    containerd_daemon,
    exit_status,
    machine,
    make_base,
    remove_base,
    require_containerd,
    stop_all,
    terminate_as_interrupt,
    wait_ready,
)
from bench.report import Figure, Metric, distribution, format_table, print_budget_note, rounded
from protos.containerd.services.namespaces.v1 import (
    CreateNamespaceRequest,
    DeleteNamespaceRequest,
    ListNamespacesRequest,
    Namespace,
    NamespacesStub,
)
from protos.containerd.services.version.v1 import VersionStub

CALL_TIMEOUT = 10.0
ROUNDS = 4  # rounds per phase; the daemon that goes first alternates
CONCURRENCY = 32
LIST_FIXTURES = 8  # namespaces present during Namespaces.List, the same on both daemons


# -- the client side -----------------------------------------------------------------------------------------


class Target:
    """The same client calls, bound to one daemon's channel."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.channel = channel_for(daemon)
        md = {NAMESPACE_HEADER: "default"}
        self._version: Any = VersionStub(self.channel, timeout=CALL_TIMEOUT, metadata=md)
        self._ns: Any = NamespacesStub(self.channel, timeout=CALL_TIMEOUT, metadata=md)
        self._seq = itertools.count()

    async def version(self) -> None:
        await self._version.version(pb.Empty())

    async def list_namespaces(self) -> None:
        await self._ns.list(ListNamespacesRequest())

    async def create_delete(self) -> None:
        name = f"bench-{next(self._seq)}"
        await self._ns.create(CreateNamespaceRequest(namespace=Namespace(name=name, labels={"bench": "1"})))
        await self._ns.delete(DeleteNamespaceRequest(name=name))

    async def create_fixtures(self) -> None:
        """The same few namespaces on both daemons, so List returns equal answers."""
        for i in range(LIST_FIXTURES):
            ns = Namespace(name=f"fixture-{i}", labels={"bench": "fixture", "index": str(i)})
            await self._ns.create(CreateNamespaceRequest(namespace=ns))


@dataclass(frozen=True)
class Phase:
    key: str
    title: str
    op: Callable[[Target], Callable[[], Awaitable[None]]]
    count: int
    workers: int = 1


@dataclass
class Run:
    """What one daemon did in one phase, all rounds together."""

    latencies_ns: list[int] = field(default_factory=list)
    wall_s: float = 0.0
    daemon_cpu_s: float = 0.0
    client_cpu_s: float = 0.0
    cut_by_budget: bool = False

    @property
    def calls(self) -> int:
        return len(self.latencies_ns)


async def drive(call: Callable[[], Awaitable[None]], count: int, workers: int, budget_s: float) -> list[int]:
    """``count`` calls by ``workers`` concurrent callers, stopping early at ``budget_s``; latencies in ns."""
    deadline = time.monotonic() + budget_s
    remaining = count
    latencies: list[int] = []

    async def caller() -> None:
        nonlocal remaining
        while remaining > 0 and time.monotonic() < deadline:
            remaining -= 1
            t0 = time.perf_counter_ns()
            await call()
            latencies.append(time.perf_counter_ns() - t0)

    await asyncio.gather(*(caller() for _ in range(workers)))
    return latencies


async def run_phase(phase: Phase, targets: list[Target], budget_s: float, warmup_s: float) -> dict[str, Run]:
    """Warm up each daemon, then ``ROUNDS`` rounds alternating which daemon goes first."""
    runs = {t.daemon.name: Run() for t in targets}
    warmup = max(10, phase.count // 20)
    for t in targets:
        await drive(phase.op(t), warmup, phase.workers, warmup_s)
    per_round = [phase.count // ROUNDS + (1 if r < phase.count % ROUNDS else 0) for r in range(ROUNDS)]
    for r, count in enumerate(per_round):
        for t in targets if r % 2 == 0 else targets[::-1]:
            run = runs[t.daemon.name]
            gc.collect()
            cpu0, own0, t0 = t.daemon.cpu_seconds(), time.process_time(), time.perf_counter()
            lat = await drive(phase.op(t), count, phase.workers, budget_s / ROUNDS)
            run.wall_s += time.perf_counter() - t0
            run.client_cpu_s += time.process_time() - own0
            run.daemon_cpu_s += t.daemon.cpu_seconds() - cpu0
            run.latencies_ns += lat
            run.cut_by_budget |= len(lat) < count
    return runs


# -- figures -------------------------------------------------------------------------------------------------


def latency_figure(run: Run, per_call_divisor: int = 1) -> Figure:
    return distribution([ns / 1000 / per_call_divisor for ns in run.latencies_ns], run.cut_by_budget)


def cpu_figure(run: Run, ops_per_call: int, client: bool = False) -> Figure:
    ops = run.calls * ops_per_call
    seconds = run.client_cpu_s if client else run.daemon_cpu_s
    return Figure(seconds / ops * 1e6 if ops else float("nan"), None, ops, run.cut_by_budget)


def throughput_figure(run: Run) -> Figure:
    return Figure(run.calls / run.wall_s if run.wall_s else float("nan"), None, run.calls, run.cut_by_budget)


# -- the run -------------------------------------------------------------------------------------------------


def phases(calls: int) -> list[Phase]:
    """Write pairs are a quarter of the count (two fsyncing transactions each); x32 is four times it."""
    return [
        Phase("version", "Version", lambda t: t.version, calls),
        Phase("list", "Namespaces.List", lambda t: t.list_namespaces, calls),
        Phase(
            "create_delete",
            "Namespaces Create+Delete pair",
            lambda t: t.create_delete,
            max(ROUNDS, calls // 4),
        ),
        Phase(
            "version_x32", f"Version x{CONCURRENCY} concurrent", lambda t: t.version, calls * 4, CONCURRENCY
        ),
    ]


async def measure(daemons: list[Daemon], calls: int, budget_s: float, info: dict[str, Any]) -> list[Metric]:
    versions = await asyncio.gather(*(wait_ready(d) for d in daemons))
    info["servers"] = {
        d.name: {"version": v, "pid": d.pid, "rss_idle_kib": d.rss_kib()}
        for d, v in zip(daemons, versions, strict=True)
    }
    info["runs"] = {}
    targets = [Target(d) for d in daemons]
    try:
        for t in targets:
            await t.create_fixtures()
        metrics: list[Metric] = []
        for phase in phases(calls):
            print(f"  {phase.title}: {phase.count} calls per daemon ...", file=sys.stderr)
            runs = await run_phase(phase, targets, budget_s, warmup_s=min(2.0, budget_s / 4))
            info["runs"][phase.key] = {
                name: {
                    "calls": r.calls,
                    "wall_s": round(r.wall_s, 4),
                    "daemon_cpu_s": round(r.daemon_cpu_s, 3),
                    "client_cpu_s": round(r.client_cpu_s, 3),
                    "cut_by_budget": r.cut_by_budget,
                }
                for name, r in runs.items()
            }
            b, c = runs["berth"], runs["containerd"]
            if phase.key == "version_x32":
                metrics.append(Metric(f"{phase.title} latency", "us", latency_figure(b), latency_figure(c)))
                metrics.append(
                    Metric(f"{phase.title} throughput", "calls/s", throughput_figure(b), throughput_figure(c))
                )
            else:
                metrics.append(Metric(f"{phase.title} latency", "us", latency_figure(b), latency_figure(c)))
            ops = 2 if phase.key == "create_delete" else 1
            unit = "us/call" if ops == 1 else "us/RPC"
            metrics.append(Metric(f"{phase.title} daemon CPU", unit, cpu_figure(b, ops), cpu_figure(c, ops)))
            if phase.key == "version_x32":
                # The client's own cost per call: when it is close to wall time per call, the client is
                # the bottleneck and the throughput ratio understates the daemons' difference.
                metrics.append(
                    Metric(
                        f"{phase.title} client CPU",
                        unit,
                        cpu_figure(b, ops, client=True),
                        cpu_figure(c, ops, client=True),
                    )
                )
        return metrics
    finally:
        for t in targets:
            t.channel.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="bench.grpc_roundtrip", description=__doc__.split("\n\n")[0] if __doc__ else ""
    )
    p.add_argument(
        "--calls", type=int, default=2000, help="sequential calls per daemon per phase (default 2000)"
    )
    p.add_argument(
        "--budget", type=float, default=6.0, help="seconds allowed per daemon per phase (default 6); a cap"
    )
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    args = p.parse_args(argv)
    if args.calls < ROUNDS * 2:
        p.error(f"--calls must be at least {ROUNDS * 2}")
    if not require_containerd():
        return 1

    info: dict[str, Any] = {"machine": machine(), "calls": args.calls, "budget_s": args.budget}
    base = make_base()
    by = "bench/grpc_roundtrip.py: embedded defaults only"
    daemons = [berthd_daemon(base / "b", by=by), containerd_daemon(base / "c", by=by)]
    started = time.monotonic()
    failed = True
    with terminate_as_interrupt():
        try:
            for d in daemons:
                d.start()
            metrics = asyncio.run(measure(daemons, args.calls, args.budget, info))
            for d in daemons:
                d.check_alive()
            idle = {d.name: info["servers"][d.name]["rss_idle_kib"] / 1024 for d in daemons}
            after = {d.name: d.rss_kib() / 1024 for d in daemons}
            metrics.append(
                Metric("RSS idle after start", "MiB", Figure(idle["berth"]), Figure(idle["containerd"]))
            )
            metrics.append(
                Metric("RSS after run", "MiB", Figure(after["berth"]), Figure(after["containerd"]))
            )
            failed = False
        except KeyboardInterrupt as exc:
            failed = False  # not the daemons' fault: no logs
            print("interrupted; stopping the daemons", file=sys.stderr)
            return exit_status(exc)
        except BenchError as exc:
            print(f"bench failed: {exc}", file=sys.stderr)
            return 1
        finally:
            stop_all(daemons, show_logs=failed)
            remove_base(base)

    info["elapsed_s"] = round(time.monotonic() - started, 1)
    if args.json:
        out = {**info, "metrics": [rounded({**asdict(m), "ratio": m.ratio}) for m in metrics]}
        print(json.dumps(out, indent=2))
        return 0
    servers = info["servers"]
    print(
        f"berth {servers['berth']['version']} vs containerd {servers['containerd']['version']}; "
        f"--calls {args.calls}, one grpclib client, {info['elapsed_s']}s"
    )
    print(format_table(metrics))
    print("ratio: berth's figure over containerd's (median for latency); above 1 means berth is higher.")
    print_budget_note(metrics, args.budget)
    return 0


if __name__ == "__main__":
    sys.exit(main())
