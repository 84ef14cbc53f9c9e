"""How values are stored in columns: one place, so every table agrees.

* Timestamps: INTEGER nanoseconds since the Unix epoch, UTC. Integers sort
  and compare in SQL, never carry a time zone, and keep the precision of
  containerd's protobuf Timestamps. Python sees aware UTC datetimes, which
  hold microseconds: the sub-microsecond part is dropped on the way out.
* Labels: TEXT holding a JSON object with sorted keys. Labels are always
  read and written whole with their object, and SQLite's json functions can
  still filter on them (``json_extract(labels, '$."key"')``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def now_ns() -> int:
    """The current time as stored: integer nanoseconds UTC."""
    return time.time_ns()


def to_datetime(ns: int) -> datetime:
    """A stored timestamp as an aware UTC datetime (microsecond precision)."""
    return _EPOCH + timedelta(microseconds=ns // 1000)


def from_datetime(value: datetime) -> int:
    """An aware datetime as a stored timestamp; naive datetimes are refused (ambiguous)."""
    if value.tzinfo is None:
        raise ValueError("naive datetime: a stored timestamp needs a time zone")
    delta = value - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000_000 + delta.microseconds * 1000


def encode_labels(labels: Mapping[str, str]) -> str:
    return json.dumps(dict(labels), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def decode_labels(text: str) -> dict[str, str]:
    value = json.loads(text) if text else {}
    if not isinstance(value, dict):
        raise ValueError(f"stored labels are not a JSON object: {text[:80]!r}")
    return {str(k): str(v) for k, v in value.items()}
