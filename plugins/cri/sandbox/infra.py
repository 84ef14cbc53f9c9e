"""The infra process: what holds a pod's shared PID namespace (and nothing else).

berth pins a pod's net, ipc and uts namespaces as files, so most pods run no
process of their own. A PID namespace cannot be pinned that way (it dies with
its init), so a pod whose containers share one (``namespace_options.pid ==
POD``) gets a minimal infra task: ``sleep infinity`` as PID 1 of a new PID
namespace, joined to the pod's pinned namespaces, run by the runtime plugin
like any task. Containers of the pod then join ``/proc/<pid>/ns/pid``.

Its root filesystem needs no image: an empty read-only directory with the
host's ``/usr``, ``/bin``, ``/lib``, ``/lib64`` bind-mounted read-only (those
that exist), enough for coreutils' ``sleep``. The task's id is the sandbox
id and its spec sits in the sandbox's own container record, as containerd's
pause container does; ``io.kubernetes.cri.sandbox-id`` groups it with the
pod's containers in one shim.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
from pathlib import Path
from typing import Any

import structlog

from daemon.errors import FailedPrecondition, NotFound
from daemon.oci import spec as oci
from daemon.protocols import TaskManager
from plugins.cri.store import NAMESPACE

log = structlog.get_logger("berth.cri.sandbox")

ROOTFS = "infra-rootfs"
HOST_DIRS = ("/usr", "/bin", "/lib", "/lib64", "/sbin")
STOP_TIMEOUT = 10.0

# containerd's CRI annotations (pkg/cri/annotations)
CONTAINER_TYPE = "io.kubernetes.cri.container-type"
CONTAINER_TYPE_SANDBOX = "sandbox"
SANDBOX_ID = "io.kubernetes.cri.sandbox-id"
SANDBOX_NAME = "io.kubernetes.cri.sandbox-name"
SANDBOX_NAMESPACE = "io.kubernetes.cri.sandbox-namespace"
SANDBOX_UID = "io.kubernetes.cri.sandbox-uid"
SANDBOX_LOG_DIR = "io.kubernetes.cri.sandbox-log-directory"


def sleep_binary() -> str:
    """The host's ``sleep``: it must accept ``infinity`` (coreutils does)."""
    found = shutil.which("sleep")
    if found is None:
        raise FailedPrecondition("infra process: sleep(1) from coreutils is not on PATH")
    return os.path.realpath(found)


def cgroups_path(cgroup_parent: str, sandbox_id: str, *, systemd: bool) -> str:
    """The infra task's cgroup: under the pod's cgroup parent, as containerd places the pause container."""
    if systemd:
        return f"{cgroup_parent or 'system.slice'}:cri-berth:{sandbox_id}"
    parent = cgroup_parent or f"/{NAMESPACE}"
    return f"{parent.rstrip('/')}/{sandbox_id}"


def infra_spec(
    sandbox_id: str,
    directory: Path,
    *,
    namespaces: dict[str, str],
    annotations: dict[str, str],
    cgroup_parent: str = "",
    systemd_cgroup: bool = False,
) -> dict[str, Any]:
    """The OCI spec of the infra task of sandbox ``sandbox_id`` (files of ``directory``).

    ``namespaces``: OCI kind (``network``, ``ipc``, ``uts``) -> pinned file;
    a kind absent from it is the host's (NODE mode). The PID namespace is new.
    """
    mounts: list[dict[str, Any]] = [
        {"destination": d, "type": "bind", "source": d, "options": ["rbind", "ro", "nosuid", "nodev"]}
        for d in HOST_DIRS
        if os.path.isdir(d) and not os.path.islink(d)
    ]
    opts: list[oci.SpecOpt] = [
        oci.with_rootfs_path(str(directory / ROOTFS), readonly=True),
        oci.with_process_args([sleep_binary(), "infinity"]),
        oci.with_mounts(mounts),
        oci.with_capabilities(drop=list(oci.DEFAULT_CAPABILITIES)),
        oci.with_cgroups_path(cgroups_path(cgroup_parent, sandbox_id, systemd=systemd_cgroup)),
        oci.with_annotations(annotations),
        oci.with_default_seccomp(),
    ]
    for kind in ("network", "ipc", "uts"):
        path = namespaces.get(kind)
        opts.append(oci.with_namespace_path(kind, path) if path else oci.with_host_namespace(kind))
    return oci.generate(sandbox_id, *opts, namespace=NAMESPACE)


def prepare_rootfs(directory: Path) -> None:
    """The empty directory the infra's root is (blocking: call in a thread).

    A host directory that is a symlink (``/lib64 -> usr/lib64`` on a merged-/usr
    system) is the same symlink here, so the ELF interpreter's path resolves.
    """
    rootfs = directory / ROOTFS
    rootfs.mkdir(parents=True, exist_ok=True, mode=0o755)
    for d in HOST_DIRS:
        inside = rootfs / d.lstrip("/")
        if os.path.lexists(inside):
            continue
        if os.path.islink(d):
            os.symlink(os.readlink(d), inside)
        elif os.path.isdir(d):
            inside.mkdir()


async def start(tasks: TaskManager, sandbox_id: str) -> int:
    """Create and start the infra task of the sandbox record ``sandbox_id``; its pid.

    On failure nothing of the task is left.
    """
    await tasks.create(NAMESPACE, sandbox_id)
    try:
        pid = await tasks.start(NAMESPACE, sandbox_id)
    except BaseException:
        await asyncio.shield(stop(tasks, sandbox_id))
        raise
    log.info("sandbox.infra.started", sandbox=sandbox_id, pid=pid)
    return pid


async def stop(tasks: TaskManager, sandbox_id: str) -> None:
    """SIGKILL the infra task, wait for it and delete it; quiet if there is none (idempotent)."""
    try:
        await tasks.kill(NAMESPACE, sandbox_id, signal=9, all=True)
    except NotFound:
        return
    except FailedPrecondition:
        pass  # already stopped
    with contextlib.suppress(NotFound):
        await asyncio.wait_for(tasks.wait(NAMESPACE, sandbox_id), STOP_TIMEOUT)
    with contextlib.suppress(NotFound):
        await tasks.delete(NAMESPACE, sandbox_id)
    log.info("sandbox.infra.stopped", sandbox=sandbox_id)
