"""``berth gc``: run the garbage collector now and say what it freed."""

from __future__ import annotations

import argparse
import sys

from daemon.cli import output
from daemon.cli.client import Client
from daemon.cli.commands import Handler


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> dict[str, Handler]:
    sub.add_parser("gc", help="collect garbage now (every namespace) and print what was freed")
    return {"gc": run}


async def run(c: Client, args: argparse.Namespace) -> None:
    r = await c.collect_garbage()
    # Backend errors did not stop the collection (the next one retries): warnings, not a failure.
    for error in r.errors:
        print(f"berth: gc: warning: {error}", file=sys.stderr)
    if args.format == "json":
        output.emit_json(
            {
                "content_removed": r.content_removed,
                "snapshots_removed": r.snapshots_removed,
                "leases_expired": r.leases_expired,
                "bytes_freed": r.bytes_freed,
                "seconds": r.seconds,
                "errors": list(r.errors),
            }
        )
        return
    print(f"content removed:    {r.content_removed}")
    print(f"snapshots removed:  {r.snapshots_removed}")
    print(f"leases expired:     {r.leases_expired}")
    print(f"bytes freed:        {output.human_size(r.bytes_freed)} ({r.bytes_freed})")
    print(f"took:               {r.seconds:.3f}s")
