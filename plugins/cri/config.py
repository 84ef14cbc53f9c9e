"""The CRI plugin's config.toml table: ``[plugins."berth.cri.v1.cri"]``.

Keys are containerd's CRI keys where containerd has one (``sandbox_image``,
``conf_dir``, ``bin_dirs``, ``max_container_log_line_size``,
``stream_server_address``/``port``, ``snapshotter``), so an operator coming
from containerd finds them under the same names::

    [plugins."berth.cri.v1.cri"]
    conf_dir = "/etc/cni/net.d"
    bin_dirs = ["/opt/cni/bin", "/usr/lib/cni"]
    cgroup_driver = "systemd"
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal

from daemon.config import doc
from daemon.errors import InvalidArgument
from daemon.metadata.validate import validate_identifier
from plugins.cri.images import normalize

DEFAULT_CONF_DIR = "/etc/cni/net.d"
#: Where the CNI project installs plugins, then where Debian's containernetworking-plugins does.
DEFAULT_BIN_DIRS = ("/opt/cni/bin", "/usr/lib/cni")
#: containerd's default: kubelet's own limit for one CRI log line before it is split.
DEFAULT_MAX_LOG_LINE = 16 * 1024


@dataclass
class CriConfig:
    """The CRI v1 services kubelet talks to: images, pods, containers, CNI networking, logs, streaming."""

    sandbox_image: str = field(
        default="",
        metadata=doc(
            'Image a pod\'s infra (pause) container runs, e.g. "registry.k8s.io/pause:3.10". '
            "Empty (the default): no pause container; berth pins the pod's namespaces itself and "
            "starts a minimal infra process only when the pod shares its PID namespace."
        ),
    )
    conf_dir: str = field(
        default=DEFAULT_CONF_DIR,
        metadata=doc(
            "Directory of CNI network configurations (*.conflist, *.conf, *.json); the first file "
            "in lexical order is the pod network. Read on every pod, so a file dropped in later "
            "makes the network ready (Status NetworkReady) without a restart."
        ),
    )
    bin_dirs: list[str] = field(
        default_factory=lambda: list(DEFAULT_BIN_DIRS),
        metadata=doc("Directories searched, in order, for CNI plugin binaries."),
    )
    cgroup_driver: Literal["cgroupfs", "systemd"] = field(
        default="cgroupfs",
        metadata=doc(
            "How pod and container cgroups are named and created; reported to kubelet by the "
            'RuntimeConfig call and must match kubelet\'s cgroupDriver. "systemd" needs systemd as '
            "PID 1."
        ),
    )
    snapshotter: str = field(
        default="overlayfs",
        metadata=doc(
            "Snapshotter (plugin id of a berth.snapshotter.v1) CRI images are unpacked into and "
            "container root filesystems are made by; ImageFsInfo reports its disk usage."
        ),
    )
    stream_server_address: str = field(
        default="127.0.0.1",
        metadata=doc(
            "Address the streaming server (Exec, Attach, PortForward URLs) listens on. kubelet "
            "proxies streams from the API server, so loopback is enough on a normal node."
        ),
    )
    stream_server_port: int = field(
        default=0,
        metadata=doc("TCP port of the streaming server; 0 picks a free port at start."),
    )
    max_container_log_line_size: int = field(
        default=DEFAULT_MAX_LOG_LINE,
        metadata=doc(
            "Longest container log line, in bytes, written as one CRI log entry; a longer line is "
            "split into partial (P) entries. -1: never split."
        ),
    )

    def validate(self) -> None:
        if self.sandbox_image:
            try:
                normalize(self.sandbox_image)
            except InvalidArgument as exc:
                raise ValueError(f"sandbox_image: {exc.message}") from None
        if not os.path.isabs(self.conf_dir):
            raise ValueError(f"conf_dir: {self.conf_dir!r} must be an absolute path")
        if not self.bin_dirs:
            raise ValueError("bin_dirs: needs at least one directory")
        for i, path in enumerate(self.bin_dirs):
            if not os.path.isabs(path):
                raise ValueError(f"bin_dirs[{i}]: {path!r} must be an absolute path")
        try:
            validate_identifier("snapshotter", self.snapshotter)
        except InvalidArgument as exc:
            raise ValueError(exc.message) from None
        if not self.stream_server_address:
            raise ValueError("stream_server_address: must not be empty")
        if not 0 <= self.stream_server_port <= 65535:
            raise ValueError(f"stream_server_port: {self.stream_server_port} is not a port (0-65535)")
        if self.max_container_log_line_size != -1 and self.max_container_log_line_size < 1:
            raise ValueError(
                f"max_container_log_line_size: {self.max_container_log_line_size}: "
                "expected bytes >= 1, or -1 for no limit"
            )
