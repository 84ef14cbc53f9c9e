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

Start-up is most of a short command's time, so this module imports almost
nothing: the command word is found first (:func:`command_word`, the same
global options as the real parser), then only that command's module
(:data:`GROUPS`) is imported and registers its parser; the other commands get
an empty parser carrying their name and help, for ``berth --help`` and the
usage line. asyncio, grpclib and betterproto come with the command module;
structlog only if something on the command's path logs.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from daemon.cli.commands import Handler

#: berthd's default socket: :data:`daemon.config.DEFAULT_GRPC_ADDRESS`, not imported (daemon.config
#: brings the whole configuration machinery along); tests/unit/test_cli_startup.py keeps them equal.
DEFAULT_ADDRESS = "/run/berth/berth.sock"


class Command(NamedTuple):
    name: str
    aliases: tuple[str, ...]
    help: str


class Group(NamedTuple):
    """A command module (``register(sub)`` adds its parsers, returns its handlers) and what it registers.

    ``commands`` repeats the names and help the module's ``register`` gives, so
    that ``berth --help`` lists every command without importing any module;
    tests/unit/test_cli_startup.py checks that the two agree. ``lean``: the
    command never leaves berthd's unix socket (ssl is kept out, see :mod:`daemon.lean`).
    """

    module: str
    commands: tuple[Command, ...]
    lean: bool = True


GROUPS: tuple[Group, ...] = (
    Group(
        "daemon.cli.commands.server",
        (
            Command("version", (), "client and server versions"),
            Command("plugins", (), "loaded plugins"),
            Command("namespaces", ("ns",), "namespaces"),
            Command("events", (), "print events as they happen"),
        ),
    ),
    Group("daemon.cli.commands.images", (Command("images", ("image", "i"), "images"),)),
    Group("daemon.cli.commands.snapshots", (Command("snapshots", ("snapshot", "sn"), "snapshots"),)),
    Group("daemon.cli.commands.content", (Command("content", (), "content store blobs"),)),
    Group(
        "daemon.cli.commands.gc",
        (Command("gc", (), "collect garbage now (every namespace) and print what was freed"),),
    ),
    Group("daemon.cli.commands.run", (Command("run", (), "run a container from an image (like ctr run)"),)),
    Group("daemon.cli.commands.containers", (Command("containers", ("container", "c"), "containers"),)),
    Group("daemon.cli.commands.tasks", (Command("tasks", ("task", "t"), "tasks (running containers)"),)),
    Group(
        "daemon.cli.commands.cri",
        (Command("cri", (), "CRI v1 client (crictl's verbs): pods, containers, images"),),
        lean=False,
    ),
)

#: Every command name and alias -> its group.
GROUP_OF: dict[str, Group] = {name: g for g in GROUPS for c in g.commands for name in (c.name, *c.aliases)}

#: Handlers of the commands whose modules were registered so far (by :func:`build_parser`).
COMMANDS: dict[str, Handler] = {}


def _global_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--address",
        "-a",
        default=os.environ.get("BERTH_ADDRESS", DEFAULT_ADDRESS),
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


class _NoCommand(Exception):
    pass


class _ScanParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise _NoCommand(message)


def command_word(argv: Sequence[str]) -> str | None:
    """The command ``argv`` names (``run`` in ``berth -a S run --rm ...``), None when it names none.

    Parsed with the real global options (abbreviations, ``-aS``, ``--x=y``
    behave the same); whatever is wrong with them is left for the real parser to report.
    """
    scan = _ScanParser(prog="berth", add_help=False)
    _global_options(scan)
    scan.add_argument("command", nargs="?")
    scan.add_argument("rest", nargs=argparse.REMAINDER)
    try:
        known, _ = scan.parse_known_args(argv)
    except _NoCommand:
        return None
    return known.command if isinstance(known.command, str) else None


def build_parser(groups: Iterable[Group]) -> argparse.ArgumentParser:
    """The full parser of ``groups`` (their modules imported, handlers in :data:`COMMANDS`); the
    other commands get a parser with their name and help only."""
    wanted = set(groups)
    p = argparse.ArgumentParser(prog="berth", description="operate a berthd")
    _global_options(p)
    sub = p.add_subparsers(dest="command", required=True)
    for group in GROUPS:
        if group in wanted:
            COMMANDS.update(importlib.import_module(group.module).register(sub))
            continue
        for c in group.commands:
            sub.add_parser(c.name, aliases=list(c.aliases), help=c.help)
    return p


def _parser() -> argparse.ArgumentParser:
    """Every command registered (imports every command module): for tools that drive the handlers."""
    return build_parser(GROUPS)


async def _main(args: argparse.Namespace) -> int:
    from grpclib.client import Channel

    from daemon.cli.taskclient import TaskClient

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


def main(argv: list[str] | None = None) -> int:
    """Run one command; its exit status is returned.

    Without ``argv`` this is the program itself (the ``berth`` script): the
    process is trimmed first (:func:`daemon.lean.trim`) and, once the
    command is done and stdout/stderr are flushed, ends with ``os._exit``:
    interpreter teardown (freeing every module) would add ~15 ms to each
    command and there is nothing left to run (asyncio.run joined its
    threads; files, FIFOs, terminal modes are restored by the commands
    themselves). A traceback from a bug still exits the normal way.
    """
    if argv is not None:
        return _run(argv, trim=False)
    try:
        code = _run(sys.argv[1:], trim=True)
    except SystemExit as exc:
        code = _exit_status(exc)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError):  # the reader went away (berth ... | head)
            stream.flush()
    os._exit(code)


def _exit_status(exc: SystemExit) -> int:
    """What the interpreter would exit with for ``exc`` (printing a message code as it would)."""
    if exc.code is None:
        return 0
    if isinstance(exc.code, int):
        return exc.code
    print(exc.code, file=sys.stderr)
    return 1


def _run(argv: list[str], *, trim: bool) -> int:
    group = GROUP_OF.get(command_word(argv) or "")
    if trim and group is not None:
        from daemon import lean

        lean.trim(block_ssl=group.lean)
    args = build_parser([group] if group else []).parse_args(argv)

    import asyncio

    from grpclib.exceptions import GRPCError, StreamTerminatedError

    from daemon.cli import output
    from daemon.cli.client import DaemonUnreachable
    from daemon.cli.commands import CliError
    from daemon.cli.logs import quiet_logs, quiet_logs_if_loaded
    from daemon.errors import BerthError

    if group is None or group.lean:
        quiet_logs_if_loaded()
    else:
        quiet_logs()  # its streaming verbs import logging modules lazily
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
