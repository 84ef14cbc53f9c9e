"""Output helpers of the ``berth`` CLI: tables, JSON, statuses, event payloads."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any

import betterproto
import betterproto.lib.google.protobuf as pb
from grpclib.exceptions import GRPCError

from daemon import typeurl


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """Left-aligned columns separated by at least three spaces, like ``ctr``."""
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]
    for row in [list(headers), *rows]:
        line = "   ".join(c.ljust(w) for c, w in zip(row, widths, strict=True))
        print(line.rstrip())


def emit_json(data: Any, compact: bool = False) -> None:
    if compact:
        sys.stdout.write(json.dumps(data, sort_keys=True, default=str) + "\n")
    else:
        sys.stdout.write(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def status_text(exc: GRPCError) -> str:
    """``not found: namespace "x": not found`` from a gRPC error."""
    return f"{exc.status.name.lower().replace('_', ' ')}: {exc.message}"


def plugin_status(p: Any) -> str:
    """ok/skip/error, decided the way ``ctr plugins ls`` decides it."""
    err = p.init_err
    if err is None or (not err.message and not err.code):
        return "ok"
    return "skip" if "skip plugin" in err.message else "error"


def decode_any(event: pb.Any | None) -> Any:
    """An event payload as JSON-able data: decoded when its type is known."""
    if event is None:
        return None
    msg = typeurl.decode_any(event)
    if msg is None:
        return {"type_url": event.type_url, "value": event.value.hex()}
    return {"type": event.type_url, **msg.to_pydict(casing=betterproto.Casing.SNAKE)}
