"""``berth version``, ``plugins``, ``namespaces`` and ``events``: the daemon itself rather than its stores."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from typing import Any

from daemon import __version__
from daemon.cli import output
from daemon.cli.client import Client
from daemon.cli.commands import Handler, parse_pairs, remove_each


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> dict[str, Handler]:
    sub.add_parser("version", help="client and server versions")

    plugins = sub.add_parser("plugins", help="loaded plugins").add_subparsers(dest="sub", required=True)
    pls = plugins.add_parser("ls", help="list plugins with their status")
    pls.add_argument("filters", nargs="*", help="containerd filters, e.g. type==berth.grpc.v1")

    ns = sub.add_parser("namespaces", aliases=["ns"], help="namespaces").add_subparsers(
        dest="sub", required=True
    )
    nls = ns.add_parser("ls", help="list namespaces")
    nls.add_argument("--quiet", "-q", action="store_true", help="names only")
    nc = ns.add_parser("create", help="create a namespace")
    nc.add_argument("name")
    nc.add_argument("labels", nargs="*", metavar="KEY=VALUE")
    nl = ns.add_parser("label", help="set (KEY=VALUE) or clear (KEY=) labels")
    nl.add_argument("name")
    nl.add_argument("labels", nargs="*", metavar="KEY=VALUE")
    nr = ns.add_parser("rm", help="remove namespaces (they must be empty)")
    nr.add_argument("names", nargs="+")

    ev = sub.add_parser("events", help="print events as they happen")
    ev.add_argument("filters", nargs="*", help='containerd filters, e.g. topic~="^/namespaces/"')
    return {
        "version": version,
        "plugins": plugins_cmd,
        "namespaces": namespaces,
        "ns": namespaces,
        "events": events,
    }


async def version(c: Client, args: argparse.Namespace) -> None:
    v = await c.version()
    info = await c.server_info()
    data = {
        "client": {"version": __version__},
        "server": {"version": v.version, "revision": v.revision, "uuid": info.uuid, "pid": info.pid},
    }
    if args.format == "json":
        output.emit_json(data)
        return
    print(f"Client:\n  Version:  {__version__}\n")
    print("Server:")
    print(
        f"  Version:  {v.version}\n  Revision: {v.revision}\n  UUID:     {info.uuid}\n  PID:      {info.pid}"
    )


async def plugins_cmd(c: Client, args: argparse.Namespace) -> None:
    plugins = await c.plugins(args.filters)
    rows = []
    for p in plugins:
        status = output.plugin_status(p)
        reason = p.init_err.message if p.init_err and p.init_err.message else ""
        rows.append(
            {
                "type": p.type,
                "id": p.id,
                "status": status,
                "requires": list(p.requires),
                "exports": dict(p.exports),
                "capabilities": list(p.capabilities),
                "error": reason,
            }
        )
    if args.format == "json":
        output.emit_json(rows)
        return
    output.table(
        ["TYPE", "ID", "STATUS", "MESSAGE"],
        [[r["type"], r["id"], r["status"], r["error"]] for r in rows],
    )


async def namespaces(c: Client, args: argparse.Namespace) -> None:
    if args.sub == "ls":
        spaces = await c.list_namespaces()
        if args.format == "json":
            output.emit_json([{"name": n.name, "labels": dict(n.labels)} for n in spaces])
        elif args.quiet:
            for n in spaces:
                print(n.name)
        else:
            output.table(
                ["NAME", "LABELS"],
                [[n.name, output.labels_text(dict(n.labels))] for n in spaces],
            )
    elif args.sub == "create":
        created = await c.create_namespace(args.name, parse_pairs(args.labels, "label"))
        _report(args, {"name": created.name, "labels": dict(created.labels)}, created.name)
    elif args.sub == "label":
        labels = parse_pairs(args.labels, "label")
        updated = await c.label_namespace(args.name, labels)
        _report(args, {"name": updated.name, "labels": dict(updated.labels)}, updated.name)
    elif args.sub == "rm":
        await remove_each("namespace", args.names, c.delete_namespace)


def _report(args: argparse.Namespace, data: Any, text: str) -> None:
    if args.format == "json":
        output.emit_json(data)
    else:
        print(text)


async def events(c: Client, args: argparse.Namespace) -> None:
    async for env in c.subscribe(args.filters):
        payload = output.decode_any(env.event)
        ts = env.timestamp.astimezone(UTC) if env.timestamp else datetime.now(UTC)
        if args.format == "json":
            output.emit_json(
                {
                    "timestamp": ts.isoformat(),
                    "namespace": env.namespace,
                    "topic": env.topic,
                    "event": payload,
                },
                compact=True,
            )
        else:
            text = json.dumps(payload, sort_keys=True, default=str)
            print(f"{ts.isoformat()} {env.namespace} {env.topic} {text}")
        sys.stdout.flush()


__all__ = ["register"]
