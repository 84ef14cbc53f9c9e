"""RunPodSandbox and UpdatePodSandboxResources input checks: InvalidArgument naming the field.

kubelet sends well-formed requests; conformance suites and other CRI clients
do not always, and a bad value found late (a hostname unshare refuses, a
resolv.conf line with a newline in it, a cgroup parent with ``..``) would
leave work to undo or, worse, a pod that misbehaves. Everything here runs
before anything is made.
"""

from __future__ import annotations

import os
import re
from collections.abc import Collection, Mapping

from daemon.errors import InvalidArgument
from protos.runtime import v1 as cri

#: sum of key and value bytes of labels plus annotations: the API server's limit for annotations
MAX_LABELS_BYTES = 256 * 1024
#: a label/annotation key: the longest Kubernetes qualified name (253-byte prefix / 63-byte name)
MAX_KEY_BYTES = 317
_HOSTNAME = re.compile(r"^[a-zA-Z0-9]([a-zA-Z0-9.\-]{0,62})$")
_PROTOCOLS = {cri.Protocol.TCP, cri.Protocol.UDP, cri.Protocol.SCTP}


def _mode_name(mode: int) -> str:
    try:
        return str(cri.NamespaceMode(mode).name)
    except ValueError:
        return str(mode)


def required(value: str, field: str) -> str:
    if not value:
        raise InvalidArgument(f"{field}: must not be empty")
    return value


def _no_slash(value: str, field: str) -> None:
    required(value, field)
    if "/" in value or "\x00" in value:
        raise InvalidArgument(f"{field}: {value!r} must not contain '/'")


def _one_line(values: list[str], field: str) -> None:
    for i, value in enumerate(values):
        if not value or any(c in value for c in "\n\r\x00"):
            raise InvalidArgument(f"{field}[{i}]: {value!r} must be non-empty and on one line")


def check_labels(labels: Mapping[str, str], annotations: Mapping[str, str], prefix: str) -> None:
    """Keys non-empty and of a sane length; labels and annotations together at most 256 KiB."""
    total = 0
    for kind, table in (("labels", labels), ("annotations", annotations)):
        for key, value in table.items():
            if not key or len(key.encode()) > MAX_KEY_BYTES:
                raise InvalidArgument(
                    f"{prefix}.{kind}: key {key[:64]!r} must be 1-{MAX_KEY_BYTES} bytes long"
                )
            total += len(key.encode()) + len(value.encode())
            if total > MAX_LABELS_BYTES:
                raise InvalidArgument(
                    f"{prefix}.{kind}[{key[:64]!r}]: labels and annotations exceed {MAX_LABELS_BYTES} bytes"
                )


def check_resources(res: cri.LinuxContainerResources, field: str) -> None:
    """No negative CPU or memory figures (0 means unset); a sane oom_score_adj."""
    for name in ("cpu_period", "cpu_shares", "memory_limit_in_bytes"):
        if getattr(res, name) < 0:
            raise InvalidArgument(f"{field}.{name}: {getattr(res, name)} must not be negative")
    if res.cpu_quota < -1:
        raise InvalidArgument(f"{field}.cpu_quota: {res.cpu_quota} must be -1 (unlimited) or more")
    if res.memory_swap_limit_in_bytes < -1:
        raise InvalidArgument(
            f"{field}.memory_swap_limit_in_bytes: {res.memory_swap_limit_in_bytes} must be -1 or more"
        )
    if not -1000 <= res.oom_score_adj <= 1000:
        raise InvalidArgument(f"{field}.oom_score_adj: {res.oom_score_adj} must be within [-1000, 1000]")


def check_cgroup_parent(value: str, *, systemd: bool) -> None:
    field = "config.linux.cgroup_parent"
    if not value:
        return
    if "\x00" in value or "\n" in value:
        raise InvalidArgument(f"{field}: {value!r} must be one line")
    if systemd:
        if "/" in value or not value.endswith(".slice"):
            raise InvalidArgument(f"{field}: {value!r} must be a systemd slice (e.g. kubepods.slice)")
        return
    if not value.startswith("/") or ".." in value.split("/"):
        raise InvalidArgument(f"{field}: {value!r} must be an absolute cgroup path without '..'")


def check_sandbox_config(
    config: cri.PodSandboxConfig, runtime_handler: str, handlers: Collection[str], *, systemd: bool
) -> None:
    """Every check of RunPodSandbox's request, in field order."""
    if runtime_handler not in handlers:
        known = ", ".join(repr(h) for h in sorted(handlers))
        raise InvalidArgument(f"runtime_handler: {runtime_handler!r} is not a known handler ({known})")
    md = config.metadata
    _no_slash(md.name, "config.metadata.name")
    _no_slash(md.namespace, "config.metadata.namespace")
    _no_slash(md.uid, "config.metadata.uid")
    if config.hostname and not _HOSTNAME.match(config.hostname):
        raise InvalidArgument(
            f"config.hostname: {config.hostname!r} must be 1-63 letters, digits, '.' or '-'"
        )
    if config.log_directory and not os.path.isabs(config.log_directory):
        raise InvalidArgument(f"config.log_directory: {config.log_directory!r} must be an absolute path")
    dns = config.dns_config
    _one_line(dns.servers, "config.dns_config.servers")
    _one_line(dns.searches, "config.dns_config.searches")
    _one_line(dns.options, "config.dns_config.options")
    for i, pm in enumerate(config.port_mappings):
        where = f"config.port_mappings[{i}]"
        if not 0 < pm.container_port <= 65535:
            raise InvalidArgument(f"{where}.container_port: {pm.container_port} is not a port (1-65535)")
        if not 0 <= pm.host_port <= 65535:
            raise InvalidArgument(f"{where}.host_port: {pm.host_port} is not a port (0-65535)")
        if pm.protocol not in _PROTOCOLS:
            raise InvalidArgument(f"{where}.protocol: {pm.protocol!r} is not TCP, UDP or SCTP")
    check_labels(config.labels, config.annotations, "config")
    linux = config.linux
    check_cgroup_parent(linux.cgroup_parent, systemd=systemd)
    for key in linux.sysctls:
        if not key or any(c in key for c in " \n\x00") or ".." in key:
            raise InvalidArgument(f"config.linux.sysctls: key {key!r} is not a sysctl name")
    ns = linux.security_context.namespace_options
    for kind in ("network", "ipc"):
        mode = getattr(ns, kind)
        if mode not in (cri.NamespaceMode.POD, cri.NamespaceMode.NODE):
            raise InvalidArgument(
                f"config.linux.security_context.namespace_options.{kind}: "
                f"{_mode_name(mode)} is not allowed for a pod (POD or NODE)"
            )
    if ns.pid not in (cri.NamespaceMode.POD, cri.NamespaceMode.CONTAINER, cri.NamespaceMode.NODE):
        raise InvalidArgument(
            "config.linux.security_context.namespace_options.pid: TARGET is not allowed for a pod"
        )
    check_resources(linux.overhead, "config.linux.overhead")
    check_resources(linux.resources, "config.linux.resources")
