"""Mounting what snapshotters describe (:class:`daemon.protocols.Mount`) for real.

Mounts of the kernel's own kinds (bind, overlay, tmpfs) are made by
``mount(2)`` in a worker thread, with the options split into flags and data
as mount(8) and containerd split them (a read-only bind is a bind, then a
read-only remount; propagation is a second call). Everything else goes to
util-linux ``mount(8)`` in a child process: other types (helpers, loop
devices), userspace options (``x-*``, ``loop``, ``nofail``), and overlay
options too long for one page. The kernel copies at most one page of mount
options, and 128 absolute layer paths do not fit in 4 KiB: as containerd
does, the lowerdirs are then rewritten relative to their common parent
directory and the child runs with that directory as its working directory
(the kernel resolves relative paths against the caller's cwd at mount time).
The daemon process itself never changes directory: its cwd is shared by
every thread. Unmounts are ``umount2(2)`` in a worker thread.

Errors are those of :mod:`daemon.errors`: a mount that fails is
FailedPrecondition naming the type, target and mount(8)'s message;
unmounting something that is not a mount point is NotFound; a target that
stays busy is Unavailable.

Typical use, a snapshot's mounts on a throw-away directory::

    async with mounted(await sn.mounts("ctr-1")) as root:
        ...  # read and write under root; unmounted and removed afterwards
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import functools
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import structlog

from daemon.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from daemon.protocols import Mount

log = structlog.get_logger("berth.mount")

PAGE_SIZE = os.sysconf("SC_PAGESIZE")
#: Options longer than this are compacted (room is left for what mount(8) may add).
COMPACT_THRESHOLD = PAGE_SIZE - 512

MNT_DETACH = 2
UMOUNT_NOFOLLOW = 8

#: How long an EBUSY unmount is retried before giving up (containerd waits as long).
BUSY_RETRIES = 50
BUSY_DELAY = 0.05

_libc = ctypes.CDLL(None, use_errno=True)
_libc.umount2.argtypes = (ctypes.c_char_p, ctypes.c_int)
_libc.umount2.restype = ctypes.c_int
_libc.mount.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p)
_libc.mount.restype = ctypes.c_int

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_SYNCHRONOUS = 0x10
MS_REMOUNT = 0x20
MS_MANDLOCK = 0x40
MS_DIRSYNC = 0x80
MS_NOATIME = 0x400
MS_NODIRATIME = 0x800
MS_BIND = 0x1000
MS_REC = 0x4000
MS_SILENT = 0x8000
MS_UNBINDABLE = 1 << 17
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MS_SHARED = 1 << 20
MS_RELATIME = 1 << 21
MS_STRICTATIME = 1 << 24
PROPAGATION = MS_SHARED | MS_PRIVATE | MS_SLAVE | MS_UNBINDABLE

#: option -> (clear, flag): containerd's table (mount_linux.go parseMountOptions), as mount(8) reads them
FLAG_OPTIONS: dict[str, tuple[bool, int]] = {
    "async": (True, MS_SYNCHRONOUS),
    "atime": (True, MS_NOATIME),
    "bind": (False, MS_BIND),
    "defaults": (False, 0),
    "dev": (True, MS_NODEV),
    "diratime": (True, MS_NODIRATIME),
    "dirsync": (False, MS_DIRSYNC),
    "exec": (True, MS_NOEXEC),
    "mand": (False, MS_MANDLOCK),
    "noatime": (False, MS_NOATIME),
    "nodev": (False, MS_NODEV),
    "nodiratime": (False, MS_NODIRATIME),
    "noexec": (False, MS_NOEXEC),
    "nomand": (True, MS_MANDLOCK),
    "norelatime": (True, MS_RELATIME),
    "nostrictatime": (True, MS_STRICTATIME),
    "nosuid": (False, MS_NOSUID),
    "rbind": (False, MS_BIND | MS_REC),
    "relatime": (False, MS_RELATIME),
    "remount": (False, MS_REMOUNT),
    "ro": (False, MS_RDONLY),
    "rw": (True, MS_RDONLY),
    "strictatime": (False, MS_STRICTATIME),
    "suid": (True, MS_NOSUID),
    "sync": (False, MS_SYNCHRONOUS),
    "private": (False, MS_PRIVATE),
    "rprivate": (False, MS_PRIVATE | MS_REC),
    "shared": (False, MS_SHARED),
    "rshared": (False, MS_SHARED | MS_REC),
    "slave": (False, MS_SLAVE),
    "rslave": (False, MS_SLAVE | MS_REC),
    "unbindable": (False, MS_UNBINDABLE),
    "runbindable": (False, MS_UNBINDABLE | MS_REC),
}
#: types mount(2) makes without a helper, from a directory or a name (no block device, no loop)
DIRECT_TYPES = frozenset({"bind", "overlay", "tmpfs"})
#: options only mount(8) understands (they never reach the kernel)
USERSPACE_OPTIONS = frozenset(
    {"loop", "nofail", "auto", "noauto", "user", "nouser", "users", "owner", "group"}
)


@functools.cache
def _mount_binary() -> str:
    # Looked up once (a PATH walk of stat calls), not on every mount on the event loop;
    # a failed lookup is not cached, so installing mount(8) later still works.
    found = shutil.which("mount") or ("/usr/bin/mount" if os.path.exists("/usr/bin/mount") else None)
    if found is None:
        raise FailedPrecondition("mount(8) from util-linux is not installed (not on PATH)")
    return found


# -- option handling ---------------------------------------------------------


def compact_lowerdir(options: Sequence[str], limit: int = COMPACT_THRESHOLD) -> tuple[str | None, list[str]]:
    """``(cwd, options)`` with ``lowerdir`` relative to ``cwd`` when the options exceed ``limit``.

    ``cwd`` is None when nothing needs (or can) be compacted: the options are
    returned unchanged. Only ``lowerdir`` is rewritten; ``upperdir`` and
    ``workdir`` stay absolute, which the child's cwd does not affect.
    """
    opts = list(options)
    if len(",".join(opts)) <= limit:
        return None, opts
    index = next((i for i, o in enumerate(opts) if o.startswith("lowerdir=")), -1)
    if index < 0:
        return None, opts
    dirs = opts[index][len("lowerdir=") :].split(":")
    if len(dirs) < 2 or not all(os.path.isabs(d) for d in dirs):
        return None, opts
    common = os.path.commonpath(dirs)
    if common == "/":
        return None, opts
    relative = [os.path.relpath(d, common) for d in dirs]
    if any(r == "." or r.startswith("..") for r in relative):
        return None, opts
    opts[index] = "lowerdir=" + ":".join(relative)
    return common, opts


def mounts_directly(m: Mount) -> bool:
    """Whether :func:`mount_direct` does what mount(8) would for ``m`` (else :func:`mount_command`)."""
    if m.type not in DIRECT_TYPES:
        return False
    options = [o for o in m.options if o]
    if any(o in USERSPACE_OPTIONS or o.startswith(("x-", "comment=", "loop=")) for o in options):
        return False
    return m.type != "overlay" or compact_lowerdir(options)[0] is None


def split_options(options: Sequence[str]) -> tuple[int, str]:
    """``(flags, data)`` for mount(2): known flag words become MS_* bits, the rest is the data string."""
    flags = 0
    data: list[str] = []
    for option in options:
        if not option:
            continue
        known = FLAG_OPTIONS.get(option)
        if known is None:
            data.append(option)
        elif known[0]:
            flags &= ~known[1]
        else:
            flags |= known[1]
    return flags, ",".join(data)


def _mount2(source: str, target: str, fstype: str, flags: int, data: str) -> None:
    if _libc.mount(os.fsencode(source), os.fsencode(target), fstype.encode(), flags, data.encode()) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def mount_direct(m: Mount, target: str) -> None:
    """Mount ``m`` on ``target`` with mount(2), as mount(8) would; blocking (call it in a thread).

    For a :func:`mounts_directly` mount. A read-only bind is a bind, then a
    read-only remount; propagation options are a second call. All or nothing:
    if a later call fails the mount is taken away again. FailedPrecondition
    names the type, source, target and the kernel's error.
    """
    options = [o for o in m.options if o]
    if m.type == "bind" and not any(o in ("bind", "rbind") for o in options):
        options.insert(0, "bind")
    flags, data = split_options(options)
    if len(data) >= PAGE_SIZE:
        raise InvalidArgument(
            f"{m.type} mount on {target}: options are {len(data)} bytes; the kernel accepts at most "
            f"{PAGE_SIZE - 1}"
        )
    own = flags & ~PROPAGATION
    source = m.source or "none"
    try:
        _mount2(source, target, m.type, own, data)
    except OSError as exc:
        raise FailedPrecondition(f"mount {m.type or 'none'} {m.source} on {target}: {exc.strerror}") from None
    try:
        if flags & PROPAGATION:
            _mount2("", target, "", flags & (PROPAGATION | MS_REC | MS_SILENT), "")
        if own & (MS_BIND | MS_RDONLY) == MS_BIND | MS_RDONLY:
            _mount2("", target, "", (own & ~MS_REC) | MS_REMOUNT, "")
    except OSError as exc:
        _umount2(target, MNT_DETACH | UMOUNT_NOFOLLOW)
        raise FailedPrecondition(
            f"mount {m.type or 'none'} {m.source} on {target}: {exc.strerror} (setting flags)"
        ) from None


def mount_command(m: Mount, target: str) -> tuple[list[str], str | None]:
    options = [o for o in m.options if o]
    cwd: str | None = None
    if m.type == "overlay":
        cwd, options = compact_lowerdir(options)
        data = ",".join(options)
        if len(data) >= PAGE_SIZE:
            raise InvalidArgument(
                f"overlay mount on {target}: options are {len(data)} bytes even with lowerdirs relative "
                f"to {cwd or 'their common directory'}; the kernel accepts at most {PAGE_SIZE - 1}"
            )
    argv = [_mount_binary(), "--no-mtab", "--internal-only"]
    if m.type == "bind":
        if not any(o in ("bind", "rbind") for o in options):
            options.insert(0, "bind")
    elif m.type:
        argv += ["-t", m.type]
    if options:
        argv += ["-o", ",".join(options)]
    argv += ["--", m.source or "none", target]
    return argv, cwd


# -- mount / unmount ---------------------------------------------------------


async def _mount_one(m: Mount, target: str) -> None:
    if mounts_directly(m):
        await mount_in_thread(m, target)
        log.debug("mount.done", type=m.type, source=m.source, target=target)
        return
    argv, cwd = mount_command(m, target)
    proc = await asyncio.create_subprocess_exec(
        *argv,
        cwd=cwd,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await proc.communicate()
    except asyncio.CancelledError:
        # mount(2) cannot be taken back half-way: let the child finish, then
        # undo a success so a cancelled caller leaves nothing mounted.
        await proc.wait()
        if proc.returncode == 0:
            with contextlib.suppress(Exception):
                await unmount(target, detach=True)
        raise
    if proc.returncode != 0:
        text = " ".join((err or out).decode(errors="replace").split())
        raise FailedPrecondition(f"mount {m.type or 'none'} {m.source} on {target}: {text}")
    log.debug("mount.done", type=m.type, source=m.source, target=target, relative_to=cwd)


async def mount_in_thread(m: Mount, target: str) -> None:
    """:func:`mount_direct` in a worker thread; a cancelled caller leaves nothing mounted."""
    done = asyncio.ensure_future(asyncio.to_thread(mount_direct, m, target))
    try:
        await asyncio.shield(done)
    except asyncio.CancelledError:
        # mount(2) cannot be taken back half-way: let it finish, then undo a success.
        with contextlib.suppress(Exception):
            await done
            await unmount(target, detach=True)
        raise


async def mount_all(mounts: Sequence[Mount], target: str | os.PathLike[str]) -> None:
    """Mount every entry on ``target``, in order (later ones stack on earlier ones).

    All or nothing: if one fails, those already made are unmounted again.
    ``Mount.target`` is ignored (snapshotters leave it empty); ``target``
    must be an existing directory.
    """
    where = os.fspath(target)
    if not mounts:
        raise InvalidArgument(f"mount on {where}: no mounts given")
    done = 0
    try:
        for m in mounts:
            await _mount_one(m, where)
            done += 1
    except BaseException:
        for _ in range(done):
            with contextlib.suppress(Exception):
                await unmount(where, detach=True)
        raise


def _umount2(target: str, flags: int) -> int:
    """errno of umount2 (0 on success); runs in a worker thread."""
    if _libc.umount2(os.fsencode(target), flags) == 0:
        return 0
    return ctypes.get_errno()


async def unmount(target: str | os.PathLike[str], *, detach: bool = False) -> None:
    """Unmount the top-most mount on ``target``.

    ``detach`` (MNT_DETACH) takes the mount out of the tree at once and lets
    the kernel finish when the last user goes: the last resort for a busy
    target. Without it, EBUSY is retried for a few seconds, then Unavailable.
    NotFound if ``target`` is not a mount point (or does not exist).
    """
    where = os.fspath(target)
    flags = UMOUNT_NOFOLLOW | (MNT_DETACH if detach else 0)
    for attempt in range(BUSY_RETRIES):
        code = await asyncio.to_thread(_umount2, where, flags)
        if code == 0:
            log.debug("mount.unmounted", target=where, detach=detach)
            return
        if code in (errno.EINVAL, errno.ENOENT):
            raise NotFound(f"unmount {where}: not a mount point")
        if code != errno.EBUSY or attempt == BUSY_RETRIES - 1:
            break
        await asyncio.sleep(BUSY_DELAY)  # EBUSY has no event to wait for; containerd polls too
    if code == errno.EBUSY:
        raise Unavailable(f"unmount {where}: target is busy")
    raise FailedPrecondition(f"unmount {where}: {os.strerror(code)}")


async def unmount_all(target: str | os.PathLike[str], *, detach: bool = False) -> None:
    """Unmount everything stacked on ``target`` until it is no mount point; quiet if none."""
    for _ in range(256):  # a bound against a target that keeps being remounted
        try:
            await unmount(target, detach=detach)
        except NotFound:
            return
    raise FailedPrecondition(f"unmount {os.fspath(target)}: still mounted after 256 unmounts")


async def release(target: str | os.PathLike[str]) -> None:
    """Unmount everything on ``target``, falling back to a lazy detach if it stays busy."""
    try:
        await unmount_all(target)
    except Exception as exc:  # noqa: BLE001 - every failure gets the last resort
        log.warning("mount.detach", target=os.fspath(target), error=str(exc))
        await unmount_all(target, detach=True)


@contextlib.asynccontextmanager
async def mounted(
    mounts: Sequence[Mount],
    *,
    dir: str | os.PathLike[str] | None = None,  # noqa: A002 - tempfile's word
) -> AsyncIterator[Path]:
    """Mount ``mounts`` on a new temporary directory (under ``dir``) for the ``with`` body.

    Afterwards, whatever happened in the body, everything is unmounted (a
    lazy detach if it stays busy) and the directory removed. The directory
    is only ever ``rmdir``-ed, never deleted recursively, so a mount that
    could not be taken away never costs the snapshot its files.
    """
    path = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix="berth-mnt-", dir=dir))
    try:
        await mount_all(mounts, path)
        try:
            yield path
        finally:
            await release(path)
    finally:
        try:
            await asyncio.to_thread(os.rmdir, path)
        except OSError as exc:
            log.error("mount.rmdir_failed", target=str(path), error=str(exc))


# -- inspection --------------------------------------------------------------


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 3 < len(field) and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mount_points(mountinfo: str = "/proc/self/mountinfo") -> list[str]:
    """Every mount point of this process's mount namespace, in mount order."""
    with open(mountinfo, encoding="utf-8", errors="surrogateescape") as f:
        return [_unescape(line.split()[4]) for line in f if line.strip()]


def mount_points_under(path: str | os.PathLike[str]) -> list[str]:
    """Mount points at or below ``path`` (for tests and leak checks)."""
    base = os.path.realpath(os.fspath(path))
    prefix = base.rstrip("/") + "/"
    return [p for p in mount_points() if p == base or p.startswith(prefix)]
