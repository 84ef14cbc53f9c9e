"""Image volumes: a CRI mount whose source is an image (``Mount.image``), as containerd 2.x mounts them.

kubelet pulls the image first (its pull policy applies to image volumes as to
containers), then sends CreateContainer with a mount that has ``image`` set,
``host_path`` empty and ``readonly`` true. What :func:`mount_images` does for
each such mount, before the spec is made:

* the image is resolved in ``k8s.io`` as the container's own image is; an
  image that is absent is NotFound ("failed to resolve image"), never pulled:
  containerd's ``LocalResolve``, kubelet reports ``ImageVolumeMountFailed``;
* a read-only VIEW snapshot of its chain id is mounted once per pod and image
  on ``<sandbox dir>/image-volumes/<image id hex>`` (the same image mounted by
  two containers of the pod, or twice by one, is mounted once), held by the
  pod's image-volume lease, which keeps it from garbage collection;
* ``image_sub_path`` selects a directory of the image, resolved inside it
  (a symlink never leads out; a file or a missing path is an error);
* the mount's ``host_path`` is set to that directory, so the spec binds it
  read-only like any other mount (``image`` stays set: ContainerStatus shows
  both, as containerd's does).

The mounts stay while the pod's containers may use them and go when the pod
is stopped or removed (:func:`cleanup`): unmounted, snapshots and lease
removed, directory gone. Mounts outlive a berthd restart, as the containers do.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
from pathlib import Path

import betterproto
import structlog

from daemon import pathsafe
from daemon.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from daemon.metadata.leases import LeaseStore
from daemon.metadata.snapshots import NamespacedSnapshotter
from daemon.mount import mount_all, release
from plugins.cri.images import CriImages
from plugins.cri.store import NAMESPACE, Sandbox
from protos.runtime import v1 as cri

log = structlog.get_logger("berth.cri.imagevolume")

DIRECTORY = "image-volumes"
#: containerd's ``crierrors.ErrImageVolumeMountFailed``: kubelet matches the prefix.
MOUNT_FAILED = "ImageVolumeMountFailed"


def lease_id(sandbox_id: str) -> str:
    """The lease that holds a pod's image-volume snapshots (containerd uses the sandbox id itself)."""
    return f"cri-image-volumes-{sandbox_id}"


def snapshot_key(sandbox_id: str, image_id: str) -> str:
    return f"cri-image-volume-{sandbox_id}-{image_id.removeprefix('sha256:')}"


def volumes_dir(sb: Sandbox) -> Path:
    return Path(sb.meta.root_dir) / DIRECTORY


def is_image_mount(m: cri.Mount) -> bool:
    return bool(betterproto.serialized_on_wire(m.image)) and bool(m.image.image)


def check_image_mount(m: cri.Mount, where: str) -> None:
    """containerd's preconditions of an image mount, InvalidArgument naming the field."""
    if m.host_path:
        raise InvalidArgument(f"{where}.host_path {m.host_path!r}: must be empty for an image mount")
    if not m.readonly:
        raise InvalidArgument(f"{where}.readonly: must be true for an image mount")
    if m.image_sub_path.startswith("/") or ".." in m.image_sub_path.split("/"):
        raise InvalidArgument(f"{where}.image_sub_path {m.image_sub_path!r}: must be relative, without '..'")


def sub_directory(root: str, sub_path: str) -> str:
    """``sub_path`` resolved inside ``root`` (symlinks stay inside), as a real path; it must be a directory.

    Blocking (file system walk): call in a thread.
    """
    try:
        fd = pathsafe.open_in_root(root, sub_path)
    except FileNotFoundError:
        raise NotFound(f"image_sub_path {sub_path!r}: no such path in the image") from None
    except OSError as exc:
        raise FailedPrecondition(f"image_sub_path {sub_path!r}: {exc.strerror or exc}") from None
    try:
        if not stat.S_ISDIR(os.fstat(fd).st_mode):
            raise FailedPrecondition(f"image_sub_path {sub_path!r}: only a directory can be mounted")
        return os.readlink(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)


async def mount_images(
    config: cri.ContainerConfig,
    sb: Sandbox,
    *,
    images: CriImages,
    snapshotter: NamespacedSnapshotter,
    leases: LeaseStore,
) -> cri.ContainerConfig:
    """``config`` with every image mount's ``host_path`` set to its mounted image (module doc).

    Returns ``config`` itself when it has no image mount, else a copy. A
    failure leaves mounted what other containers of the pod may already use;
    :func:`cleanup` at the pod's stop takes everything.
    """
    if not any(is_image_mount(m) for m in config.mounts):
        return config
    out = cri.ContainerConfig().parse(bytes(config))
    for i, m in enumerate(out.mounts):
        if not is_image_mount(m):
            continue
        where = f"config.mounts[{i}]"
        check_image_mount(m, where)
        ref = m.image.image
        image = await images.get(ref)
        if image is None:
            raise NotFound(f'{MOUNT_FAILED}: {where}.image: failed to resolve image "{ref}": not found')
        if not image.chain_id:
            raise FailedPrecondition(f'{MOUNT_FAILED}: {where}.image "{ref}": has no layers to mount')
        target = await _ensure_mounted(sb, image.id, image.chain_id, snapshotter, leases)
        host_path = str(target)
        if m.image_sub_path:
            try:
                host_path = await asyncio.to_thread(sub_directory, host_path, m.image_sub_path)
            except (NotFound, FailedPrecondition) as exc:
                raise type(exc)(f"{MOUNT_FAILED}: {where}.{exc.message}") from None
        m.host_path = host_path
        log.info("cri.image_volume", sandbox=sb.id, image=ref, image_id=image.id, path=host_path)
    return out


async def _ensure_mounted(
    sb: Sandbox, image_id: str, chain_id: str, snapshotter: NamespacedSnapshotter, leases: LeaseStore
) -> Path:
    """The pod's mount of ``image_id``, made now unless another container of the pod made it."""
    target = volumes_dir(sb) / image_id.removeprefix("sha256:")
    if await asyncio.to_thread(os.path.ismount, target):
        return target
    key = snapshot_key(sb.id, image_id)
    with contextlib.suppress(AlreadyExists):
        await leases.create(NAMESPACE, lease_id(sb.id))
    try:
        mounts = await snapshotter.view(NAMESPACE, key, chain_id, lease=lease_id(sb.id))
    except AlreadyExists:
        mounts = await snapshotter.mounts(NAMESPACE, key)  # left by a failed attempt or a restart
    await asyncio.to_thread(target.mkdir, mode=0o755, parents=True, exist_ok=True)
    try:
        await mount_all(mounts, target)
    except BaseException:
        with contextlib.suppress(Exception):
            await snapshotter.remove(NAMESPACE, key)
        raise
    return target


async def cleanup(sb: Sandbox | None, *, snapshotter: NamespacedSnapshotter, leases: LeaseStore) -> None:
    """Unmount and remove every image volume of the pod, then its lease; idempotent, quiet for None.

    Called once the pod's containers are stopped (StopPodSandbox) and again at
    RemovePodSandbox for a pod that was never stopped cleanly.
    """
    if sb is None:
        return
    base = volumes_dir(sb)
    names = await asyncio.to_thread(lambda: sorted(os.listdir(base)) if base.is_dir() else [])
    for name in names:
        target = base / name
        await release(target)
        with contextlib.suppress(NotFound):
            await snapshotter.remove(NAMESPACE, snapshot_key(sb.id, name))
        with contextlib.suppress(FileNotFoundError):
            await asyncio.to_thread(os.rmdir, target)
    with contextlib.suppress(FileNotFoundError):
        await asyncio.to_thread(os.rmdir, base)
    with contextlib.suppress(NotFound):
        await leases.delete(NAMESPACE, lease_id(sb.id))
    if names:
        log.info("cri.image_volume.cleanup", sandbox=sb.id, volumes=len(names))
