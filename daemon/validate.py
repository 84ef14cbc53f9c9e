"""Request validation shared by every gRPC service.

Each check raises :class:`daemon.errors.InvalidArgument` with the field's
wire name first (``namespace.name: must not be empty``), so a client sees
which part of its request is wrong without reading berth's code.
"""

from __future__ import annotations

from typing import TypeVar

from daemon.errors import InvalidArgument

T = TypeVar("T")


def required(value: T | None, field: str) -> T:
    """``value`` if it is set (non-empty, non-None); InvalidArgument naming ``field`` if not."""
    if value is None or value == "" or value == b"":
        raise InvalidArgument(f"{field}: must not be empty")
    return value
