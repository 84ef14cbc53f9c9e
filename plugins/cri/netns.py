"""A pod's namespaces pinned as files that berth owns, instead of held by a pause process.

A namespace lives while a process is in it or a file is bind-mounted on it.
RunPodSandbox creates the pod's net, ipc and uts namespaces once, each
bind-mounted on a file under the sandbox's state dir (``<dir>/net`` ...);
CNI gets the net file as ``CNI_NETNS`` and every container of the pod joins
the files by path in its OCI spec. Nothing runs to keep them: removing the
files (unmount, unlink) is what ends them, once no container is left in them.

util-linux ``unshare --net=<file> --ipc=<file> --uts=<file> <cmd>`` does the
work in one short child: it makes the namespaces, bind-mounts each on its
file (which must exist) and runs ``<cmd>`` inside, used here to set the pod's
hostname in the new UTS namespace. The daemon itself never changes
namespace, so no thread of it can end up in the wrong one.

:func:`remove` is idempotent, and :func:`is_pinned` asks the kernel (the
``NS_GET_NSTYPE`` ioctl) whether a path is a namespace of the given kind.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import functools
import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path

import structlog

from daemon.errors import AlreadyExists, FailedPrecondition, InvalidArgument
from daemon.mount import release

log = structlog.get_logger("berth.cri.netns")

#: The kinds a pod sandbox pins, and the CLONE_NEW* flag NS_GET_NSTYPE answers for each.
NSTYPES = {"net": 0x40000000, "ipc": 0x08000000, "uts": 0x04000000}
KINDS = ("net", "ipc", "uts")

NS_GET_NSTYPE = 0xB703  # _IO(0xb7, 0x3)

_HOSTNAME = re.compile(r"^[a-zA-Z0-9]([a-zA-Z0-9.\-]{0,62})$")


def path_for(directory: str | os.PathLike[str], kind: str) -> Path:
    """Where namespace ``kind`` of a sandbox whose files live in ``directory`` is pinned."""
    if kind not in NSTYPES:
        raise InvalidArgument(f"namespace kind {kind!r}: must be one of {list(NSTYPES)}")
    return Path(directory) / kind


def is_pinned(path: str | os.PathLike[str], kind: str | None = None) -> bool:
    """True if ``path`` is a namespace (of ``kind``, when given); a quick syscall, fine on the loop."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        nstype = fcntl.ioctl(fd, NS_GET_NSTYPE)
    except OSError:
        return False
    finally:
        os.close(fd)
    return kind is None or nstype == NSTYPES.get(kind)


@functools.cache
def _binary(name: str) -> str:
    # Looked up once, not with a PATH walk on the event loop for every pod.
    found = shutil.which(name)
    if found is None:
        raise FailedPrecondition(f"{name}(1) from util-linux/coreutils is not installed (not on PATH)")
    return found


async def create(
    directory: str | os.PathLike[str], kinds: Sequence[str] = KINDS, *, hostname: str | None = None
) -> dict[str, Path]:
    """Pin new namespaces of ``kinds`` on files in ``directory``; their paths by kind.

    ``hostname`` is set in the new UTS namespace (``uts`` must be among
    ``kinds``). AlreadyExists if a namespace is already pinned there;
    FailedPrecondition with unshare's message if the kernel refuses. On
    failure nothing stays mounted and the files are gone.
    """
    kinds = list(dict.fromkeys(kinds))
    if not kinds:
        raise InvalidArgument("namespace kinds: at least one is needed")
    paths = {kind: path_for(directory, kind) for kind in kinds}
    if hostname is not None:
        if "uts" not in paths:
            raise InvalidArgument(f"hostname {hostname!r}: needs a uts namespace")
        if not _HOSTNAME.match(hostname):
            raise InvalidArgument(f"hostname {hostname!r}: must be 1-63 letters, digits, '.' or '-'")
    for path in paths.values():
        if is_pinned(path):
            raise AlreadyExists(f"namespace file {path}: already pinned")
    unshare = _binary("unshare")
    command = [_binary("hostname"), hostname] if hostname is not None else [_binary("true")]
    await asyncio.to_thread(_prepare, Path(directory), list(paths.values()))
    argv = [unshare, *(f"--{kind}={path}" for kind, path in paths.items()), "--", *command]
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        _, stderr = await proc.communicate()
        if proc.returncode != 0:
            text = stderr.decode(errors="replace").strip()
            raise FailedPrecondition(f"pin namespaces {kinds} in {directory}: {text or proc.returncode}")
    except BaseException:
        await asyncio.shield(remove_all(directory, kinds))
        raise
    log.info("netns.create", directory=os.fspath(directory), kinds=kinds)
    return paths


def _prepare(directory: Path, files: list[Path]) -> None:
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    for path in files:
        # A leftover plain file from a crash is reused; the bind mount needs it to exist.
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o444))


async def remove(path: str | os.PathLike[str]) -> None:
    """Unpin one namespace file: unmount and unlink; quiet if it is not there (idempotent).

    The namespace itself ends when no process is left in it either.
    """
    await release(path)
    try:
        await asyncio.to_thread(os.unlink, path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        if exc.errno != errno.EBUSY:
            raise FailedPrecondition(f"remove namespace file {os.fspath(path)}: {exc.strerror}") from None
        raise FailedPrecondition(f"remove namespace file {os.fspath(path)}: still mounted") from None
    log.debug("netns.remove", path=os.fspath(path))


async def remove_all(directory: str | os.PathLike[str], kinds: Sequence[str] = KINDS) -> None:
    """:func:`remove` every namespace of ``kinds`` pinned in ``directory``; the directory stays."""
    errors: list[str] = []
    for kind in kinds:
        try:
            await remove(path_for(directory, kind))
        except FailedPrecondition as exc:
            errors.append(exc.message)
    if errors:
        raise FailedPrecondition("; ".join(errors))
