"""Label sidecars: ``labels/<alg>/<hex>``, one small JSON file per labelled blob.

See :mod:`plugins.content.local.layout` for why sidecars and not a database.
All functions block; callers run them in a worker thread.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import structlog

from daemon.metadata.encoding import to_datetime
from plugins.content.local.layout import DIR_MODE, to_ns, write_atomic

log = structlog.get_logger("berth.content")


@dataclass(frozen=True)
class Sidecar:
    labels: dict[str, str]
    updated_at: datetime


def read(path: Path) -> Sidecar | None:
    """The sidecar at ``path``; None when there is none (or it is unreadable, logged)."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        doc = json.loads(raw)
        labels = doc["labels"]
        if not isinstance(labels, dict):
            raise TypeError("labels is not an object")
        return Sidecar({str(k): str(v) for k, v in labels.items()}, to_datetime(int(doc["updated_at"])))
    except (ValueError, KeyError, TypeError) as exc:
        # A torn file after power loss: the blob itself is intact, only its labels are lost.
        log.warning("content.labels_unreadable", path=str(path), error=str(exc))
        return None


def write(path: Path, labels: Mapping[str, str], updated_at: datetime) -> None:
    """Replace the sidecar durably (it must not be lost once the call that set it returned)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
    doc = {"labels": dict(sorted(labels.items())), "updated_at": to_ns(updated_at)}
    write_atomic(path, json.dumps(doc, ensure_ascii=False).encode(), durable=True)


def remove(path: Path) -> None:
    path.unlink(missing_ok=True)
