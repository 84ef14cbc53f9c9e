"""The runc v2 runtime's settings: where things are and how shims are started."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Settings:
    """Where things are and how shims are started; built once by the plugin's init."""

    state: Path
    runc_root: Path
    shim_state: Path
    runtime_binary: str  # as configured ("" = berth's shim through the zygote)
    shim_binary: str  # the resolved executable for the exec bootstrap
    runc_binary: str
    systemd_cgroup: bool
    shim_debug: bool
    address: str
    ttrpc_address: str
    publish_binary: str
    recovery_event_grace: float = 10.0
