"""overlayfs snapshots through the Snapshots gRPC service: berthd against Debian's containerd.

    .venv/bin/python -m bench.snapshots [--chains N] [--mounts N] [--budget S] [--json]

Both daemons run side by side on temporary roots; one client (grpclib and
the betterproto ``SnapshotsStub`` of ``protos/``) calls the same operations
on each, in namespace ``bench``, on the ``overlayfs`` snapshotter:

* **Prepare + Commit**: ``--chains`` chains of :data:`DEPTH` empty snapshots
  each, every one prepared on the one committed before and committed at
  once. Each pair is timed (and each call in it), and the daemons' CPU per
  pair is read from /proc. The chain grows by :data:`SLICE` pairs per turn,
  the daemon that goes first alternating between turns. Figures are given
  over all pairs and for the first and last quarter of the depth (a prepare
  returns one lowerdir per parent).
* **128-layer chain mount**: ``--mounts`` times per daemon (alternating), an
  active snapshot is prepared on top of the first chain (128 parents) and
  its mounts are mounted for real with :func:`daemon.mount.mount_all`
  (lowerdirs compacted to fit a page, as containerd does); the overlay must
  list 128 lowerdirs. Then it is unmounted and removed (timed too).

Snapshots carry ``containerd.io/gc.root`` so that neither daemon's garbage
collector (which removals trigger) takes the chains away mid-run. Every
loop is bounded by its count and by ``--budget`` seconds per daemon per
phase; whatever is still mounted under the run's directory is unmounted in
``finally``, before the daemons stop.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from grpclib.client import Channel
from grpclib.exceptions import GRPCError

from bench.daemons import (
    NAMESPACE_HEADER,
    BenchError,
    Daemon,
    berthd_daemon,
    channel_for,
    containerd_daemon,
    ensure_namespace,
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
from bench.report import Figure, Metric, distribution, format_table, print_budget_note, rounded
from daemon.mount import mount_all, mount_points_under, release
from daemon.protocols import Mount
from protos.containerd.services.snapshots.v1 import (
    CommitSnapshotRequest,
    PrepareSnapshotRequest,
    RemoveSnapshotRequest,
    SnapshotsStub,
)

NAMESPACE = "bench"
SNAPSHOTTER = "overlayfs"
DEPTH = 128
SLICE = 32  # pairs per daemon per turn while building a chain
CALL_TIMEOUT = 30.0
LABELS = {"containerd.io/gc.root": "bench", "bench": "snapshots"}


@dataclass
class Pair:
    depth: int  # parents of the prepared snapshot
    prepare_us: float
    commit_us: float

    @property
    def total_us(self) -> float:
        return self.prepare_us + self.commit_us


@dataclass
class MountSample:
    prepare_ms: float
    mount_ms: float
    unmount_remove_ms: float
    lowerdirs: int
    options_bytes: int


@dataclass
class Side:
    """One daemon, its client, and what was measured on it."""

    daemon: Daemon
    channel: Channel | None = None
    pairs: list[Pair] = field(default_factory=list)
    pair_cpu_s: float = 0.0
    pairs_cut: bool = False
    mounts: list[MountSample] = field(default_factory=list)
    mounts_cut: bool = False
    chain_tops: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.daemon.name

    @property
    def sn(self) -> Any:
        if self.channel is None:
            raise BenchError(f"{self.name}: not connected")
        return SnapshotsStub(self.channel, timeout=CALL_TIMEOUT, metadata={NAMESPACE_HEADER: NAMESPACE})

    async def prepare(self, key: str, parent: str) -> list[Mount]:
        resp = await self.sn.prepare(
            PrepareSnapshotRequest(snapshotter=SNAPSHOTTER, key=key, parent=parent, labels=LABELS)
        )
        return [Mount(m.type, m.source, m.target, tuple(m.options)) for m in resp.mounts]

    async def commit(self, name: str, key: str) -> None:
        await self.sn.commit(
            CommitSnapshotRequest(snapshotter=SNAPSHOTTER, name=name, key=key, labels=LABELS)
        )

    async def remove(self, key: str) -> None:
        await self.sn.remove(RemoveSnapshotRequest(snapshotter=SNAPSHOTTER, key=key))


# -- Prepare + Commit ----------------------------------------------------------------------------------------


async def extend_chain(side: Side, chain: int, start: int, count: int, deadline: float) -> int:
    """Add up to ``count`` pairs to chain ``chain`` from depth ``start`` until ``deadline``; how many."""
    sn_prepare, sn_commit = side.prepare, side.commit
    parent = f"c{chain}-{start - 1}" if start else ""
    done = 0
    gc.collect()
    cpu0 = side.daemon.cpu_seconds()
    for depth in range(start, start + count):
        if time.monotonic() > deadline:
            break
        key, name = f"c{chain}-a{depth}", f"c{chain}-{depth}"
        t0 = time.perf_counter_ns()
        await sn_prepare(key, parent)
        t1 = time.perf_counter_ns()
        await sn_commit(name, key)
        t2 = time.perf_counter_ns()
        side.pairs.append(Pair(depth, (t1 - t0) / 1000, (t2 - t1) / 1000))
        parent = name
        done += 1
    side.pair_cpu_s += side.daemon.cpu_seconds() - cpu0
    return done


async def build_chains(sides: list[Side], chains: int, budget_s: float) -> None:
    """``chains`` chains of DEPTH on every side, SLICE pairs per turn, the first daemon alternating."""
    deadline = {s.name: time.monotonic() + budget_s for s in sides}
    turn = 0
    for chain in range(chains):
        depth = {s.name: 0 for s in sides}
        for start in range(0, DEPTH, SLICE):
            for s in sides if turn % 2 == 0 else sides[::-1]:
                if depth[s.name] < start:  # cut by the budget earlier in this chain
                    continue
                depth[s.name] += await extend_chain(s, chain, start, SLICE, deadline[s.name])
            turn += 1
        for s in sides:
            if depth[s.name] == DEPTH:
                s.chain_tops.append(f"c{chain}-{DEPTH - 1}")
            else:
                s.pairs_cut = True
        print(f"  chain {chain + 1}/{chains} of {DEPTH} built", file=sys.stderr)


# -- the 128-layer chain, mounted ----------------------------------------------------------------------------


def lowerdir_count(mounts: list[Mount]) -> tuple[int, int]:
    """The overlay's lowerdir entries and the byte length of its options."""
    for m in mounts:
        if m.type == "overlay":
            for option in m.options:
                if option.startswith("lowerdir="):
                    return len(option.split(":")), len(",".join(m.options))
    return 0, 0


async def mount_once(side: Side, top: str, key: str, target: Path) -> MountSample:
    t0 = time.perf_counter()
    mounts = await side.prepare(key, top)
    t1 = time.perf_counter()
    await mount_all(mounts, target)
    t2 = time.perf_counter()
    try:
        lowers, nbytes = lowerdir_count(mounts)
        if lowers != DEPTH:
            raise BenchError(f"{side.name}: the overlay on {top} lists {lowers} lowerdirs, not {DEPTH}")
        # Outside the timed part, so blocking is harmless; the upper dir must take a write.
        if not await asyncio.to_thread(os.path.ismount, target):
            raise BenchError(f"{side.name}: {target} is no mount point after mount_all")
        await asyncio.to_thread((target / "probe").write_bytes, b"x")
    finally:
        t3 = time.perf_counter()
        await release(target)
        await side.remove(key)
    t4 = time.perf_counter()
    return MountSample((t1 - t0) * 1e3, (t2 - t1) * 1e3, (t4 - t3) * 1e3, lowers, nbytes)


async def mount_chains(sides: list[Side], count: int, budget_s: float, base: Path) -> None:
    deadline = {s.name: time.monotonic() + budget_s for s in sides}
    targets = {s.name: base / "mnt" / s.name for s in sides}
    for target in targets.values():
        target.mkdir(parents=True)
    for i in range(count + 1):  # the first is a warm-up
        for s in sides if i % 2 == 0 else sides[::-1]:
            if not s.chain_tops:
                s.mounts_cut = True
                continue
            if time.monotonic() > deadline[s.name]:
                s.mounts_cut = True
                continue
            sample = await mount_once(s, s.chain_tops[0], f"m{i}", targets[s.name])
            if i > 0:
                s.mounts.append(sample)


# -- the run -------------------------------------------------------------------------------------------------


async def measure(sides: list[Side], chains: int, mounts: int, budget_s: float, base: Path) -> dict[str, Any]:
    versions = await asyncio.gather(*(wait_ready(s.daemon) for s in sides))
    servers = {s.name: {"version": v, "pid": s.daemon.pid} for s, v in zip(sides, versions, strict=True)}
    for s in sides:
        await ensure_namespace(s.daemon, NAMESPACE)
        s.channel = channel_for(s.daemon)
    try:
        # Warm-up: a short chain of its own on each side (code paths, the client's first calls).
        for s in sides:
            await extend_chain(s, 99, 0, 8, time.monotonic() + budget_s)
            s.pairs.clear()
            s.pair_cpu_s = 0.0
        print(f"  Prepare+Commit: {chains} chains of {DEPTH} per daemon ...", file=sys.stderr)
        await build_chains(sides, chains, budget_s)
        print(f"  Prepare + mount on a {DEPTH}-layer chain: {mounts} per daemon ...", file=sys.stderr)
        await mount_chains(sides, mounts, budget_s, base)
        for s in sides:
            s.daemon.check_alive()
    finally:
        # Nothing of ours may stay mounted when the daemons stop (the finally of main checks again).
        for p in sorted(mount_points_under(base / "mnt"), key=len, reverse=True):
            await release(p)
        for s in sides:
            if s.channel is not None:
                s.channel.close()
    return servers


def metrics_of(b: Side, c: Side) -> list[Metric]:
    def pairs(side: Side, lo: int = 0, hi: int = DEPTH) -> list[Pair]:
        return [p for p in side.pairs if lo <= p.depth < hi]

    def dist(side: Side, attr: str, lo: int = 0, hi: int = DEPTH) -> Figure:
        return distribution([getattr(p, attr) for p in pairs(side, lo, hi)], side.pairs_cut)

    def both(name: str, unit: str, attr: str, lo: int = 0, hi: int = DEPTH) -> Metric:
        return Metric(name, unit, dist(b, attr, lo, hi), dist(c, attr, lo, hi))

    def cpu(side: Side) -> Figure:
        n = len(side.pairs)
        return Figure(side.pair_cpu_s / n * 1e6 if n else float("nan"), None, n, side.pairs_cut)

    def mount_dist(side: Side, attr: str) -> Figure:
        return distribution([getattr(m, attr) for m in side.mounts], side.mounts_cut)

    def mboth(name: str, attr: str) -> Metric:
        return Metric(name, "ms", mount_dist(b, attr), mount_dist(c, attr))

    q = DEPTH // 4
    out = [
        both("Prepare", "us", "prepare_us"),
        both("Commit", "us", "commit_us"),
        both("Prepare+Commit pair", "us", "total_us"),
        both(f"Prepare+Commit pair, depth 0-{q - 1}", "us", "total_us", 0, q),
        both(f"Prepare+Commit pair, depth {DEPTH - q}-{DEPTH - 1}", "us", "total_us", DEPTH - q, DEPTH),
        Metric("Prepare+Commit daemon CPU", "us/pair", cpu(b), cpu(c)),
        mboth(f"{DEPTH}-layer chain: Prepare", "prepare_ms"),
        mboth(f"{DEPTH}-layer chain: mount_all", "mount_ms"),
    ]
    total = Metric(
        f"{DEPTH}-layer chain: Prepare+mount",
        "ms",
        distribution([m.prepare_ms + m.mount_ms for m in b.mounts], b.mounts_cut),
        distribution([m.prepare_ms + m.mount_ms for m in c.mounts], c.mounts_cut),
    )
    out.append(total)
    out.append(mboth(f"{DEPTH}-layer chain: unmount+Remove", "unmount_remove_ms"))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="bench.snapshots", description=__doc__.split("\n\n")[0] if __doc__ else ""
    )
    p.add_argument("--chains", type=int, default=4, help=f"chains of {DEPTH} per daemon (default 4)")
    p.add_argument("--mounts", type=int, default=100, help=f"mounts of the {DEPTH}-layer chain (default 100)")
    p.add_argument(
        "--budget", type=float, default=25.0, help="seconds per daemon per phase (default 25); a cap"
    )
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    args = p.parse_args(argv)
    if args.chains < 1 or args.mounts < 1:
        p.error("--chains and --mounts must be at least 1")
    if not require_containerd():
        return 1

    quiet_logs()
    info: dict[str, Any] = {"machine": machine(), "chains": args.chains, "mounts": args.mounts}
    base = make_base()
    by = "bench/snapshots.py"
    sides = [Side(berthd_daemon(base / "b", by=by)), Side(containerd_daemon(base / "c", by=by))]
    started = time.monotonic()
    failed = True
    with terminate_as_interrupt():
        try:
            for s in sides:
                s.daemon.start()
            info["servers"] = asyncio.run(measure(sides, args.chains, args.mounts, args.budget, base))
            failed = False
        except KeyboardInterrupt as exc:
            failed = False
            print("interrupted; unmounting and stopping the daemons", file=sys.stderr)
            return exit_status(exc)
        except BenchError as exc:
            print(f"bench failed: {exc}", file=sys.stderr)
            return 1
        except GRPCError as exc:
            print(f"bench failed: a call answered {exc.status.name}: {exc.message}", file=sys.stderr)
            return 1
        finally:
            stop_all([s.daemon for s in sides], show_logs=failed)
            remove_base(base)

    b, c = sides
    metrics = metrics_of(b, c)
    info["elapsed_s"] = round(time.monotonic() - started, 1)
    info["overlay_options_bytes"] = {s.name: s.mounts[0].options_bytes if s.mounts else 0 for s in sides}
    if args.json:
        info["samples"] = {
            s.name: {
                "pairs": [dataclasses.asdict(x) for x in s.pairs],
                "mounts": [dataclasses.asdict(x) for x in s.mounts],
            }
            for s in sides
        }
        out = {**info, "metrics": [{**dataclasses.asdict(m), "ratio": m.ratio} for m in metrics]}
        print(json.dumps(rounded(out), indent=2))
        return 0
    servers = info["servers"]
    print(
        f"berth {servers['berth']['version']} vs containerd {servers['containerd']['version']}; "
        f"{SNAPSHOTTER}, {args.chains} chains of {DEPTH} empty snapshots and {len(b.mounts)} mounts "
        f"of the {DEPTH}-layer chain per daemon, one grpclib client, {info['elapsed_s']}s"
    )
    print(format_table(metrics))
    sizes = info["overlay_options_bytes"]
    print(
        "ratio: berth's figure over containerd's (medians); above 1 means berth is slower. "
        f"Overlay options of the {DEPTH}-layer mount before compaction: berth {sizes['berth']:,} B, "
        f"containerd {sizes['containerd']:,} B. p99 is the maximum below 100 samples."
    )
    print_budget_note(metrics, args.budget)
    return 0


if __name__ == "__main__":
    sys.exit(main())
