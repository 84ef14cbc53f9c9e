"""structlog set-up: one place decides how berthd's log lines look.

Every line is an event with key/values and always carries ``plugin`` (the
core's own lines say ``plugin="berthd"``), so an operator can grep one
plugin's story out of a busy node's log. Libraries that use the standard
``logging`` module (grpclib, aiohttp) are routed through the same renderer.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import structlog

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
CORE = "berthd"


def _default_plugin(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
    event.setdefault("plugin", CORE)
    return event


def configure(level: str = "info", fmt: str = "console", stream: TextIO | None = None) -> None:
    """Configure structlog (and stdlib logging) for the whole process.

    ``fmt`` is ``json`` (one object per line, for collectors) or ``console``
    (aligned key=value, for people). Safe to call again, e.g. in tests.
    """
    out = stream or sys.stderr
    lvl = LEVELS.get(level, logging.INFO)
    renderer: Any
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer(sort_keys=False)
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=False, pad_event_to=24)
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _default_plugin,
    ]
    structlog.configure(
        processors=[
            *shared,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=structlog.PrintLoggerFactory(file=out),
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(out)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
            foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    # Library chatter below WARNING is noise for operators even at debug.
    root.setLevel(max(lvl, logging.WARNING))
