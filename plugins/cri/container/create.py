"""CreateContainer's work once the name is reserved: image, snapshot, OCI spec, record.

The image is resolved in ``k8s.io``, a snapshot prepared on its chain id
(key = container id) under a lease, the OCI spec made (:mod:`.specgen`)
and everything persisted as a container record (:meth:`CriStore.add_container`).
State CREATED; no task yet. The manager validates the request and reserves
the name first; :class:`Creator` undoes what it did itself on failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import posixpath
import socket
import subprocess
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import structlog

from daemon.errors import FailedPrecondition, InvalidArgument, NotFound
from daemon.metadata.leases import LeaseStore
from daemon.metadata.snapshots import NamespacedSnapshotter
from daemon.mount import mounted
from daemon.oci import spec as oci
from daemon.oci import userfiles, users
from daemon.protocols import Mount
from plugins.cri.container import imagevolume, specgen
from plugins.cri.container.model import CREATED, NAMESPACE, RUNNING, Parsed
from plugins.cri.images import CriImage, CriImages
from plugins.cri.store import (
    ContainerMeta,
    ContainerStatus,
    CriContainer,
    CriStore,
    Entry,
    Sandbox,
    now_ns,
)
from protos.runtime import v1 as cri

log = structlog.get_logger("berth.cri.containers")


def resolve_log_path(log_directory: str, log_path: str) -> str:
    """The absolute log file: the pod's directory + the container's relative path ("" if either is empty)."""
    if not log_path or not log_directory:
        return ""
    if log_path.startswith("/"):
        raise InvalidArgument(f"config.log_path {log_path!r}: must be relative to the pod's log_directory")
    base = posixpath.normpath(log_directory)
    full = posixpath.normpath(posixpath.join(base, log_path))
    if not full.startswith(base.rstrip("/") + "/"):
        raise InvalidArgument(f"config.log_path {log_path!r}: escapes the pod's log_directory {base!r}")
    return full


async def image_user_files(mounts: list[Mount], scratch: Path, label: str) -> users.UserFiles:
    """The snapshot's /etc/passwd and /etc/group as its container sees them (:mod:`daemon.oci.userfiles`).

    Read from the layers in a thread; the snapshot is mounted (under
    ``scratch``) only when the reader says it must be. A fresh snapshot of an
    image is the image's content, so the answer serves every later lookup for
    the same chain id; a missing file stays missing, an unreadable one fails
    the lookup that needs it.
    """
    try:
        return await asyncio.to_thread(userfiles.read_user_files, mounts, label)
    except userfiles.NeedsMount as exc:
        log.debug("cri.userfiles.mount", snapshot=label, reason=str(exc))
    await asyncio.to_thread(scratch.mkdir, parents=True, exist_ok=True)
    async with mounted(mounts, dir=scratch) as rootfs:
        return await asyncio.to_thread(users.UserFiles.from_root, str(rootfs), label)


def _spec_json(inp: specgen.SpecInput) -> tuple[dict[str, Any], bytes]:
    """The spec and its JSON (the encoding is a few ms for a spec with its seccomp profile); blocking."""
    spec = specgen.container_spec(inp)
    return spec, oci.encode(spec, inp.container_id)


async def _none() -> None:
    return None


def runc_features(runc: str) -> specgen.Features:
    """``runc features`` (runc >= 1.1) decides rro and id-mapped mounts; blocking."""
    try:
        out = subprocess.run([runc, "features"], capture_output=True, timeout=10, check=False)
        doc = json.loads(out.stdout) if out.returncode == 0 else {}
    except (OSError, ValueError, subprocess.TimeoutExpired):
        doc = {}
    options = set(doc.get("mountOptions") or [])
    idmap = bool(((doc.get("linux") or {}).get("mountExtensions") or {}).get("idmap", {}).get("enabled"))
    return specgen.Features(rro="rro" in options, idmap=idmap)


class Creator:
    """The create pipeline of one CRI plugin; caches ``runc features`` and each chain's user files.

    ``parsed`` is the manager's cache of :class:`Parsed` (filled here for a
    new container before its CREATED event); ``emit`` sends that event.
    """

    def __init__(
        self,
        *,
        store: CriStore,
        images: CriImages,
        snapshotter: NamespacedSnapshotter,
        leases: LeaseStore,
        state: Path,
        cgroup_driver: str,
        runc: str,
        parsed: dict[str, Parsed],
        emit: Callable[[CriContainer, cri.ContainerEventType], Awaitable[None]],
    ) -> None:
        self.store = store
        self.images = images
        self.snapshotter = snapshotter
        self.leases = leases
        self.state = state
        self.cgroup_driver = cgroup_driver
        self.runc = runc
        self._parsed = parsed
        self._emit = emit
        self._features: specgen.Features | None = None
        self._users_roots: dict[str, str] = {}  # chain id -> directory with its /etc/passwd, /etc/group

    async def create(
        self,
        cid: str,
        name: str,
        sb: Sandbox,
        pod_config: cri.PodSandboxConfig,
        config: cri.ContainerConfig,
        log_path: str,
    ) -> str:
        """The new container's id, once its record is written and CONTAINER_CREATED emitted."""
        # The snapshot is no GC root until the record names it: a lease holds it meanwhile. The
        # lease and the image lookup are independent (one round trip); an unusable image drops it.
        lease = f"cri-create-{cid}"
        expire = (datetime.now(UTC) + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
        found, leased = await asyncio.gather(
            self.images.get(config.image.image),
            self.leases.create(NAMESPACE, lease, {"containerd.io/gc.expire": expire}),
            return_exceptions=True,
        )
        try:
            if isinstance(leased, BaseException):
                raise leased
            if isinstance(found, BaseException):
                raise found
            image = found
            if image is None:
                raise NotFound(f'failed to resolve image "{config.image.image}": not found')
            if not image.chain_id:
                raise FailedPrecondition(f'image "{config.image.image}": has no layers to run')
            target_pid = 0
            ns = config.linux.security_context.namespace_options
            if ns.pid == cri.NamespaceMode.TARGET:
                target = self.store.container(ns.target_id) if ns.target_id else None
                target_pid = target.status.pid if target is not None and target.status.state == RUNNING else 0
            await self._create_leased(cid, name, sb, pod_config, config, log_path, image, lease, target_pid)
        except BaseException:
            if not isinstance(leased, BaseException):
                with contextlib.suppress(NotFound):
                    await self.leases.delete(NAMESPACE, lease)
            raise
        # The record holds the snapshot now: the lease goes (in the database's thread) while the
        # event is built on the loop.
        dropping = asyncio.ensure_future(self._drop_lease(lease))
        try:
            log.info("cri.container.created", id=cid, name=name, sandbox=sb.id, image=image.id)
            await self._emit(self.store.containers[cid], cri.ContainerEventType.CONTAINER_CREATED_EVENT)
        finally:
            await dropping
        return cid

    async def _drop_lease(self, lease: str) -> None:
        with contextlib.suppress(NotFound):
            await self.leases.delete(NAMESPACE, lease)

    async def _create_leased(
        self,
        cid: str,
        name: str,
        sb: Sandbox,
        pod_config: cri.PodSandboxConfig,
        config: cri.ContainerConfig,
        log_path: str,
        image: CriImage,
        lease: str,
        target_pid: int,
    ) -> None:
        config = await imagevolume.mount_images(
            config, sb, images=self.images, snapshotter=self.snapshotter, leases=self.leases
        )
        features = await self._runc_features()
        pod = specgen.PodInfo(
            id=sb.id,
            config=pod_config,
            netns_path=sb.meta.netns_path,
            ipc_path=sb.meta.ipc_path,
            uts_path=sb.meta.uts_path,
            root_dir=sb.meta.root_dir,
            cgroup_parent=sb.meta.cgroup_parent or pod_config.linux.cgroup_parent,
            infra_pid=sb.status.pid,
        )

        def spec_input(rootfs: str) -> specgen.SpecInput:
            return specgen.SpecInput(
                container_id=cid,
                config=config,
                pod=pod,
                image_name=config.image.image,
                image_config=image.config,
                rootfs=rootfs,
                cgroup_driver=self.cgroup_driver,
                features=features,
                target_pid=target_pid,
                host_hostname=socket.gethostname(),
            )

        # The spec reads only the image's /etc/passwd and /etc/group from the rootfs; once they
        # are copied out for this chain, the spec is made while the snapshot is prepared.
        users_root = self._users_roots.get(image.chain_id)

        def spec_and_config(inp: specgen.SpecInput) -> tuple[dict[str, Any], bytes, bytes]:
            """The spec, its JSON and the config's wire bytes (betterproto: ~1.5 ms): one thread job."""
            spec, spec_bytes = _spec_json(inp)
            return spec, spec_bytes, bytes(config)

        prepared, made = await asyncio.gather(
            self.snapshotter.prepare(NAMESPACE, cid, image.chain_id, lease=lease),
            asyncio.to_thread(spec_and_config, spec_input(users_root)) if users_root else _none(),
            return_exceptions=True,
        )
        if isinstance(prepared, BaseException):
            raise prepared
        mounts = prepared
        try:
            if isinstance(made, BaseException):
                raise made
            if made is None:
                spec, spec_bytes = await self._spec_mounted(image.chain_id, mounts, spec_input)
                config_bytes = bytes(config)
            else:
                spec, spec_bytes, config_bytes = made
            entry: CriContainer = Entry(
                ContainerMeta(
                    id=cid,
                    name=name,
                    sandbox_id=sb.id,
                    config=config_bytes,
                    image_ref=image.id,
                    image_name=config.image.image,
                    log_path=log_path,
                ),
                ContainerStatus(state=CREATED, created_at=now_ns()),
                dict(config.labels),
                dict(config.annotations),
            )
            image_labels = (image.config.get("config") or {}).get("Labels") or {}
            record_labels = {**{k: str(v) for k, v in dict(image_labels).items()}, **dict(config.labels)}
            try:
                await self.store.add_container(
                    entry,
                    spec=spec_bytes,
                    snapshotter=self.snapshotter.name,
                    snapshot_key=cid,
                    record_labels=record_labels,
                )
            except InvalidArgument:
                # the image's labels are not the caller's fault: retry with the config's own
                await self.store.add_container(
                    entry,
                    spec=spec_bytes,
                    snapshotter=self.snapshotter.name,
                    snapshot_key=cid,
                    record_labels=dict(config.labels),
                )
        except BaseException:
            with contextlib.suppress(Exception):
                await self.snapshotter.remove(NAMESPACE, cid)
            raise
        self._parsed[cid] = Parsed(config, spec)

    async def _spec_mounted(
        self, chain_id: str, mounts: list[Mount], spec_input: Callable[[str], specgen.SpecInput]
    ) -> tuple[dict[str, Any], bytes]:
        """The spec of an image's first container; the /etc/passwd and /etc/group read from its snapshot
        (:func:`image_user_files`) are kept in memory for the next ones of the same chain."""
        files = await image_user_files(mounts, self.state, f"image layers {chain_id}")
        self._users_roots[chain_id] = files
        return await asyncio.to_thread(_spec_json, spec_input(files))

    async def _runc_features(self) -> specgen.Features:
        if self._features is None:
            self._features = await asyncio.to_thread(runc_features, self.runc)
        return self._features
