"""Output helpers of the ``berth`` CLI: tables, JSON, statuses, event payloads."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
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


def human_size(size: int) -> str:
    """``1.5 MiB``: binary units with one decimal, as ``ctr`` shows sizes."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def human_age(seconds: float) -> str:
    """``45s``, ``3m``, ``5h``, ``2d``: how long ago, in the largest whole unit."""
    s = max(0, int(seconds))
    for unit, length in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= length:
            return f"{s // length}{unit}"
    return f"{s}s"


def labels_text(labels: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))


def timestamp(value: datetime | None) -> str | None:
    """An RFC 3339 UTC time for JSON output; None for an unset protobuf timestamp."""
    if value is None or value.timestamp() <= 0:
        return None
    return value.astimezone(UTC).isoformat()
