"""``berth cri``: a crictl-like client of CRI ``runtime.v1`` on berthd's socket.

    berth cri version | info
    berth cri pods [--id I] [--name RE] [--namespace RE] [--state S] [--label K=V]... [-q] [-v] [--no-trunc]
    berth cri runp [--runtime H] POD.json | stopp ID... | rmp [-f] [-a] ID... | inspectp ID...
    berth cri create [--with-pull] POD_ID CONTAINER.json POD.json | start ID...
    berth cri run [--runtime H] [--with-pull] CONTAINER.json POD.json
    berth cri ps [-a] [--id I] [--pod P] [--name RE] [--state S] [--label K=V]... [--image RE] [-q]
    berth cri stop [-t SECONDS] ID... | rm [-f] [-a] ID... | inspect ID...
    berth cri logs [-f] [--tail N] [-t] ID
    berth cri exec [-s] [--timeout N] [-i] [-t] ID CMD...
    berth cri attach [-i] [-t] ID | port-forward POD [LOCAL:]REMOTE...
    berth cri images [-q] [--digests] [--no-trunc] [REF] | inspecti REF...
    berth cri pull [--creds U:P] [--auth B64] [--pod-config POD.json] REF
    berth cri rmi [-a] [--prune] [REF...] | imagefsinfo
    berth cri stats [--pod P] [--label K=V]... [ID] | statsp [--label K=V]... [ID] | events

Verbs, flags and output follow crictl's (``-o json`` on lists, JSON for
inspect*, ids cut to 13 characters); configuration files are crictl's JSON
(the CRI message with snake_case or camelCase names). A daemon refusal is one
line ``berth: <status>: <message>`` and exit 1. ``exec`` without ``-s`` streams
through the URL the Exec call returns (:mod:`daemon.streaming.client`) and
exits with the command's exit code, as does ``exec -s``; ``attach`` streams
the same way and exits with the container's. ``port-forward`` listens on
127.0.0.1 only (LOCAL 0 picks a port; the ``Forwarding from`` line names it).
"""

from __future__ import annotations

import argparse
import re

from grpclib.client import Channel

from daemon.cli import criio
from daemon.cli import criverbs as verbs
from daemon.cli.client import Client
from daemon.cli.commands import CliError, Handler
from daemon.cli.criclient import CriClient


def _label(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"label {text!r}: expected KEY=VALUE")
    return key, value


def _regex(text: str) -> re.Pattern[str]:
    try:
        return re.compile(text)
    except re.error as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: not a regular expression: {exc}") from None


def _output(p: argparse.ArgumentParser, choices: tuple[str, ...] = ("table", "json")) -> None:
    p.add_argument("--output", "-o", choices=choices, default=None, help="output format")


def _list_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--id", default="", help="id or unique prefix")
    p.add_argument("--name", type=_regex, default=None, help="names matching this regular expression")
    p.add_argument("--state", default="", help="filter by state")
    p.add_argument("--label", dest="labels", type=_label, action="append", default=[], metavar="K=V")
    p.add_argument("--quiet", "-q", action="store_true", help="ids only")
    p.add_argument("--verbose", "-v", action="store_true", help="details of each")
    p.add_argument("--no-trunc", action="store_true", help="full ids")
    p.add_argument("--last", "-n", type=int, default=0, help="the N most recently created")
    p.add_argument("--latest", "-l", action="store_true", help="the most recently created")
    _output(p)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> dict[str, Handler]:
    top = sub.add_parser("cri", help="CRI v1 client (crictl's verbs): pods, containers, images")
    sc = top.add_subparsers(dest="sub", required=True)
    sc.add_parser("version", help="runtime name, version and CRI API version")
    sc.add_parser("info", help="runtime status (conditions) and verbose info, as JSON")

    pods = sc.add_parser("pods", help="list pod sandboxes")
    _list_flags(pods)
    pods.add_argument(
        "--namespace", dest="pod_namespace", type=_regex, default=None, help="pod namespace regex"
    )

    runp = sc.add_parser("runp", help="run a pod sandbox from a PodSandboxConfig JSON file")
    runp.add_argument("--runtime", "-r", default="", help="runtime handler")
    runp.add_argument("pod_config", metavar="POD.json")
    stopp = sc.add_parser("stopp", help="stop pod sandboxes")
    stopp.add_argument("ids", nargs="+", metavar="ID")
    rmp = sc.add_parser("rmp", help="remove pod sandboxes")
    rmp.add_argument("--force", "-f", action="store_true", help="stop ready pods first")
    rmp.add_argument("--all", "-a", dest="all_", action="store_true", help="every pod sandbox")
    rmp.add_argument("ids", nargs="*", metavar="ID")
    inspectp = sc.add_parser("inspectp", help="pod sandbox status and verbose info, as JSON")
    inspectp.add_argument("ids", nargs="+", metavar="ID")
    _output(inspectp, ("json",))

    create = sc.add_parser("create", help="create a container in a pod")
    create.add_argument("--with-pull", action="store_true", help="pull the image first if missing")
    create.add_argument("pod_id", metavar="POD_ID")
    create.add_argument("container_config", metavar="CONTAINER.json")
    create.add_argument("pod_config", metavar="POD.json")
    start = sc.add_parser("start", help="start created containers")
    start.add_argument("ids", nargs="+", metavar="ID")
    run = sc.add_parser("run", help="run a pod and a container in it (runp + create + start)")
    run.add_argument("--runtime", "-r", default="", help="runtime handler")
    run.add_argument("--with-pull", action="store_true", help="pull the image first if missing")
    run.add_argument("container_config", metavar="CONTAINER.json")
    run.add_argument("pod_config", metavar="POD.json")

    ps = sc.add_parser("ps", help="list containers (running ones unless -a or --state)")
    _list_flags(ps)
    ps.add_argument("--all", "-a", dest="all_", action="store_true", help="all states")
    ps.add_argument("--pod", "-p", default="", help="containers of this pod (id or prefix)")
    ps.add_argument("--image", type=_regex, default=None, help="image regex")

    stop = sc.add_parser("stop", help="stop containers (SIGTERM, then SIGKILL after the timeout)")
    stop.add_argument("--timeout", "-t", dest="grace", type=int, default=0, help="seconds before SIGKILL")
    stop.add_argument("ids", nargs="+", metavar="ID")
    rm = sc.add_parser("rm", help="remove containers (not running ones, unless -f)")
    rm.add_argument("--force", "-f", action="store_true", help="stop running containers first")
    rm.add_argument("--all", "-a", dest="all_", action="store_true", help="every container")
    rm.add_argument("ids", nargs="*", metavar="ID")
    inspect = sc.add_parser("inspect", help="container status and verbose info, as JSON")
    inspect.add_argument("ids", nargs="+", metavar="ID")
    _output(inspect, ("json",))

    logs = sc.add_parser("logs", help="a container's log (the CRI log file)")
    logs.add_argument("--follow", "-f", action="store_true", help="follow until the container exits")
    logs.add_argument("--tail", type=int, default=-1, help="the last N lines (-1: all)")
    logs.add_argument("--timestamps", "-t", action="store_true", help="show each line's timestamp")
    logs.add_argument("id", metavar="ID")

    ex = sc.add_parser("exec", help="run a command in a running container")
    ex.add_argument("--sync", "-s", action="store_true", help="ExecSync: collect the output, then print")
    ex.add_argument("--timeout", dest="exec_timeout", type=int, default=0, help="seconds (with --sync)")
    ex.add_argument("--interactive", "-i", action="store_true", help="pass stdin")
    ex.add_argument("--tty", "-t", action="store_true", help="allocate a terminal")
    ex.add_argument("id", metavar="ID")
    ex.add_argument("cmd", nargs=argparse.REMAINDER, metavar="CMD")
    at = sc.add_parser("attach", help="attach to a running container's stdio until it exits")
    at.add_argument("--stdin", "-i", dest="interactive", action="store_true", help="pass stdin")
    at.add_argument("--tty", "-t", action="store_true", help="the container has a terminal")
    at.add_argument("id", metavar="ID")
    pf = sc.add_parser("port-forward", help="forward local ports (127.0.0.1) to ports of a pod")
    pf.add_argument("pod", metavar="POD")
    pf.add_argument("ports", nargs="+", metavar="[LOCAL:]REMOTE")

    images = sc.add_parser("images", aliases=["image", "img"], help="list images")
    images.add_argument("--quiet", "-q", action="store_true", help="image ids only")
    images.add_argument("--digests", action="store_true", help="show digests")
    images.add_argument("--no-trunc", action="store_true", help="full ids")
    images.add_argument("ref", nargs="?", default="", metavar="REF")
    _output(images)
    inspecti = sc.add_parser("inspecti", help="image status and verbose info, as JSON")
    inspecti.add_argument("refs", nargs="+", metavar="REF")
    pull = sc.add_parser("pull", help="pull an image")
    pull.add_argument("--creds", default="", metavar="USER[:PASSWORD]", help="registry credentials")
    pull.add_argument("--auth", default="", metavar="BASE64", help="base64 of USER:PASSWORD")
    pull.add_argument("--pod-config", default="", metavar="POD.json", help="the pod it is pulled for")
    pull.add_argument("ref", metavar="REF")
    rmi = sc.add_parser("rmi", help="remove images")
    rmi.add_argument("--all", "-a", dest="all_", action="store_true", help="every image")
    rmi.add_argument("--prune", "-q", action="store_true", help="every image no container uses")
    rmi.add_argument("refs", nargs="*", metavar="REF")
    sc.add_parser("imagefsinfo", help="image filesystem usage, as JSON")

    stats = sc.add_parser("stats", help="container resource usage")
    stats.add_argument("--pod", "-p", default="", help="containers of this pod")
    stats.add_argument("--label", dest="labels", type=_label, action="append", default=[], metavar="K=V")
    stats.add_argument("id", nargs="?", default="", metavar="ID")
    _output(stats)
    statsp = sc.add_parser("statsp", help="pod sandbox resource usage")
    statsp.add_argument("--label", dest="labels", type=_label, action="append", default=[], metavar="K=V")
    statsp.add_argument("id", nargs="?", default="", metavar="ID")
    _output(statsp)
    sc.add_parser("events", help="container events as they happen, one JSON line each")
    return {"cri": run_cri}


_STREAM_VERBS = {"attach": criio.attach, "port-forward": criio.port_forward}


async def run_cri(c: Client, args: argparse.Namespace) -> None:
    """Every verb on a channel of its own: CRI needs none of the native client's metadata."""
    if args.sub == "exec" and not args.cmd:
        raise CliError("exec: no command given (berth cri exec ID CMD...)")
    channel = Channel(path=c.address)
    try:
        verb = _STREAM_VERBS.get(args.sub) or verbs.VERBS[args.sub]
        await verb(CriClient.on(channel, args.timeout), args)
    finally:
        channel.close()


__all__ = ["register", "run_cri"]
