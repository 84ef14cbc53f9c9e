"""The ADD result of each attachment, on disk, as libcni keeps it in ``/var/lib/cni/results``.

DEL must tear down what ADD made even when the conf dir changed since or
berthd restarted in between: it needs the same plugin list and the ADD
result (its ``prevResult``). One JSON file per attachment
(``<dir>/results/<network>-<container id>-<ifname>``) holds both, in
libcni's ``cniCacheV1`` shape (the config base64 encoded). Writes are atomic
(a temporary file renamed over), so a crash leaves the old entry or the new
one. All functions here are blocking; callers use :func:`asyncio.to_thread`.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from plugins.cri.cni.config import NetworkConfigList, parse

log = structlog.get_logger("berth.cri.cni")

KIND = "cniCacheV1"


@dataclass(frozen=True)
class CacheEntry:
    """One attachment: the network it used and the result ADD returned."""

    container_id: str
    ifname: str
    network: NetworkConfigList
    result: dict[str, Any]
    cni_args: tuple[tuple[str, str], ...] = ()
    capability_args: dict[str, Any] | None = None


def _path(cache_dir: Path, network: str, container_id: str, ifname: str) -> Path:
    return cache_dir / "results" / f"{network}-{container_id}-{ifname}"


def save(cache_dir: Path, entry: CacheEntry) -> Path:
    """Store ``entry`` (replacing any earlier one of the same attachment)."""
    path = _path(cache_dir, entry.network.name, entry.container_id, entry.ifname)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    doc = {
        "kind": KIND,
        "containerId": entry.container_id,
        "ifName": entry.ifname,
        "networkName": entry.network.name,
        "config": base64.b64encode(json.dumps(entry.network.to_json()).encode()).decode(),
        "cniArgs": [list(kv) for kv in entry.cni_args],
        "capabilityArgs": entry.capability_args or {},
        "result": entry.result,
    }
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def _read(path: Path) -> CacheEntry | None:
    try:
        doc = json.loads(path.read_bytes())
        if doc.get("kind") != KIND:
            return None
        network = parse(base64.b64decode(doc["config"]), path.with_suffix(".conflist"))
        return CacheEntry(
            str(doc["containerId"]),
            str(doc["ifName"]),
            network,
            dict(doc.get("result") or {}),
            tuple((str(k), str(v)) for k, v in doc.get("cniArgs") or []),
            dict(doc.get("capabilityArgs") or {}) or None,
        )
    except Exception as exc:  # noqa: BLE001 - a corrupt entry must not block DEL with the current config
        log.warning("cni.cache.corrupt", path=str(path), error=str(exc))
        return None


def load(cache_dir: Path, container_id: str, ifname: str) -> CacheEntry | None:
    """The entry of ``container_id``/``ifname`` whatever network it used; None if there is none."""
    results = cache_dir / "results"
    try:
        names = os.listdir(results)
    except FileNotFoundError:
        return None
    suffix = f"-{container_id}-{ifname}"
    for name in sorted(names):
        if name.endswith(suffix) and not name.startswith(".tmp-"):
            entry = _read(results / name)
            if entry is not None and entry.container_id == container_id and entry.ifname == ifname:
                return entry
    return None


def remove(cache_dir: Path, network: str, container_id: str, ifname: str) -> None:
    """Forget an attachment; quiet if it was never stored."""
    with contextlib.suppress(FileNotFoundError):
        _path(cache_dir, network, container_id, ifname).unlink()
