"""Mounting a task's rootfs (CreateTaskRequest.rootfs) on ``<bundle>/rootfs``.

Bind, overlay and tmpfs mounts are mount(2) in a worker thread
(:func:`daemon.mount.mount_in_thread`: no child, ~1 ms instead of a mount(8)
exec). The rest, and overlays whose lowerdirs must be made relative to fit a
page, are :mod:`daemon.mount`'s mount(8) commands, run through the shim's
reaper: the shim's single ``waitpid(-1)`` owner would steal the status of a
child asyncio started itself. Unmounting needs no child (umount2 in a thread)
and is :func:`daemon.mount.release` as it is.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path

from daemon.errors import FailedPrecondition
from daemon.mount import mount_command, mount_in_thread, mounts_directly, release
from daemon.protocols import Mount
from plugins.runtime.runc_v2.shim.reaper import Reaper
from protos.containerd.types import Mount as MountMessage


async def mount_rootfs(reaper: Reaper, mounts: Sequence[MountMessage], target: Path) -> None:
    """Mount every entry on ``target`` in order; all or nothing."""
    done = 0
    try:
        for message in mounts:
            m = Mount(type=message.type, source=message.source, options=tuple(message.options))
            if mounts_directly(m):
                await mount_in_thread(m, str(target))
                done += 1
                continue
            argv, cwd = mount_command(m, str(target))
            if cwd is not None:  # posix_spawn has no chdir: env(1) does it
                argv = ["env", "-C", cwd, *argv]
            status, output = await reaper.run(argv)
            if status != 0:
                text = " ".join(output.decode(errors="replace").split())
                raise FailedPrecondition(f"mount {m.type or 'none'} {m.source} on {target}: {text}")
            done += 1
    except BaseException:
        if done:
            with contextlib.suppress(Exception):
                await release(target)
        raise


async def unmount_rootfs(target: Path) -> None:
    await release(target)
