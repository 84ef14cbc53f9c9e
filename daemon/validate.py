"""Request validation shared by every gRPC service.

Each check raises :class:`daemon.errors.InvalidArgument` with the field's
wire name first (``namespace.name: must not be empty``), so a client sees
which part of its request is wrong without reading berth's code.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

from daemon.errors import InvalidArgument

T = TypeVar("T")


def required(value: T | None, field: str) -> T:
    """``value`` if it is set (non-empty, non-None); InvalidArgument naming ``field`` if not."""
    if value is None or value == "" or value == b"":
        raise InvalidArgument(f"{field}: must not be empty")
    return value


def label_paths(paths: Sequence[str], owner: str) -> list[str]:
    """The field mask of an update that may only touch labels (``labels``, ``labels.<key>``).

    Any other path is InvalidArgument naming ``update_mask.paths`` and ``owner``
    (e.g. ``content sha256:...``), as containerd refuses it.
    """
    out = list(paths)
    for path in out:
        if path != "labels" and not path.startswith("labels."):
            raise InvalidArgument(f"update_mask.paths: cannot update {path!r} field of {owner}")
    return out
