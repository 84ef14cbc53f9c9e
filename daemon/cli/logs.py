"""Where library logs go in the ``berth`` CLI: warnings and up, on stderr (stdout is the command's output).

structlog's own default prints every level to stdout, so it must be
configured before a library module (``daemon.mount``, the streaming client)
logs. Importing structlog costs a short command a noticeable part of its
run, so the CLI configures it only when it is loaded: :func:`quiet_logs_if_loaded`
once the command's module is imported, :func:`quiet_logs` by code that imports
a logging module later, lazily.
"""

from __future__ import annotations

import logging
import sys


def quiet_logs() -> None:
    """Library logs as warnings and up, on stderr (imports structlog)."""
    import structlog

    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
    )


def quiet_logs_if_loaded() -> None:
    """:func:`quiet_logs` when structlog is already imported (by whatever the command imported)."""
    if "structlog" in sys.modules:
        quiet_logs()


__all__ = ["quiet_logs", "quiet_logs_if_loaded"]
