"""``berth content``: ls, get (to stdout), rm of the namespace's blobs."""

from __future__ import annotations

import argparse
import asyncio
import sys
from datetime import UTC, datetime

from daemon.cli import output
from daemon.cli.client import Client
from daemon.cli.commands import Handler, remove_each


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> dict[str, Handler]:
    content = sub.add_parser("content", help="content store blobs").add_subparsers(dest="sub", required=True)
    ls = content.add_parser("ls", aliases=["list"], help="list blobs: DIGEST SIZE AGE LABELS")
    ls.add_argument("--quiet", "-q", action="store_true", help="digests only")
    ls.add_argument("filters", nargs="*", metavar="FILTER", help='containerd filters, e.g. labels."x"==y')
    get = content.add_parser("get", help="write a blob to stdout")
    get.add_argument("digest", metavar="DIGEST")
    rm = content.add_parser("rm", aliases=["remove", "delete"], help="remove blobs from the namespace")
    rm.add_argument("digests", nargs="+", metavar="DIGEST")
    return {"content": run}


async def run(c: Client, args: argparse.Namespace) -> None:
    if args.sub in ("ls", "list"):
        await _ls(c, args)
    elif args.sub == "get":
        out = sys.stdout.buffer
        async for data in c.read_content(args.digest):
            await asyncio.to_thread(out.write, data)
        await asyncio.to_thread(out.flush)
    else:
        await remove_each("content", args.digests, c.delete_content)


async def _ls(c: Client, args: argparse.Namespace) -> None:
    infos = sorted(await c.list_content(args.filters), key=lambda i: i.digest)
    if args.quiet:
        for info in infos:
            print(info.digest)
        return
    if args.format == "json":
        output.emit_json(
            [
                {
                    "digest": i.digest,
                    "size": i.size,
                    "labels": dict(i.labels),
                    "created_at": output.timestamp(i.created_at),
                    "updated_at": output.timestamp(i.updated_at),
                }
                for i in infos
            ]
        )
        return
    now = datetime.now(UTC)
    output.table(
        ["DIGEST", "SIZE", "AGE", "LABELS"],
        [
            [
                i.digest,
                output.human_size(i.size),
                output.human_age((now - i.created_at).total_seconds())
                if output.timestamp(i.created_at)
                else "-",
                output.labels_text(dict(i.labels)) or "-",
            ]
            for i in infos
        ],
    )
