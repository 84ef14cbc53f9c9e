"""Pull + unpack of a ~50 MB, 5-layer image from a local registry: berthd against Debian's containerd.

    .venv/bin/python -m bench.pull [--rounds N] [--budget S] [--downloads N] [--link MB_S]
                                   [--no-fetch-only] [--json]

One run builds :func:`tests.support.oci.big_image` once (gzip; about 26 MB
compressed, 52 MB unpacked, five layers), pushes it to a fresh Debian
``docker-registry`` on 127.0.0.1 and starts berthd and a private containerd
on temporary roots. Then, for each round, every contender pulls the image
into an empty namespace:

* **berth**: the ``berth.services.images.v1.Transfer/Pull`` RPC, which
  resolves, downloads and unpacks inside berthd (layers are applied while
  they download), timed from the call to the final ``done`` message;
* **containerd**: ``ctr --debug images pull --plain-http --snapshotter
  overlayfs`` against the private daemon, timed from exec to exit (ctr
  fetches, writing through the daemon's Content service, then unpacks through
  its Diff service). ``--debug`` turns off ctr's progress table, which would
  add up to 100 ms (its refresh tick) to every fetch; ctr's process start
  (about 10 ms) stays in the figure and is measured separately.

Both use the same number of parallel layer downloads (``--downloads``,
berth's and containerd's CRI default: 3). With fetch-only on (the default),
each round also times a download without unpacking (``no_unpack`` for
berth, ``ctr --debug content fetch`` for containerd, whose fetch has no
download limit), so the cost of unpacking beyond the download shows. When
the images plugin's config has a ``tee_backlog`` key, a third daemon with
``tee_backlog = 0`` (no live apply) takes part as well. berth's figures also
say how many layers were applied live (``teed`` of its ``pull.done`` log
event). The layer snapshots' Usage must cover the layers' file bytes.

``--link MB_S`` puts a proxy (:mod:`bench.linkproxy`) between the daemons
and the registry that caps the answers at MB_S MB/s, one link shared by all
connections: on loopback the download is much faster than any unpack, so
only a slower link shows what applying layers while they download is worth.

Each measured pull really downloads and unpacks everything: before it the
namespace holds no content and no snapshot; after it the registry's log must
show every layer and the config served in full during that pull, and every
layer's chain id must be a committed overlayfs snapshot. The image is then
deleted with a synchronous garbage collection (and leftovers removed).
Rounds rotate which contender goes first, and stop at ``--budget`` seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import io
import json
import re
import resource
import statistics
import sys
import tarfile
import time
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from grpclib.client import Channel
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from bench.daemons import (
    CTR,
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
from bench.linkproxy import LinkProxy
from bench.report import Figure, Metric, distribution, format_table, rounded
from protos.berth.services.images.v1 import PullRequest, TransferStub
from protos.containerd.services.content.v1 import ContentStub, DeleteContentRequest, ListContentRequest
from protos.containerd.services.images.v1 import DeleteImageRequest, ImagesStub
from protos.containerd.services.snapshots.v1 import (
    Kind,
    ListSnapshotsRequest,
    RemoveSnapshotRequest,
    SnapshotsStub,
    StatSnapshotRequest,
    UsageRequest,
)
from tests.support.oci import Image, LayerBlob, Manifest, big_image
from tests.support.push import push_image_sync
from tests.support.registry import Registry

NAMESPACE = "bench"
REPOSITORY = "big"
TAG = "latest"
SNAPSHOTTER = "overlayfs"
CALL_TIMEOUT = 10.0
#: How long the registry may take to log a response the client already has in full.
LOG_LAG = 5.0
MB = 1_000_000

PULL = "pull"
FETCH = "fetch"


def tee_backlog_configurable() -> bool:
    """Whether the images plugin's config table has ``tee_backlog`` (live apply can be turned off)."""
    from plugins.images.config import ImagesConfig

    return "tee_backlog" in {f.name for f in dataclasses.fields(ImagesConfig)}


def images_table(downloads: int, extra: str = "") -> str:
    return (
        '\n[plugins."berth.images.v1.default"]\n'
        f'snapshotter = "{SNAPSHOTTER}"\n'
        f"max_concurrent_downloads = {downloads}\n"
        f"{extra}"
    )


# -- what the registry served --------------------------------------------------------------------------------

_FIELD = re.compile(r'([\w.]+)=("(?:[^"\\]|\\.)*"|\S+)')


def served_blobs(log_text: str, repository: str) -> dict[str, int]:
    """Bytes sent per blob digest (GETs answered 200 or 206) by the registry's "response completed" lines."""
    served: dict[str, int] = {}
    prefix = f"/v2/{repository}/blobs/"
    for line in log_text.splitlines():
        if 'msg="response completed"' not in line:
            continue
        fields = {k: v.strip('"') for k, v in _FIELD.findall(line)}
        uri = fields.get("http.request.uri", "")
        if fields.get("http.request.method") != "GET" or not uri.startswith(prefix):
            continue
        if fields.get("http.response.status") not in ("200", "206"):
            continue
        digest = uri[len(prefix) :]
        served[digest] = served.get(digest, 0) + int(fields.get("http.response.written", "0"))
    return served


class LogTail:
    """The part of a log file (the registry's, berthd's) written since :meth:`mark`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0

    def mark(self) -> None:
        self._offset = self.path.stat().st_size

    def since_mark(self) -> str:
        with open(self.path, "rb") as f:
            f.seek(self._offset)
            return f.read().decode(errors="replace")


async def wait_served(log: LogTail, expected: dict[str, int], who: str) -> int:
    """Wait until the log shows every expected blob served in full; the bytes served. BenchError if not."""
    deadline = time.monotonic() + LOG_LAG
    while True:
        served = served_blobs(log.since_mark(), REPOSITORY)
        short = {d: (served.get(d, 0), size) for d, size in expected.items() if served.get(d, 0) < size}
        if not short:
            return sum(served.values())
        if time.monotonic() > deadline:
            detail = ", ".join(f"{d[:19]}: {got}/{size} B" for d, (got, size) in short.items())
            raise BenchError(
                f"{who}: the registry did not serve every blob in full during the pull ({detail})"
            )
        await asyncio.sleep(0.05)


# -- the contenders ------------------------------------------------------------------------------------------


@dataclass
class Sample:
    seconds: float
    cpu_s: float  # the daemon's CPU (containerd: plus ctr's)
    served: int  # bytes of layers and config the registry sent during the pull
    unpacked: int  # the layer snapshots' Usage after it (0 for fetch only)
    live: int | None  # layers applied while they downloaded (berth's pull.done log event); None: unknown


@dataclass
class Contender:
    """One daemon and how it pulls; ``samples[op]`` are the measured pulls (op: pull or fetch)."""

    name: str
    daemon: Daemon
    channel: Channel | None = None
    samples: dict[str, list[Sample]] = field(default_factory=lambda: {PULL: [], FETCH: []})
    leftovers_removed: int = 0

    def connect(self) -> None:
        self.channel = channel_for(self.daemon)

    def stub(self, cls: Any, timeout: float = CALL_TIMEOUT) -> Any:
        if self.channel is None:
            raise BenchError(f"{self.name}: not connected")
        return cls(self.channel, timeout=timeout, metadata={NAMESPACE_HEADER: NAMESPACE})

    def close(self) -> None:
        if self.channel is not None:
            self.channel.close()

    def cpu_seconds(self) -> float:
        return self.daemon.cpu_seconds()

    def mark(self) -> None:
        """Called just before a pull; see :meth:`live_layers`."""

    def live_layers(self) -> int | None:
        """Layers of the last pull applied live, while downloading, if the daemon tells."""
        return None

    async def pull(self, ref: str, unpack: bool, limit_s: float) -> None:
        raise NotImplementedError

    async def ensure_empty(self, ref: str) -> None:
        """Delete the image (synchronous GC), then any leftover; BenchError if anything remains."""
        try:
            await self.stub(ImagesStub, 60).delete(DeleteImageRequest(name=ref, sync=True))
        except GRPCError as exc:
            if exc.status is not Status.NOT_FOUND:
                raise
        content, snapshots = await self.listing()
        for digest in content:
            self.leftovers_removed += 1
            await self.stub(ContentStub).delete(DeleteContentRequest(digest=digest))
        # Children before parents: a snapshot's parent is removable once nothing is based on it.
        for _ in range(len(snapshots)):
            if not snapshots:
                break
            parents = set(snapshots.values())
            for key in [k for k in snapshots if k not in parents]:
                self.leftovers_removed += 1
                await self.stub(SnapshotsStub).remove(RemoveSnapshotRequest(snapshotter=SNAPSHOTTER, key=key))
                del snapshots[key]
        content, snapshots = await self.listing()
        if content or snapshots:
            raise BenchError(
                f"{self.name}: namespace {NAMESPACE} not empty after cleanup "
                f"({len(content)} blobs, {len(snapshots)} snapshots)"
            )

    async def listing(self) -> tuple[list[str], dict[str, str]]:
        """Content digests and snapshots (key -> parent) of the namespace."""
        content = [i.digest async for r in self.stub(ContentStub).list(ListContentRequest()) for i in r.info]
        snapshots = {
            i.name: i.parent
            async for r in self.stub(SnapshotsStub).list(ListSnapshotsRequest(snapshotter=SNAPSHOTTER))
            for i in r.info
        }
        return content, snapshots

    async def check_unpacked(self, m: Manifest) -> int:
        """Every layer's chain id is a committed overlayfs snapshot holding at least the layer's file bytes.

        Returns the snapshots' total Usage (bytes). The floor is 95% of the
        regular files' sizes in the layer's tar (Usage counts blocks).
        """
        sn = self.stub(SnapshotsStub)
        total = 0
        for depth, (layer, chain_id) in enumerate(zip(m.layers, m.chain_ids, strict=True)):
            try:
                info = (await sn.stat(StatSnapshotRequest(snapshotter=SNAPSHOTTER, key=chain_id))).info
                usage = await sn.usage(UsageRequest(snapshotter=SNAPSHOTTER, key=chain_id))
            except GRPCError as exc:
                raise BenchError(
                    f"{self.name}: layer {depth}'s chain id {chain_id[:19]} is no {SNAPSHOTTER} snapshot "
                    f"after the pull ({exc.status.name}: {exc.message})"
                ) from None
            if info.kind != Kind.COMMITTED:
                raise BenchError(f"{self.name}: snapshot {chain_id[:19]} is {info.kind}, not committed")
            floor = int(0.95 * file_bytes(layer))
            if usage.size < floor:
                raise BenchError(
                    f"{self.name}: layer {depth}'s snapshot uses {usage.size} bytes, "
                    f"less than the {floor} its files need"
                )
            total += usage.size
        return total


@cache
def file_bytes(layer: LayerBlob) -> int:
    """Sum of the sizes of the regular files in ``layer``'s tar."""
    with tarfile.open(fileobj=io.BytesIO(layer.tar)) as tf:
        return sum(member.size for member in tf.getmembers() if member.isreg())


_TEED = re.compile(r"\bpull\.done\b.*?\bteed=(\d+)")


class BerthContender(Contender):
    _log: LogTail | None = None

    def mark(self) -> None:
        self._log = LogTail(self.daemon.log_path)
        self._log.mark()

    def live_layers(self) -> int | None:
        found = _TEED.findall(self._log.since_mark()) if self._log else []
        return int(found[-1]) if found else None

    async def pull(self, ref: str, unpack: bool, limit_s: float) -> None:
        last = None
        async for message in self.stub(TransferStub, limit_s).pull(
            PullRequest(reference=ref, snapshotter=SNAPSHOTTER if unpack else "", no_unpack=not unpack)
        ):
            last = message
        if last is None or last.phase != "done" or not last.image.name:
            raise BenchError(f"{self.name}: the Pull stream ended without its done message ({last})")


@dataclass
class CtrContender(Contender):
    """containerd driven by Debian's ``ctr``, as a user would; ctr's CPU counts with the daemon's."""

    downloads: int = 3

    def cpu_seconds(self) -> float:
        own = resource.getrusage(resource.RUSAGE_CHILDREN)  # reaped children: the ctr runs
        return self.daemon.cpu_seconds() + own.ru_utime + own.ru_stime

    def argv(self, *args: str) -> list[str]:
        # --debug: ctr then draws no progress table, whose 100 ms ticker would otherwise hold
        # every fetch (and the unpack after it) until the next tick, 50 ms on average.
        return [CTR, "--debug", "--address", self.daemon.address, "--namespace", NAMESPACE, *args]

    async def pull(self, ref: str, unpack: bool, limit_s: float) -> None:
        if unpack:
            args = ["images", "pull", "--plain-http", "--snapshotter", SNAPSHOTTER]
            args += ["--max-concurrent-downloads", str(self.downloads), ref]
        else:
            args = ["content", "fetch", "--plain-http", ref]
        await run_ctr(self.argv(*args), limit_s)


async def run_ctr(argv: list[str], limit_s: float) -> str:
    """Run ctr to its end (killed by PID on timeout or cancellation); its output. BenchError if it fails."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), limit_s)
    except TimeoutError:
        raise BenchError(f"ctr {' '.join(argv[6:])}: no exit after {limit_s}s") from None
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    text = out.decode(errors="replace")
    if proc.returncode != 0:
        tail = "\n".join(text.splitlines()[-10:])
        raise BenchError(f"ctr {' '.join(argv[6:])} exited with {proc.returncode}:\n{tail}")
    return text


# -- the run -------------------------------------------------------------------------------------------------


@dataclass
class Plan:
    ref: str
    image: Image
    rounds: int
    warmup: int
    budget_s: float
    timeout_s: float
    ops: tuple[str, ...]


async def one_pull(c: Contender, op: str, plan: Plan, log: LogTail, measured: bool) -> float:
    m = plan.image.manifests[0]
    expected = {layer.digest: layer.size for layer in m.layers}
    expected[m.config.digest] = m.config.size
    content, snapshots = await c.listing()
    if content or snapshots:
        raise BenchError(f"{c.name}: namespace {NAMESPACE} not empty before a pull")
    log.mark()
    c.mark()
    cpu0 = c.cpu_seconds()
    t0 = time.perf_counter()
    await c.pull(plan.ref, op == PULL, plan.timeout_s)
    seconds = time.perf_counter() - t0
    cpu = c.cpu_seconds() - cpu0
    served = await wait_served(log, expected, f"{c.name} {op}")
    unpacked = await c.check_unpacked(m) if op == PULL else 0
    live = c.live_layers() if op == PULL else None
    c.daemon.check_alive()
    await c.ensure_empty(plan.ref)
    if measured:
        c.samples[op].append(Sample(seconds, cpu, served, unpacked, live))
    return seconds


async def ctr_startup(c: CtrContender, n: int = 5) -> float:
    """Median wall time of ``ctr version``: process start plus one round trip, included in ctr's pulls."""
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        await run_ctr(c.argv("version"), 10)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


async def measure(contenders: list[Contender], plan: Plan, log: LogTail, info: dict[str, Any]) -> bool:
    """Warm-up rounds, then measured ones until ``plan.rounds`` or the budget; True when cut by the budget."""
    versions = await asyncio.gather(*(wait_ready(c.daemon) for c in contenders))
    info["servers"] = {
        c.name: {"version": v, "pid": c.daemon.pid} for c, v in zip(contenders, versions, strict=True)
    }
    for c in contenders:
        c.connect()
        await ensure_namespace(c.daemon, NAMESPACE)
    for c in contenders:
        if isinstance(c, CtrContender):
            info["ctr_startup_s"] = await ctr_startup(c)
    for w in range(plan.warmup):
        print(f"  warm-up round {w + 1}/{plan.warmup} ...", file=sys.stderr)
        for op in plan.ops:
            for c in contenders:
                await one_pull(c, op, plan, log, measured=False)
    started = time.monotonic()
    slowest_round = 0.0
    for r in range(plan.rounds):
        elapsed = time.monotonic() - started
        if r > 0 and elapsed + slowest_round > plan.budget_s:
            print(f"  budget of {plan.budget_s}s reached after {r} rounds", file=sys.stderr)
            return True
        order = contenders[r % len(contenders) :] + contenders[: r % len(contenders)]
        t0 = time.monotonic()
        figures = []
        for op in plan.ops:
            for c in order:
                seconds = await one_pull(c, op, plan, log, measured=True)
                figures.append(f"{c.name} {op} {seconds:.2f}s")
        slowest_round = max(slowest_round, time.monotonic() - t0)
        print(f"  round {r + 1}/{plan.rounds}: {', '.join(figures)}", file=sys.stderr)
    return False


def _seconds(samples: list[Sample], cut: bool) -> Figure:
    return distribution([s.seconds for s in samples], cut)


def _throughput(samples: list[Sample], nbytes: int, cut: bool) -> Figure:
    """MB/s of the median pull; the p99 column is the MB/s of the p99 (slow) pull."""
    t = _seconds(samples, cut)
    rate = Figure(nbytes / MB / t.value, None, t.n, cut) if t.n else Figure(float("nan"))
    if t.p99:
        rate.p99 = nbytes / MB / t.p99
    return rate


def metrics_of(contenders: list[Contender], nbytes: int, cut: bool) -> list[Metric]:
    by_name = {c.name: c for c in contenders}
    ref = by_name["containerd"]
    out: list[Metric] = []
    for c in contenders:
        if c is ref:
            continue
        suffix = "" if c.name == "berth" else f", {c.name.removeprefix('berth ')}"
        for op, title in ((PULL, "pull+unpack"), (FETCH, "fetch only")):
            if not c.samples[op]:
                continue
            mine, theirs = c.samples[op], ref.samples[op]
            out.append(Metric(f"{title}{suffix} time", "s", _seconds(mine, cut), _seconds(theirs, cut)))
            out.append(
                Metric(
                    f"{title}{suffix} rate",
                    "MB/s",
                    _throughput(mine, nbytes, cut),
                    _throughput(theirs, nbytes, cut),
                )
            )
            out.append(
                Metric(
                    f"{title}{suffix} CPU",
                    "s",
                    distribution([s.cpu_s for s in mine], cut),
                    distribution([s.cpu_s for s in theirs], cut),
                )
            )
        if c.samples[PULL] and c.samples[FETCH]:

            def tail(x: Contender) -> Figure:
                pull = statistics.median(s.seconds for s in x.samples[PULL])
                return Figure(pull - statistics.median(s.seconds for s in x.samples[FETCH]))

            out.append(Metric(f"unpack beyond download{suffix}", "s", tail(c), tail(ref)))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.pull", description=__doc__.split("\n\n")[0] if __doc__ else "")
    p.add_argument("--rounds", type=int, default=5, help="measured rounds (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured rounds first (default 1)")
    p.add_argument(
        "--budget", type=float, default=75.0, help="seconds for the measured rounds (default 75); a cap"
    )
    p.add_argument("--timeout", type=float, default=60.0, help="seconds one pull may take (default 60)")
    p.add_argument("--downloads", type=int, default=3, help="parallel layer downloads, both (default 3)")
    p.add_argument(
        "--link",
        type=float,
        default=0.0,
        metavar="MB_S",
        help="pull through a proxy capping the registry's answers at MB_S MB/s (default: direct)",
    )
    p.add_argument("--no-fetch-only", action="store_true", help="skip the download-only pulls")
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.warmup < 0 or args.downloads < 1 or args.link < 0:
        p.error("--rounds and --downloads must be at least 1, --warmup and --link at least 0")
    if not require_containerd():
        return 1

    quiet_logs()
    info: dict[str, Any] = {
        "machine": machine(),
        "rounds": args.rounds,
        "downloads": args.downloads,
        "link_mb_s": args.link,
    }
    started = time.monotonic()
    image = big_image()
    m = image.manifests[0]
    nbytes = sum(layer.size for layer in m.layers) + m.config.size
    info["image"] = {
        "layers": len(m.layers),
        "compressed_bytes": nbytes,
        "unpacked_bytes": sum(layer.uncompressed_size for layer in m.layers),
    }
    by = "bench/pull.py"
    base = make_base()
    registry = Registry(base / "reg")
    contenders: list[Contender] = [
        BerthContender("berth", berthd_daemon(base / "b", config=images_table(args.downloads), by=by)),
        CtrContender("containerd", containerd_daemon(base / "c", by=by), downloads=args.downloads),
    ]
    if tee_backlog_configurable():
        tee0 = berthd_daemon(
            base / "b0",
            name="berth tee_backlog=0",
            config=images_table(args.downloads, "tee_backlog = 0\n"),
            by=by,
        )
        contenders.insert(1, BerthContender(tee0.name, tee0))
    info["live_apply_off_variant"] = len(contenders) > 2
    failed = True
    cut = False
    with terminate_as_interrupt():
        try:
            registry.start()
            push_image_sync(registry.url, REPOSITORY, TAG, image)
            plan = Plan(
                ref=f"{registry.address}/{REPOSITORY}:{TAG}",
                image=image,
                rounds=args.rounds,
                warmup=args.warmup,
                budget_s=args.budget,
                timeout_s=args.timeout,
                ops=(PULL,) if args.no_fetch_only else (PULL, FETCH),
            )
            for c in contenders:
                c.daemon.start()
            cut = asyncio.run(_measure_and_close(contenders, plan, registry, args.link, info))
            info["peak_rss_mib"] = {c.name: c.daemon.peak_rss_kib() / 1024 for c in contenders}
            for c in contenders:
                c.daemon.check_alive()
            failed = False
        except KeyboardInterrupt as exc:
            failed = False
            print("interrupted; stopping the daemons and the registry", file=sys.stderr)
            return exit_status(exc)
        except BenchError as exc:
            print(f"bench failed: {exc}", file=sys.stderr)
            return 1
        except GRPCError as exc:
            print(f"bench failed: a call answered {exc.status.name}: {exc.message}", file=sys.stderr)
            return 1
        finally:
            stop_all([c.daemon for c in contenders], show_logs=failed)
            registry.stop()
            if failed and registry.log_path.exists():
                print(f"--- registry log (tail) ---\n{registry.log()[-2000:]}", file=sys.stderr)
            remove_base(base)

    metrics = metrics_of(contenders, nbytes, cut)
    rss = info["peak_rss_mib"]
    metrics.append(Metric("daemon peak RSS (VmHWM)", "MiB", Figure(rss["berth"]), Figure(rss["containerd"])))
    info["elapsed_s"] = round(time.monotonic() - started, 1)
    info["samples"] = {
        c.name: {op: [dataclasses.asdict(s) for s in ss] for op, ss in c.samples.items()} for c in contenders
    }
    info["leftovers_removed"] = {c.name: c.leftovers_removed for c in contenders}
    if args.json:
        out = {**info, "metrics": [rounded({**dataclasses.asdict(x), "ratio": x.ratio}) for x in metrics]}
        print(json.dumps(rounded(out), indent=2))
        return 0
    servers = info["servers"]
    img = info["image"]
    print(
        f"berth {servers['berth']['version']} vs containerd {servers['containerd']['version']}; "
        f"{img['layers']} layers, {img['compressed_bytes'] / MB:.1f} MB gzip, "
        f"{img['unpacked_bytes'] / MB:.1f} MB unpacked; {args.downloads} parallel downloads; "
        f"{f'link capped at {args.link:g} MB/s' if args.link else 'direct to the registry'}; "
        f"{len(contenders[0].samples[PULL])} rounds, {info['elapsed_s']}s"
    )
    print(format_table(metrics))
    print(
        "ratio: berth's over containerd's (medians); above 1 means berth is higher (slower, for times). "
        "MB/s is compressed bytes per second; its p99 column is the rate of the p99 (slowest) pull. "
        "p99 is the maximum below 100 rounds."
    )
    print(
        "containerd's figures include ctr's process: a `ctr version` takes "
        f"{info['ctr_startup_s'] * 1000:.0f} ms; "
        "CPU is the daemon's (containerd: plus ctr's). Every pull was checked: all blobs served in full, "
        f"every layer a committed {SNAPSHOTTER} snapshot."
    )
    for c in contenders:
        live = [x.live for x in c.samples[PULL] if x.live is not None]
        if live:
            print(
                f"{c.name}: layers applied while downloading (pull.done teed=), per pull: "
                f"median {statistics.median(live):g} of {img['layers']}, range {min(live)}-{max(live)}."
            )
    if not info["live_apply_off_variant"]:
        print("live apply cannot be turned off: the images plugin's config has no tee_backlog key.")
    if cut:
        print(f"* cut short by the time budget (--budget {args.budget}s); see n in --json.")
    return 0


async def _measure_and_close(
    contenders: list[Contender], plan: Plan, registry: Registry, link_mb_s: float, info: dict[str, Any]
) -> bool:
    """:func:`measure`, through a :class:`LinkProxy` when ``link_mb_s`` is set; closes every channel."""
    log = LogTail(registry.log_path)
    try:
        if not link_mb_s:
            return await measure(contenders, plan, log, info)
        async with LinkProxy("127.0.0.1", registry.port, link_mb_s * MB) as proxy:
            plan.ref = f"127.0.0.1:{proxy.port}/{REPOSITORY}:{TAG}"
            return await measure(contenders, plan, log, info)
    finally:
        for c in contenders:
            c.close()


if __name__ == "__main__":
    sys.exit(main())
