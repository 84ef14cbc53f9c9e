"""A pod's own files: hostname, hosts, resolv.conf and its /dev/shm, as containerd makes them.

Each sandbox has a directory (``SandboxMeta.root_dir``) holding, beside the
pinned namespace files::

    hostname      the pod's hostname and a newline
    hosts         a copy of the host's /etc/hosts (kubelet mounts its own for
                  pods on the pod network; crictl users get the node's)
    resolv.conf   from the pod's DNSConfig, or a copy of the host's if it is empty
    shm/          a 64 MiB tmpfs every container of the pod mounts on /dev/shm
                  (absent when the pod uses the host's IPC namespace: then the
                  host's /dev/shm is shared)

Containers bind-mount them (the container side builds those mounts from the
paths here). Writing is blocking file work: :func:`write_files` runs it in a
thread.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
from pathlib import Path

from daemon.errors import FailedPrecondition, NotFound
from daemon.mount import mount_all, release
from daemon.protocols import Mount
from protos.runtime import v1 as cri

HOSTS = "hosts"
RESOLV_CONF = "resolv.conf"
HOSTNAME = "hostname"
SHM = "shm"

#: containerd's defaultShmSize
SHM_SIZE = 64 * 1024 * 1024
SHM_OPTIONS = ("nodev", "noexec", "nosuid", "mode=1777", f"size={SHM_SIZE}")

HOST_HOSTS = Path("/etc/hosts")
HOST_RESOLV_CONF = Path("/etc/resolv.conf")


def resolv_conf(dns: cri.DnsConfig) -> str:
    """containerd's ``parseDNSOptions``: search, nameserver lines, options; "" when all are empty."""
    out = ""
    if dns.searches:
        out += f"search {' '.join(dns.searches)}\n"
    if dns.servers:
        out += "".join(f"nameserver {server}\n" for server in dns.servers)
    if dns.options:
        out += f"options {' '.join(dns.options)}\n"
    return out


def pod_hostname(config: cri.PodSandboxConfig) -> str:
    """The pod's hostname: the config's, else the node's (what a host-network pod sees anyway)."""
    return config.hostname or socket.gethostname()


def _copy(src: Path, dst: Path) -> None:
    try:
        shutil.copyfile(src, dst)
    except FileNotFoundError:
        dst.write_bytes(b"")
    os.chmod(dst, 0o644)


def _write(path: Path, text: str) -> None:
    path.write_text(text)
    os.chmod(path, 0o644)


def _write_files(directory: Path, hostname: str, dns: cri.DnsConfig) -> None:
    directory.mkdir(parents=True, exist_ok=True, mode=0o711)
    _write(directory / HOSTNAME, hostname + "\n")
    _copy(HOST_HOSTS, directory / HOSTS)
    content = resolv_conf(dns)
    if content:
        _write(directory / RESOLV_CONF, content)
    else:
        _copy(HOST_RESOLV_CONF, directory / RESOLV_CONF)


async def write_files(directory: Path, hostname: str, dns: cri.DnsConfig) -> None:
    """Write hostname, hosts and resolv.conf in ``directory`` (made if missing)."""
    await asyncio.to_thread(_write_files, directory, hostname, dns)


async def mount_shm(directory: Path) -> Path:
    """Mount the pod's tmpfs on ``directory/shm``; its path."""
    target = directory / SHM
    await asyncio.to_thread(target.mkdir, 0o700, False, True)
    await mount_all([Mount(type="tmpfs", source="shm", options=SHM_OPTIONS)], target)
    return target


async def unmount_shm(directory: Path) -> None:
    """Unmount the pod's shm (idempotent): its contents are gone, as when a pause container stops."""
    target = directory / SHM
    try:
        await release(target)
    except NotFound:
        pass
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise FailedPrecondition(f"unmount {target}: {exc.strerror}") from None


async def remove_dir(directory: Path) -> None:
    """Remove the sandbox directory once nothing is mounted in it (shm and namespaces released first)."""
    await unmount_shm(directory)
    await asyncio.to_thread(shutil.rmtree, directory, True)
