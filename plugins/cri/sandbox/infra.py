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

With ``sandbox_image`` set in the CRI config (:class:`SandboxImage`), every
pod runs an infra task, as containerd runs its pause container: the image is
resolved in ``k8s.io`` (pulled, pinned, if absent, as containerd does), a
snapshot keyed by the sandbox id is prepared on its chain id and becomes the
task's root (read-only), and the process is the image's Entrypoint + Cmd with
its Env, WorkingDir and numeric User. The snapshot is held by a lease of the
pod until the sandbox record names it, and removed with the pod
(:func:`release_root`). The manager drives both kinds through
:func:`prepare_root`, :meth:`InfraRoot.spec` and :func:`release_root`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from daemon.errors import AlreadyExists, BerthError, FailedPrecondition, NotFound
from daemon.metadata.leases import LeaseStore
from daemon.metadata.snapshots import NamespacedSnapshotter
from daemon.oci import spec as oci
from daemon.protocols import TaskManager
from plugins.cri.images import CriImage, CriImages
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


# -- the sandbox image (containerd's pause container) -----------------------------------------

Undo = list[Callable[[], Awaitable[None]]]


def lease_id(sandbox_id: str) -> str:
    """The lease holding a pod's infra snapshot from its prepare until the sandbox record names it."""
    return f"cri-sandbox-{sandbox_id}"


@dataclass
class SandboxImage:
    """The ``sandbox_image`` of the CRI config and what it takes to run it (one per CRI plugin)."""

    ref: str
    images: CriImages
    snapshotter: NamespacedSnapshotter
    leases: LeaseStore

    async def ensure(self) -> CriImage:
        """The image, pulled (and pinned, so kubelet's image GC keeps it) if ``k8s.io`` lacks it."""
        image = await self.images.get(self.ref)
        if image is None:
            log.info("sandbox.image.pull", image=self.ref)
            try:
                await self.images.pull(self.ref, pinned=True)
            except BerthError as exc:
                raise type(exc)(f'sandbox_image "{self.ref}": pull failed: {exc.message}') from exc
            image = await self.images.get(self.ref)
        if image is None:
            raise NotFound(f'sandbox_image "{self.ref}": not found in namespace {NAMESPACE} after its pull')
        if not image.chain_id:
            raise FailedPrecondition(f'sandbox_image "{self.ref}": has no layers to run')
        return image


@dataclass(frozen=True)
class InfraRoot:
    """Where an infra task's root comes from: the empty host-binaries directory, or an image snapshot."""

    image: str = ""  # the image reference (record's ``image``); "" for the host-binaries root
    snapshotter: str = ""
    snapshot_key: str = ""
    image_config: Mapping[str, Any] = field(default_factory=dict)

    def spec(self, spec: oci.Spec, sandbox_id: str) -> bytes:
        """The infra spec (as :func:`infra_spec` made it) adapted to this root, as ``config.json`` bytes."""
        return oci.encode(image_spec(spec, self.image_config) if self.image else spec, sandbox_id)


def image_user(user: str) -> dict[str, int]:
    """The OCI user of an image's ``User`` when numeric (``uid[:gid]``); root otherwise.

    A pause image names its user by number (``65535:65535``); a name would need
    the image's /etc/passwd, which a pause image does not have.
    """
    uid, _, gid = user.partition(":")
    out = {"uid": int(uid) if uid.isdigit() else 0, "gid": int(gid) if gid.isdigit() else 0}
    if user and not uid.isdigit():
        log.warning("sandbox.image.user_ignored", user=user, reason="not numeric")
    return out


def image_spec(spec: dict[str, Any], image_config: Mapping[str, Any]) -> dict[str, Any]:
    """The host-binaries infra spec turned into the image's: its argv, env, cwd, user; no host mounts."""
    section = image_config.get("config") or {}
    argv = [*(section.get("Entrypoint") or []), *(section.get("Cmd") or [])]
    if not argv:
        raise FailedPrecondition("sandbox_image: the image has neither Entrypoint nor Cmd to run")
    process = spec.setdefault("process", {})
    process["args"] = [str(a) for a in argv]
    process["env"] = oci.merge_env(process.get("env", []), [str(e) for e in section.get("Env") or []])
    process["cwd"] = str(section.get("WorkingDir") or "/")
    process["user"] = image_user(str(section.get("User") or ""))
    spec["mounts"] = [
        m
        for m in spec.get("mounts", [])
        if not (
            m.get("type") == "bind" and m.get("source") in HOST_DIRS and m.get("destination") in HOST_DIRS
        )
    ]
    spec["root"] = {"path": ROOTFS, "readonly": True}
    return spec


async def prepare_root(directory: Path, sandbox_id: str, image: SandboxImage | None, undo: Undo) -> InfraRoot:
    """Make the infra task's root: the host-binaries directory, or a snapshot of the sandbox image.

    A snapshot is held by the pod's lease (the record names it right after);
    its removal is appended to ``undo`` for a RunPodSandbox that fails later.
    """
    if image is None:
        await asyncio.to_thread(prepare_rootfs, directory)
        return InfraRoot()
    found = await image.ensure()
    with contextlib.suppress(AlreadyExists):
        await image.leases.create(NAMESPACE, lease_id(sandbox_id))
    undo.append(lambda: release_root(image, sandbox_id))
    await image.snapshotter.prepare(NAMESPACE, sandbox_id, found.chain_id, lease=lease_id(sandbox_id))
    log.info("sandbox.image.prepared", sandbox=sandbox_id, image=image.ref, image_id=found.id)
    return InfraRoot(image.ref, image.snapshotter.name, sandbox_id, found.config)


async def release_root(image: SandboxImage | None, sandbox_id: str) -> None:
    """Remove the pod's infra snapshot and lease (after the task is gone); quiet if there are none."""
    if image is None:
        return
    with contextlib.suppress(NotFound):
        await image.snapshotter.remove(NAMESPACE, sandbox_id)
    with contextlib.suppress(NotFound):
        await image.leases.delete(NAMESPACE, lease_id(sandbox_id))
