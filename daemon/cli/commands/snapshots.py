"""``berth snapshots``: ls, tree, rm in one snapshotter (``--snapshotter``, default the images plugin's)."""

from __future__ import annotations

import argparse
import os
from typing import Any

from daemon.cli import output
from daemon.cli.client import Client
from daemon.cli.commands import Handler, remove_each
from daemon.cli.imagetree import default_snapshotter
from protos.containerd.services.snapshots.v1 import Info


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> dict[str, Handler]:
    p = sub.add_parser("snapshots", aliases=["snapshot", "sn"], help="snapshots")
    p.add_argument(
        "--snapshotter",
        "-s",
        default=os.environ.get("BERTH_SNAPSHOTTER", ""),
        help="snapshotter (env BERTH_SNAPSHOTTER; default: the images plugin's)",
    )
    sn = p.add_subparsers(dest="sub", required=True)
    ls = sn.add_parser("ls", aliases=["list"], help="list snapshots: KEY PARENT KIND")
    ls.add_argument("filters", nargs="*", metavar="FILTER", help="containerd filters, e.g. kind==committed")
    sn.add_parser("tree", help="snapshots as a tree of parents and children")
    rm = sn.add_parser("rm", aliases=["remove", "delete"], help="remove snapshots (children first)")
    rm.add_argument("keys", nargs="+", metavar="KEY")
    return {"snapshots": run, "snapshot": run, "sn": run}


def kind_name(info: Info) -> str:
    return info.kind.name.lower() if info.kind.name else str(int(info.kind))


def snapshot_json(info: Info) -> dict[str, Any]:
    return {
        "name": info.name,
        "parent": info.parent,
        "kind": kind_name(info),
        "labels": dict(info.labels),
        "created_at": output.timestamp(info.created_at),
        "updated_at": output.timestamp(info.updated_at),
    }


async def run(c: Client, args: argparse.Namespace) -> None:
    snapshotter = await default_snapshotter(c, args.snapshotter)
    if args.sub in ("rm", "remove", "delete"):
        await remove_each("snapshot", args.keys, lambda key: c.remove_snapshot(snapshotter, key))
        return
    infos = sorted(await c.list_snapshots(snapshotter, getattr(args, "filters", [])), key=lambda i: i.name)
    if args.sub == "tree":
        _tree(infos, args.format)
    elif args.format == "json":
        output.emit_json([snapshot_json(i) for i in infos])
    else:
        output.table(["KEY", "PARENT", "KIND"], [[i.name, i.parent, kind_name(i)] for i in infos])


def _tree(infos: list[Info], fmt: str) -> None:
    """Roots (no parent, or a parent not listed) first, each child indented under its parent."""
    names = {i.name for i in infos}
    children: dict[str, list[Info]] = {}
    roots: list[Info] = []
    for info in infos:
        if info.parent and info.parent in names:
            children.setdefault(info.parent, []).append(info)
        else:
            roots.append(info)

    def node(info: Info) -> dict[str, Any]:
        return {**snapshot_json(info), "children": [node(ch) for ch in children.get(info.name, [])]}

    if fmt == "json":
        output.emit_json([node(r) for r in roots])
        return

    def show(info: Info, level: int) -> None:
        print(("  " * level + "\\_ " if level else "") + info.name)
        for child in children.get(info.name, []):
            show(child, level + 1)

    for root in roots:
        show(root, 0)
