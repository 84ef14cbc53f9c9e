"""Running containers: berth against Debian's containerd, and bare runc as the floor.

    .venv/bin/python -m bench.run [--rounds N] [--pods N] [--concurrent N] [--json]

berthd and a private containerd run side by side on temporary roots, each
with the busybox test image (``tests.support.oci``) imported as
``docker.io/library/busybox:latest``. In one run:

* **end to end**: ``berth run --rm busybox ID true`` and ``ctr run --rm
  busybox ID true`` as commands, against bare ``runc run`` of a bundle with
  the same image files and a spec from :mod:`daemon.oci.spec` (the floor:
  no daemon, no shim, no snapshot). ``--rounds`` each, interleaved, the order
  rotating every round. ``berth`` is a Python program: its start-up (up to
  the first call, measured alone as ``berth CLI start-up``: ``berth run``
  against a socket that does not exist) is part of the figure, as ``ctr``'s
  is of containerd's.
* **same client**: the CLI's own ``run`` code (:mod:`daemon.cli.commands.run`,
  wire API only) called in this process against each daemon, ``run --rm
  true``: the daemon and shim cost without any CLI start-up.
* **shim memory**: ``--pods`` detached ``sleep`` containers per daemon (one
  shim each: no grouping); RSS and PSS (``/proc/PID/smaps_rollup``) of each
  shim (the parent of each task's init process). PSS charges shared
  pages pro rata, so shims forked from a pre-imported server share theirs.
* **concurrent start**: ``--concurrent`` detached containers started at once
  (``run -d``, the same in-process client, one coroutine each) per daemon;
  wall time until every one is running. Then all are killed and removed.

Every container, task and snapshot is removed at the end; the daemons are
stopped and whatever is left mounted under the run's directory unmounted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import functools
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from grpclib.client import Channel
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
from daemon.cli import berth as berth_cli
from daemon.cli.taskclient import TaskClient
from daemon.oci import spec as ocispec

IMAGE = "docker.io/library/busybox:latest"
NAMESPACE = "default"
BIN = Path(sys.executable).parent
RUNC = shutil.which("runc") or "/usr/sbin/runc"
CALL_TIMEOUT = 60.0


@dataclass
class Side:
    """One daemon and what was measured against it."""

    name: str
    daemon: Daemon
    version: str = ""
    cli_s: list[float] = field(default_factory=list)
    inproc_s: list[float] = field(default_factory=list)
    shim_rss_kib: list[int] = field(default_factory=list)
    shim_pss_kib: list[int] = field(default_factory=list)
    concurrent_s: float = float("nan")

    def cli(self, *args: str) -> list[str]:
        if self.name == "berth":
            return [str(BIN / "berth"), "--address", self.daemon.address, "--namespace", NAMESPACE, *args]
        return [CTR, "--address", self.daemon.address, "--namespace", NAMESPACE, *args]


def _check(argv: list[str], what: str) -> str:
    proc = subprocess.run(
        argv, capture_output=True, text=True, timeout=CALL_TIMEOUT, stdin=subprocess.DEVNULL
    )
    if proc.returncode != 0:
        raise BenchError(f"{what}: {' '.join(argv)} exited {proc.returncode}: {proc.stderr.strip()}")
    return proc.stdout


def _timed(argv: list[str], what: str, expect: int = 0) -> float:
    start = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, timeout=CALL_TIMEOUT, stdin=subprocess.DEVNULL)
    took = time.perf_counter() - start
    if proc.returncode != expect:
        text = proc.stderr.decode(errors="replace").strip()
        raise BenchError(f"{what}: {' '.join(argv)} exited {proc.returncode}: {text}")
    return took


# -- setup -----------------------------------------------------------------------------


def image_archive(base: Path) -> Path:
    from tests.support.oci import busybox_image, oci_archive

    return oci_archive(busybox_image("gzip"), base / "busybox.tar", image_name=IMAGE)


def bare_bundle(base: Path) -> Path:
    """A runc bundle: the busybox layers extracted (whiteouts skipped), a spec running ``true``."""
    from tests.support.oci import busybox_image

    bundle = base / "bundle"
    rootfs = bundle / "rootfs"
    rootfs.mkdir(parents=True)
    image = busybox_image("gzip")
    for layer in image.manifest_for("linux/amd64").layers:
        with tarfile.open(fileobj=io.BytesIO(layer.tar)) as tf:
            members = [m for m in tf.getmembers() if not Path(m.name).name.startswith(".wh.")]
            tf.extractall(rootfs, members=members, filter="tar")
    spec = ocispec.generate(
        "bare", ocispec.with_process_args(["true"]), ocispec.with_readonly_rootfs(), namespace="bench"
    )
    (bundle / "config.json").write_text(json.dumps(spec))
    return bundle


# -- measurements ----------------------------------------------------------------------


def cli_startup(base: Path, rounds: int) -> list[float]:
    """``berth run --rm`` up to its first call: against a socket that does not exist it exits 3 there,
    having imported and parsed all the command needs."""
    argv = [str(BIN / "berth"), "--address", str(base / "absent.sock"), "run", "--rm", IMAGE, "s", "true"]
    return [_timed(argv, "berth CLI start-up", expect=3) for _ in range(rounds)]


def end_to_end(sides: list[Side], bundle: Path, runc_root: Path, rounds: int) -> list[float]:
    """``--rounds`` of each command, interleaved; returns bare runc's times."""
    runc_s: list[float] = []
    steps: list[Callable[[int], None]] = []

    def runc_step(i: int) -> None:
        argv = [RUNC, "--root", str(runc_root), "run", "--bundle", str(bundle), f"bare-{i}"]
        runc_s.append(_timed(argv, "runc run"))

    steps.append(runc_step)
    for side in sides:

        def step(i: int, side: Side = side) -> None:
            side.cli_s.append(_timed(side.cli("run", "--rm", IMAGE, f"e2e-{i}", "true"), f"{side.name} run"))

        steps.append(step)
    for i in range(rounds):
        order = steps[i % len(steps) :] + steps[: i % len(steps)]
        for run_one in order:
            run_one(i)
    return runc_s


async def _cli_call(side: Side, *argv: str) -> None:
    """The CLI's own handler for ``argv``, in this process, against ``side``'s daemon."""
    args = berth_cli._parser().parse_args(["--address", side.daemon.address, "--namespace", NAMESPACE, *argv])
    channel = Channel(path=side.daemon.address)
    try:
        client = TaskClient(channel, side.daemon.address, NAMESPACE, CALL_TIMEOUT)
        await berth_cli.COMMANDS[args.command](client, args)
    finally:
        channel.close()


async def same_client(sides: list[Side], rounds: int) -> None:
    for i in range(rounds):
        for side in sides if i % 2 == 0 else list(reversed(sides)):
            start = time.perf_counter()
            await _cli_call(side, "run", "--rm", IMAGE, f"inproc-{i}", "true")
            side.inproc_s.append(time.perf_counter() - start)


async def _shim_pids(side: Side) -> set[int]:
    """The shims of ``side``'s tasks: each task's init is a child of its shim (the subreaper)."""
    channel = Channel(path=side.daemon.address)
    try:
        tasks = await TaskClient(channel, side.daemon.address, NAMESPACE, CALL_TIMEOUT).list_tasks()
    finally:
        channel.close()
    pids = set()
    for task in tasks:
        stat = Path(f"/proc/{task.pid}/stat").read_text()  # noqa: ASYNC240 - a read of /proc
        pids.add(int(stat[stat.rindex(")") + 2 :].split()[1]))
    return pids


def _kib(pid: int, file: str, key: str) -> int:
    for line in Path(f"/proc/{pid}/{file}").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise BenchError(f"no {key} in /proc/{pid}/{file}")


async def _gather_limited(calls: list[Callable[[], Awaitable[None]]], limit: int) -> None:
    sem = asyncio.Semaphore(limit)

    async def one(call: Callable[[], Awaitable[None]]) -> None:
        async with sem:
            await call()

    await asyncio.gather(*(one(c) for c in calls))


async def _remove_all(side: Side, ids: list[str]) -> None:
    async def kill(cid: str) -> None:
        with contextlib.suppress(GRPCError, SystemExit):
            await _cli_call(side, "tasks", "kill", "-s", "KILL", cid)

    async def remove(cid: str) -> None:
        channel = Channel(path=side.daemon.address)
        try:
            client = TaskClient(channel, side.daemon.address, NAMESPACE, CALL_TIMEOUT)
            with contextlib.suppress(GRPCError):
                await client.wait_task(cid)
            from daemon.cli.commands.containers import delete_container

            await delete_container(client, cid)
        finally:
            channel.close()

    await _gather_limited([functools.partial(kill, cid) for cid in ids], 16)
    await _gather_limited([functools.partial(remove, cid) for cid in ids], 16)


async def shim_memory(sides: list[Side], pods: int) -> None:
    for side in sides:
        ids = [f"pod-{i}" for i in range(pods)]
        try:
            for cid in ids:
                await _cli_call(side, "run", "-d", IMAGE, cid, "sleep", "600")
            pids = await _shim_pids(side)
            if len(pids) < pods:
                raise BenchError(f"{side.name}: {len(pids)} shims for {pods} pods")
            for pid in sorted(pids):
                side.shim_rss_kib.append(_kib(pid, "status", "VmRSS"))
                side.shim_pss_kib.append(_kib(pid, "smaps_rollup", "Pss"))
        finally:
            await _remove_all(side, ids)


async def concurrent_start(sides: list[Side], n: int) -> None:
    for side in sides:
        ids = [f"many-{i}" for i in range(n)]
        try:
            start = time.perf_counter()
            await asyncio.gather(*(_cli_call(side, "run", "-d", IMAGE, cid, "sleep", "600") for cid in ids))
            side.concurrent_s = time.perf_counter() - start
        finally:
            await _remove_all(side, ids)


async def measure(sides: list[Side], base: Path, args: argparse.Namespace) -> dict[str, Any]:
    for side in sides:
        side.version = await wait_ready(side.daemon)
    archive = await asyncio.to_thread(image_archive, base)
    for side in sides:
        await asyncio.to_thread(_check, side.cli("images", "import", str(archive)), f"{side.name} import")
    bundle = await asyncio.to_thread(bare_bundle, base)
    runc_root = base / "runc"
    startup = await asyncio.to_thread(cli_startup, base, max(5, args.rounds // 2))
    runc_s = await asyncio.to_thread(end_to_end, sides, bundle, runc_root, args.rounds)
    await same_client(sides, args.rounds)
    await shim_memory(sides, args.pods)
    await concurrent_start(sides, args.concurrent)
    return {"runc_s": runc_s, "startup_s": startup}


def metrics_of(b: Side, c: Side) -> list[Metric]:
    def one(x: float) -> Figure:
        return Figure(x, None, 1)

    return [
        Metric("run --rm true, CLI end to end", "ms", _ms(b.cli_s), _ms(c.cli_s)),
        Metric("run --rm true, same in-process client", "ms", _ms(b.inproc_s), _ms(c.inproc_s)),
        Metric("shim RSS per pod", "MiB", _mib(b.shim_rss_kib), _mib(c.shim_rss_kib)),
        Metric("shim PSS per pod", "MiB", _mib(b.shim_pss_kib), _mib(c.shim_pss_kib)),
        Metric("concurrent starts, wall", "s", one(b.concurrent_s), one(c.concurrent_s)),
    ]


def _ms(values: list[float]) -> Figure:
    return distribution([v * 1000 for v in values])


def _mib(values: list[int]) -> Figure:
    return distribution([v / 1024 for v in values])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.run", description=__doc__.split("\n\n")[0] if __doc__ else "")
    p.add_argument("--rounds", type=int, default=20, help="runs of each command (default 20)")
    p.add_argument("--pods", type=int, default=5, help="detached containers for shim memory (default 5)")
    p.add_argument("--concurrent", type=int, default=50, help="containers started at once (default 50)")
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    args = p.parse_args(argv)
    if min(args.rounds, args.pods, args.concurrent) < 1:
        p.error("--rounds, --pods and --concurrent must be at least 1")
    if not require_containerd():
        return 1
    if os.geteuid() != 0:
        print("bench.run needs root (runc, mounts)", file=sys.stderr)
        return 1
    # The in-process client copies our stdin into each task: give it nothing to copy.
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)

    quiet_logs()
    info: dict[str, Any] = {"machine": machine(), **vars(args)}
    base = make_base()
    by = "bench/run.py"
    sides = [
        Side("berth", berthd_daemon(base / "b", by=by)),
        Side("containerd", containerd_daemon(base / "c", by=by)),
    ]
    started = time.monotonic()
    failed = True
    with terminate_as_interrupt():
        try:
            for s in sides:
                s.daemon.start()
            extra = asyncio.run(measure(sides, base, args))
            failed = False
        except KeyboardInterrupt as exc:
            failed = False
            print("interrupted; stopping the daemons", file=sys.stderr)
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
    runc = _ms(extra["runc_s"])
    startup = _ms(extra["startup_s"])
    floor = [
        Metric("berth run --rm true vs bare runc run", "ms", _ms(b.cli_s), runc),
        Metric("ctr run --rm true vs bare runc run", "ms", _ms(c.cli_s), runc),
        Metric("berth CLI start-up (to 1st call) vs bare runc", "ms", startup, runc),
    ]
    info["elapsed_s"] = round(time.monotonic() - started, 1)
    if args.json:
        out = {
            **info,
            "versions": {s.name: s.version for s in sides},
            "metrics": [{**dataclasses.asdict(m), "ratio": m.ratio} for m in metrics + floor],
            "samples": {
                "runc_s": extra["runc_s"],
                "startup_s": extra["startup_s"],
                **{s.name: {k: v for k, v in dataclasses.asdict(s).items() if k != "daemon"} for s in sides},
            },
        }
        print(json.dumps(rounded(out), indent=2))
        return 0
    print(
        f"berth {b.version} vs containerd {c.version}; busybox `true`; {args.rounds} rounds, "
        f"{args.pods} pods, {args.concurrent} concurrent starts; {info['elapsed_s']}s"
    )
    print(format_table(metrics))
    print()
    print(format_table(floor, reference="runc"))
    print(
        "ratio: the first figure over the reference's (medians); above 1 means slower or bigger. "
        f"Concurrent: {args.concurrent} `run -d` at once through the in-process client. "
        f"Median of {statistics.median(extra['runc_s']) * 1000:.1f} ms for bare runc."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
