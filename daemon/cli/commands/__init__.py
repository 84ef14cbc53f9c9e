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
from collections.abc import Awaitable, Callable

from daemon.cli.client import Client

Handler = Callable[[Client, argparse.Namespace], Awaitable[None]]


class CliError(Exception):
    """A mistake in the command line or a local file; ``berth`` prints it as one line and exits 1."""


__all__ = ["CliError", "Handler"]
