"""The vocabulary the container modules share: namespace, states, exit codes and reasons, type URLs.

Also :class:`Parsed`, a container's decoded config and spec, which create,
the views, ExecSync and UpdateContainerResources all read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from protos.runtime import v1 as cri

NAMESPACE = "k8s.io"
CREATED, RUNNING, EXITED, UNKNOWN = "created", "running", "exited", "unknown"
SPEC_TYPE = "types.containerd.io/opencontainers/runtime-spec/1/Spec"
PROCESS_TYPE = "types.containerd.io/opencontainers/runtime-spec/1/Process"
RESOURCES_TYPE = "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources"
#: exit code and reasons as containerd reports them
START_ERROR_CODE = 128
UNKNOWN_EXIT_CODE = 255
REASON_COMPLETED, REASON_ERROR, REASON_OOM = "Completed", "Error", "OOMKilled"
REASON_START_ERROR, REASON_UNKNOWN = "StartError", "Unknown"
KILL_WAIT = 30.0


@dataclass
class Parsed:
    """Decoded once per container: its CRI config and OCI spec (both fixed at create)."""

    config: cri.ContainerConfig
    spec: dict[str, Any]
