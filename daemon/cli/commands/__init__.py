"""Command groups of the ``berth`` CLI, one module each.

Each module has ``register(sub)``: it adds its parsers to the top-level
subparsers and returns the handler of each command name (aliases included).
A handler takes the :class:`~daemon.cli.client.Client` and the parsed
arguments; it raises ``GRPCError`` for the daemon's refusals (``berth`` prints
one line and exits 1) and :class:`CliError` for the operator's mistakes found
before calling the daemon.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Awaitable, Callable, Sequence

from grpclib.exceptions import GRPCError

from daemon.cli import output
from daemon.cli.client import Client

Handler = Callable[[Client, argparse.Namespace], Awaitable[None]]


class CliError(Exception):
    """A mistake in the command line or a local file; ``berth`` prints it as one line and exits 1."""


def parse_pairs(items: Sequence[str], what: str) -> dict[str, str]:
    """``KEY=VALUE`` arguments (``--label``) as a dict, later keys winning; CliError names ``what``."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CliError(f"{what} {item!r}: expected KEY=VALUE")
        out[key] = value
    return out


async def remove_each(kind: str, names: Sequence[str], remove: Callable[[str], Awaitable[object]]) -> None:
    """Remove every name, printing each one removed; one refusal does not stop the rest.

    Each refusal is printed as ``berth: <kind> <name>: <status>``; any refusal
    makes ``berth`` exit 1 once all names were tried (as ``ctr ... rm`` does).
    """
    failed = False
    for name in names:
        try:
            await remove(name)
        except GRPCError as exc:
            failed = True
            print(f"berth: {kind} {name}: {output.status_text(exc)}", file=sys.stderr)
            continue
        print(name)
    if failed:
        raise SystemExit(1)


__all__ = ["CliError", "Handler", "parse_pairs", "remove_each"]
