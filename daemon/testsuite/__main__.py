"""``python -m daemon.testsuite <suite> <plugin>``: run a conformance suite against an installed plugin.

Suites: ``snapshotter`` (``berth.snapshotter.v1``; it mounts, so it needs
root) and ``content`` (``berth.content.v1``). The plugin is found through
the ``berth.plugins`` entry points (install your package first, or put it
on ``PYTHONPATH``) and built as berthd builds it.
One line per case (``PASS``/``FAIL``/``SKIP``), then a summary.

Exit status: 0 every case passed (or was skipped as not applicable), 1 a
case failed, 2 usage error or the plugin is unknown or failed to start,
77 the plugin skipped itself on this host (e.g. a missing kernel feature).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from daemon import logs
from daemon.errors import BerthError
from daemon.testsuite import content as content_suite
from daemon.testsuite import loader
from daemon.testsuite import snapshotter as snapshotter_suite
from daemon.testsuite.runner import Result


class _Case(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def doc(self) -> str: ...


@dataclass(frozen=True)
class Suite:
    """What the runner needs of a suite module: its ``CASES``, its ``run_suite``, and its needs."""

    plugin_type: str
    cases: Mapping[str, _Case]
    #: ``run_suite(factory, base, *, names, report) -> results``
    run: Callable[..., Awaitable[Sequence[Result]]]
    #: why the suite must run as root; empty if it need not
    needs_root: str = ""


SUITES = {
    "content": Suite("berth.content.v1", content_suite.CASES, content_suite.run_suite),
    "snapshotter": Suite(
        "berth.snapshotter.v1",
        snapshotter_suite.CASES,
        snapshotter_suite.run_suite,
        needs_root="the suite mounts filesystems",
    ),
}

EXIT_FAILED, EXIT_USAGE, EXIT_SKIPPED = 1, 2, 77


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m daemon.testsuite",
        description="Run a berth conformance suite against an installed plugin.",
    )
    p.add_argument("suite", choices=sorted(SUITES), help="which interface to check")
    p.add_argument("plugin", help="plugin full name (berth.snapshotter.v1.mysnap) or just its id (mysnap)")
    p.add_argument("-k", "--case", action="append", default=[], help="run only this case (repeatable)")
    p.add_argument("--list", action="store_true", help="list the cases and exit")
    p.add_argument("--config", help="a berthd config.toml whose plugin tables configure the plugin")
    p.add_argument("--dir", help="where to make the scratch directories (default: the system temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the scratch directories for inspection")
    p.add_argument("-v", "--verbose", action="store_true", help="show the daemon's debug log on stderr")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    suite = SUITES[args.suite]
    if args.list:
        for case in suite.cases.values():
            print(f"{case.name:40} {case.doc}")
        return 0
    unknown = [c for c in args.case if c not in suite.cases]
    if unknown:
        print(f"unknown case(s): {', '.join(unknown)} (see --list)", file=sys.stderr)
        return EXIT_USAGE
    if suite.needs_root and os.geteuid() != 0:
        print(f"{suite.needs_root}: run it as root", file=sys.stderr)
        return EXIT_USAGE
    full_name = args.plugin if args.plugin.startswith("berth.") else f"{suite.plugin_type}.{args.plugin}"
    logs.configure(level="debug" if args.verbose else "error")
    base = Path(tempfile.mkdtemp(prefix="berth-suite-", dir=args.dir))
    try:
        return asyncio.run(_run(full_name, base, args))
    finally:
        if args.keep:
            print(f"scratch directories kept in {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)


async def _run(full_name: str, base: Path, args: argparse.Namespace) -> int:
    suite = SUITES[args.suite]
    factory = loader.plugin_factory(full_name, config_path=args.config)
    # Start it once up front, so an unknown or broken plugin is one clear message, not N failures.
    try:
        async with factory(base / "probe"):
            pass
    except loader.PluginSkipped as exc:
        print(f"SKIP {full_name}: {exc}")
        return EXIT_SKIPPED
    except BerthError as exc:
        print(f"ERROR {full_name}: {exc}", file=sys.stderr)
        return EXIT_USAGE

    def report(r: Result) -> None:
        line = f"{r.status.upper():4} {r.name} ({r.seconds:.2f}s)"
        print(line + (f": {r.message}" if r.message else ""), flush=True)

    print(f"{args.suite} conformance suite: {full_name}", flush=True)
    results = await suite.run(factory, base / "cases", names=args.case, report=report)
    counts = {s: sum(r.status == s for r in results) for s in ("pass", "fail", "skip")}
    print(f"{counts['pass']} passed, {counts['fail']} failed, {counts['skip']} skipped")
    return EXIT_FAILED if counts["fail"] else 0


if __name__ == "__main__":
    sys.exit(main())
