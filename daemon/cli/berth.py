"""``berth``: the operator's CLI, a client of berthd's containerd-compatible API.

    berth [--address A] [--namespace N] [--format table|json] COMMAND
      version
      plugins ls [FILTER...]
      namespaces ls | create NAME [KEY=VALUE...] | rm NAME... | label NAME [KEY=VALUE...]
      events [FILTER...]
      images pull [--platform P] [--snapshotter S] [--user U[:PASS]] [--no-unpack] REF
      images ls [-q] [FILTER...] | rm [--sync] REF... | inspect REF
      images import [--name N] [--no-unpack] FILE|- | export FILE|- REF...
      snapshots [--snapshotter S] ls [FILTER...] | tree | rm KEY...
      content ls [FILTER...] | get DIGEST | rm DIGEST...
      gc
      run [--rm] [-t] [-d] [--env K=V]... [--mount SPEC]... [--user U] [--cwd D]
          [--memory-limit BYTES] [--cpus N] [--snapshotter S] [--label K=V]... IMAGE ID [CMD...]
      containers ls [FILTER...] | info ID | rm [--keep-snapshot] ID...
      tasks ls | start [-t] [-d] ID | kill [-s SIG] [--all] [--exec-id X] ID | ps ID
            | exec [-t] [-d] --exec-id X [--cwd D] [--env K=V]... ID CMD...
            | pause ID | resume ID | metrics ID

It speaks only the wire API (like ``ctr``), so whatever it can do, any
containerd client can do too. Exit codes: 0 ok, 1 the daemon said no (the
gRPC status is printed), 2 usage, 3 the daemon cannot be reached.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import structlog
from grpclib.client import Channel
from grpclib.exceptions import GRPCError, StreamTerminatedError

from daemon import __version__
from daemon.cli import output
from daemon.cli.client import Client, DaemonUnreachable
from daemon.cli.commands import CliError, Handler, remove_each
from daemon.cli.commands import containers as containers_cmd
from daemon.cli.commands import content as content_cmd
from daemon.cli.commands import cri as cri_cmd
from daemon.cli.commands import gc as gc_cmd
from daemon.cli.commands import images as images_cmd
from daemon.cli.commands import run as run_cmd
from daemon.cli.commands import snapshots as snapshots_cmd
from daemon.cli.commands import tasks as tasks_cmd
from daemon.cli.taskclient import TaskClient
from daemon.config import DEFAULT_GRPC_ADDRESS
from daemon.errors import BerthError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="berth", description="operate a berthd")
    p.add_argument(
        "--address",
        "-a",
        default=os.environ.get("BERTH_ADDRESS", DEFAULT_GRPC_ADDRESS),
        help="berthd socket (env BERTH_ADDRESS)",
    )
    p.add_argument(
        "--namespace",
        "-n",
        default=os.environ.get("BERTH_NAMESPACE", "default"),
        help="namespace (env BERTH_NAMESPACE)",
    )
    p.add_argument("--format", choices=["table", "json"], default="table", help="output format")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per call (not for events)")
    sub = p.add_subparsers(dest="command", required=True)

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
    for group in (images_cmd, snapshots_cmd, content_cmd, gc_cmd, run_cmd, containers_cmd, tasks_cmd):
        COMMANDS.update(group.register(sub))
    COMMANDS.update(cri_cmd.register(sub))
    return p


def _labels(items: Sequence[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"berth: label {item!r}: expected KEY=VALUE")
        out[key] = value
    return out


async def _version(c: Client, args: argparse.Namespace) -> None:
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


async def _plugins(c: Client, args: argparse.Namespace) -> None:
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


async def _namespaces(c: Client, args: argparse.Namespace) -> None:
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
        created = await c.create_namespace(args.name, _labels(args.labels))
        _report(args, {"name": created.name, "labels": dict(created.labels)}, created.name)
    elif args.sub == "label":
        labels = _labels(args.labels)
        updated = await c.label_namespace(args.name, labels)
        _report(args, {"name": updated.name, "labels": dict(updated.labels)}, updated.name)
    elif args.sub == "rm":
        await remove_each("namespace", args.names, c.delete_namespace)


def _report(args: argparse.Namespace, data: Any, text: str) -> None:
    if args.format == "json":
        output.emit_json(data)
    else:
        print(text)


async def _events(c: Client, args: argparse.Namespace) -> None:
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


COMMANDS: dict[str, Handler] = {
    "version": _version,
    "plugins": _plugins,
    "namespaces": _namespaces,
    "ns": _namespaces,
    "events": _events,
}


async def _main(args: argparse.Namespace) -> int:
    address = args.address.removeprefix("unix://")
    channel = Channel(path=address)
    try:
        client = TaskClient(
            channel, address, args.namespace, None if args.command == "events" else args.timeout
        )
        await client.check_reachable()
        await COMMANDS[args.command](client, args)
    finally:
        channel.close()
    return 0


def _quiet_logs() -> None:
    """Library logs (daemon.mount, ...) as warnings and up, on stderr: stdout is the command's output."""
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
    )


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _quiet_logs()
    try:
        return asyncio.run(_main(args))
    except DaemonUnreachable as exc:
        print(f"berth: {exc}", file=sys.stderr)
        return 3
    except GRPCError as exc:
        print(f"berth: {output.status_text(exc)}", file=sys.stderr)
        return 1
    except (CliError, BerthError) as exc:
        print(f"berth: {exc}", file=sys.stderr)
        return 1
    except StreamTerminatedError as exc:
        print(f"berth: connection to berthd lost: {exc}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
