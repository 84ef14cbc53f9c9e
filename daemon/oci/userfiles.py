"""An image's /etc/passwd and /etc/group read from a snapshot's mounts, without mounting them.

Building a container's spec needs only these two files of its snapshot (who
the process runs as, its supplementary groups). Mounting the snapshot for
that costs mount(2)s and an unmount; reading them as the mount would show
them is a handful of ``lstat`` calls. ``berth run`` and the CRI's
CreateContainer both read them here, into a :class:`daemon.oci.users.UserFiles`
that the user lookups take in place of a rootfs path.

What the mounts say decides how:

* one ``bind`` mount (or ``none`` with ``bind``/``rbind``): its source is the
  snapshot, read with the scoped resolution of :mod:`daemon.pathsafe`;
* one ``overlay`` mount: its layers (``upperdir`` first, then ``lowerdir``
  in order) merged as the kernel merges them. The topmost layer holding a
  name decides what it is; a directory merges with the same directory below
  until one is opaque (``trusted.overlay.opaque=y``, ``user.`` with
  ``userxattr``) or a layer holds a non-directory or a whiteout (character
  device 0/0) there. A symlink is walked as :mod:`daemon.pathsafe` walks one,
  in the merged view: absolute targets restart at the snapshot's root,
  ``..`` stops at it, so nothing resolves outside the snapshot;
* anything else (several mounts, tmpfs, ...) raises :class:`NeedsMount`.

The reader answers only what it models exactly and raises
:class:`NeedsMount` for the rest (overlay options that change name
resolution, redirect/metacopy/whiteout xattrs, an opaque value other than
``y``, a ``.wh.`` file in a layer, which the kernel would show as a plain
file though a layer unpacked in that form means a whiteout): the caller
then mounts the snapshot, so the answer never differs from the mounted
view's. A file that the mounted view would refuse (not a regular file, too
large, a symlink loop) is not a reason to mount: the
:class:`~daemon.oci.users.UserFiles` keeps that error for the lookup that
needs the file, exactly as a lookup on the mounted rootfs would raise it.

Blocking (a few syscalls, no logging): the CLI calls it inline, the daemon
in a thread.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Sequence
from typing import Protocol

from daemon.errors import FailedPrecondition
from daemon.oci.users import MAX_FILE_BYTES, USER_FILES, FileState, UserFiles
from daemon.pathsafe import O_DIR, O_FILE, walk

#: Overlay options that do not change how names resolve (anything else: :class:`NeedsMount`).
_NEUTRAL_OPTIONS = frozenset(
    {"ro", "rw", "index=off", "userxattr", "volatile", "redirect_dir=off", "metacopy=off", "xino=off"}
)
_WHITEOUT_PREFIX = ".wh."
_MERGE_XATTRS = ("redirect", "metacopy", "whiteout")


class NeedsMount(Exception):
    """The mounts hold something this reader does not resolve itself; the message says what."""


class MountLike(Protocol):
    """A mount as the snapshotter describes it (:class:`daemon.protocols.Mount` or the wire message)."""

    @property
    def type(self) -> str: ...

    @property
    def source(self) -> str: ...

    @property
    def options(self) -> Sequence[str]: ...


class _NotRegular(Exception):
    """The merged view's name is neither a regular file nor absent (reported as the rootfs read would)."""


def overlay_layers(mount: MountLike) -> tuple[list[str], str]:
    """The layer directories of an overlay mount, top (upper) first, and its xattr namespace.

    NeedsMount for options that change name resolution, escaped colons in
    layer paths and relative or missing layer directories.
    """
    upper = ""
    lowers: list[str] = []
    xattr = "trusted.overlay."
    for option in mount.options:
        if option.startswith("upperdir="):
            upper = option.removeprefix("upperdir=")
        elif option.startswith("lowerdir="):
            lowers = option.removeprefix("lowerdir=").split(":")
        elif option.startswith("workdir="):
            continue
        elif option in _NEUTRAL_OPTIONS:
            if option == "userxattr":
                xattr = "user.overlay."
        else:
            raise NeedsMount(f"overlay option {option!r}")
    layers = ([upper] if upper else []) + [d for d in lowers if d]
    if not layers or not all(os.path.isabs(d) and "\\" not in d for d in layers):
        raise NeedsMount("overlay without plain absolute layer directories")
    return layers, xattr


def _is_bind(mount: MountLike) -> bool:
    return mount.type == "bind" or (
        mount.type == "none" and any(o in ("bind", "rbind") for o in mount.options)
    )


def read_user_files(mounts: Sequence[MountLike], label: str = "") -> UserFiles:
    """The snapshot's :data:`~daemon.oci.users.USER_FILES` as a container on ``mounts`` would see them.

    ``label`` names the snapshot in the lookups' messages (default: the bind
    source or the top layer). NeedsMount when the mounts must be mounted to
    answer (module doc).
    """
    if len(mounts) == 1 and _is_bind(mounts[0]):
        return UserFiles.from_root(mounts[0].source, label or mounts[0].source)
    if len(mounts) != 1 or mounts[0].type != "overlay":
        raise NeedsMount(f"{len(mounts)} mount(s) of type {', '.join(m.type for m in mounts) or '-'}")
    layers, xattr = overlay_layers(mounts[0])
    label = label or f"overlay on {layers[0]}"
    states: list[FileState] = []
    for path in USER_FILES:
        try:
            data = read_merged(layers, path, xattr)
        except OSError as exc:
            states.append(FailedPrecondition(f"rootfs {label!r}: {path}: {exc.strerror}"))
        except _NotRegular:
            states.append(FailedPrecondition(f"rootfs {label!r}: {path}: not a regular file"))
        else:
            too_big = data is not None and len(data) > MAX_FILE_BYTES
            message = f"rootfs {label!r}: {path}: larger than {MAX_FILE_BYTES} bytes"
            states.append(FailedPrecondition(message) if too_big else data)
    return UserFiles(label, states[0], states[1])


def read_merged(layers: Sequence[str], path: str, xattr: str = "trusted.overlay.") -> bytes | None:
    """The bytes of ``path`` in the overlay of ``layers`` (top first), None when the merged view has none.

    At most ``MAX_FILE_BYTES + 1`` bytes are read. Raises OSError as opening
    the path in the mounted view would (ENOTDIR, ELOOP, ...), _NotRegular for
    a name that is not a regular file, NeedsMount (module doc).
    """
    root: list[int] = []
    try:
        for layer in layers:
            try:
                root.append(os.open(layer, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC))
            except OSError as exc:
                raise NeedsMount(f"layer {layer!r}: {exc.strerror}") from exc
            if _check_opaque(root[-1], xattr, layer):
                raise NeedsMount(f"layer {layer!r}: an opaque root")
        top = tuple(root)

        def step(parent: tuple[int, ...], name: str, last: bool) -> tuple[int, ...] | str | None:
            return _step(parent, name, last, xattr)

        node = walk(top, path.split("/"), step, _close, path)
        if node is None:
            return None
        try:
            st = os.fstat(node[0])
            if node is top or len(node) != 1 or not stat.S_ISREG(st.st_mode):
                raise _NotRegular(path)
            return os.read(node[0], MAX_FILE_BYTES + 1)
        finally:
            if node is not top:
                _close(node)
    finally:
        _close(tuple(root))


def _close(node: tuple[int, ...]) -> None:
    for fd in node:
        os.close(fd)


def _xattr(fd: int, name: str) -> bytes | None:
    try:
        return os.getxattr(fd, name)
    except OSError:
        return None


def _check_opaque(fd: int, xattr: str, what: str) -> bool:
    """Whether the directory ``fd`` is opaque; NeedsMount for a value other than ``y`` or a redirect."""
    value = _xattr(fd, xattr + "opaque")
    if value is not None and value != b"y":
        raise NeedsMount(f"{what}: overlay opaque={value!r}")
    if _xattr(fd, xattr + "redirect") is not None:
        raise NeedsMount(f"{what}: overlay redirect xattr")
    return value == b"y"


def _exists(name: str, dir_fd: int) -> bool:
    try:
        os.lstat(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return False
    return True


def _step(parent: tuple[int, ...], name: str, last: bool, xattr: str) -> tuple[int, ...] | str | None:
    """One component in the merged directory ``parent`` (its layers' fds, top first).

    The merged directory below (fds the caller closes), a symlink's target to
    walk instead, a 1-tuple with the fd of the regular file that ``name`` is
    (only when ``last``), or None when the merged view has no ``name``.
    """
    found: list[int] = []
    try:
        for layer_fd in parent:
            if _exists(_WHITEOUT_PREFIX + name, layer_fd):
                raise NeedsMount(f"{name!r}: a {_WHITEOUT_PREFIX} file beside it in a layer")
            try:
                st = os.lstat(name, dir_fd=layer_fd)
            except FileNotFoundError:
                continue
            if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                break  # a whiteout: nothing below shows
            if not found:  # the topmost layer holding the name decides what it is
                if stat.S_ISLNK(st.st_mode):
                    return os.readlink(name, dir_fd=layer_fd)
                if stat.S_ISREG(st.st_mode):
                    if not last:
                        raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), name)
                    fd = os.open(name, O_FILE, dir_fd=layer_fd)
                    for marker in _MERGE_XATTRS:
                        if _xattr(fd, xattr + marker) is not None:
                            os.close(fd)
                            raise NeedsMount(f"{name!r}: overlay {marker} xattr")
                    return (fd,)
                if not stat.S_ISDIR(st.st_mode):
                    if last:
                        raise _NotRegular(name)
                    raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), name)
            elif not stat.S_ISDIR(st.st_mode):
                break  # a non-directory under a directory ends the merge
            found.append(os.open(name, O_DIR, dir_fd=layer_fd))
            if _check_opaque(found[-1], xattr, name):
                break
    except BaseException:
        _close(tuple(found))
        raise
    return tuple(found) if found else None


__all__ = ["MountLike", "NeedsMount", "overlay_layers", "read_merged", "read_user_files"]
