"""How ``berth cri`` shows CRI objects: crictl's columns, ids, ages, sizes and JSON.

The table forms copy crictl's (ids cut to 13 characters unless
``--no-trunc``, "2 minutes ago", decimal sizes like ``4.28MB``) so that
what an operator knows from crictl reads the same here. JSON is the CRI
message in protobuf's JSON mapping (camelCase names, enums by name, 64-bit
integers as strings, unset fields included), as ``crictl -o json`` prints it.
"""

from __future__ import annotations

import json
import time
from typing import Any

import betterproto

from protos.runtime import v1 as cri

TRUNC = 13
DIGEST_PREFIX = "sha256:"


def short_id(value: str, no_trunc: bool = False) -> str:
    """An id as crictl shows it: ``sha256:`` dropped and cut to 13 characters unless ``no_trunc``."""
    if no_trunc:
        return value
    return value.removeprefix(DIGEST_PREFIX)[:TRUNC]


def human_duration(seconds: float) -> str:
    """docker/go-units ``HumanDuration``: "Less than a second", "About a minute", "3 hours" ..."""
    s = int(seconds)
    if s < 1:
        return "Less than a second"
    if s == 1:
        return "1 second"
    if s < 60:
        return f"{s} seconds"
    minutes = int(seconds / 60)
    if minutes == 1:
        return "About a minute"
    if minutes < 60:
        return f"{minutes} minutes"
    hours = int(seconds / 3600 + 0.5)
    if hours == 1:
        return "About an hour"
    if hours < 48:
        return f"{hours} hours"
    if hours < 24 * 7 * 2:
        return f"{hours // 24} days"
    if hours < 24 * 30 * 2:
        return f"{hours // 24 // 7} weeks"
    if hours < 24 * 365 * 2:
        return f"{hours // 24 // 30} months"
    return f"{int(hours / 24 / 365)} years"


def ago(created_ns: int, now: float | None = None) -> str:
    """``5 seconds ago`` from a CRI timestamp in nanoseconds."""
    now = time.time() if now is None else now
    return f"{human_duration(max(0.0, now - created_ns / 1e9))} ago"


def human_size(size: int) -> str:
    """go-units ``HumanSizeWithPrecision(size, 3)``: decimal units, three significant digits."""
    value = float(size)
    units = ["B", "kB", "MB", "GB", "TB", "PB"]
    i = 0
    while value >= 1000 and i < len(units) - 1:
        value /= 1000
        i += 1
    return f"{value:.3g}{units[i]}"


def pod_state(state: cri.PodSandboxState) -> str:
    return "Ready" if state == cri.PodSandboxState.SANDBOX_READY else "NotReady"


CONTAINER_STATES = {
    cri.ContainerState.CONTAINER_CREATED: "Created",
    cri.ContainerState.CONTAINER_RUNNING: "Running",
    cri.ContainerState.CONTAINER_EXITED: "Exited",
    cri.ContainerState.CONTAINER_UNKNOWN: "Unknown",
}


def container_state(state: cri.ContainerState) -> str:
    return CONTAINER_STATES.get(state, "Unknown")


def parse_pod_state(text: str) -> cri.PodSandboxState:
    """``ready``/``notready`` (or the enum's name), any case."""
    key = text.lower().replace("_", "").removeprefix("sandbox")
    if key == "ready":
        return cri.PodSandboxState.SANDBOX_READY
    if key == "notready":
        return cri.PodSandboxState.SANDBOX_NOTREADY
    raise ValueError(f"--state {text!r}: expected ready or notready")


def parse_container_state(text: str) -> cri.ContainerState:
    """``created``/``running``/``exited``/``unknown`` (or the enum's name), any case."""
    key = text.lower().removeprefix("container_")
    for state, name in CONTAINER_STATES.items():
        if name.lower() == key:
            return state
    raise ValueError(f"--state {text!r}: expected created, running, exited or unknown")


def message_json(message: betterproto.Message) -> dict[str, Any]:
    """A CRI message in protobuf's JSON mapping, unset fields included (as crictl prints)."""
    out: dict[str, Any] = message.to_dict(casing=betterproto.Casing.CAMEL, include_default_values=True)
    return out


def info_json(info: dict[str, str]) -> dict[str, Any]:
    """A verbose ``info`` map with each JSON value decoded (crictl inspect's ``info``)."""
    out: dict[str, Any] = {}
    for key, value in info.items():
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


def repo_tag(ref: str) -> tuple[str, str]:
    """``docker.io/library/busybox:1.36`` -> (``docker.io/library/busybox``, ``1.36``)."""
    repo, _, tag = ref.rpartition(":")
    if not repo or "/" in tag:
        return ref, "<none>"
    return repo, tag


def image_rows(image: cri.Image, digests: bool, no_trunc: bool) -> list[list[str]]:
    """One row per repo tag (``<none>`` when untagged), as ``crictl images``."""
    digest = ""
    if image.repo_digests:
        digest = image.repo_digests[0].rpartition("@")[2]
    pairs = [repo_tag(t) for t in image.repo_tags]
    if not pairs:
        repo = image.repo_digests[0].rpartition("@")[0] if image.repo_digests else "<none>"
        pairs = [(repo, "<none>")]
    rows = []
    for repo, tag in pairs:
        row = [repo, tag]
        if digests:
            row.append(short_id(digest, no_trunc) if digest else "<none>")
        row += [short_id(image.id, no_trunc), human_size(image.size)]
        rows.append(row)
    return rows


def cpu_percent(cpu: cri.CpuUsage | None) -> str:
    """``usage_nano_cores`` as a percentage of one core, ``-`` when the runtime gave none."""
    if cpu is None or not betterproto.serialized_on_wire(cpu.usage_nano_cores):
        return "-"
    return f"{cpu.usage_nano_cores.value / 1e7:.2f}"


def memory_text(mem: cri.MemoryUsage | None) -> str:
    if mem is None or not betterproto.serialized_on_wire(mem.working_set_bytes):
        return "-"
    return human_size(mem.working_set_bytes.value)


__all__ = [
    "ago",
    "container_state",
    "cpu_percent",
    "human_duration",
    "human_size",
    "image_rows",
    "info_json",
    "memory_text",
    "message_json",
    "parse_container_state",
    "parse_pod_state",
    "pod_state",
    "repo_tag",
    "short_id",
]
