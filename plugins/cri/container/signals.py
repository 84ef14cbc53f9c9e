"""Which signal stops a container: CRI's Signal enum and the image's StopSignal as host numbers."""

from __future__ import annotations

import signal
from typing import Any

from daemon.errors import InvalidArgument
from protos.runtime import v1 as cri


def signal_number(sig: cri.Signal) -> int:
    """CRI's Signal enum (names, not numbers) as this host's number; 0 for RUNTIME_DEFAULT."""
    if sig == cri.Signal.RUNTIME_DEFAULT:
        return 0
    name = cri.Signal(sig).name or ""
    if name.startswith("SIGRTMINPLUS"):
        return int(signal.SIGRTMIN) + int(name.removeprefix("SIGRTMINPLUS"))
    if name.startswith("SIGRTMAXMINUS"):
        return int(signal.SIGRTMAX) - int(name.removeprefix("SIGRTMAXMINUS"))
    aliases = {"SIGCLD": "SIGCHLD", "SIGPOLL": "SIGIO", "SIGIOT": "SIGABRT", "SIGRTMIN": "SIGRTMIN"}
    found = getattr(signal, aliases.get(name, name), None)
    if found is None:
        raise InvalidArgument(f"stop_signal {name}: not a signal of this host")
    return int(found)


def image_stop_signal(config: dict[str, Any] | Any) -> int:
    section = config.get("config") if isinstance(config, dict) else None
    name = str((section or {}).get("StopSignal") or "")
    if not name:
        return 0
    if name.isdigit():
        return int(name)
    found = getattr(signal, name if name.startswith("SIG") else "SIG" + name, None)
    return int(found) if found is not None else 0
