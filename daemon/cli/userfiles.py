"""An image's /etc/passwd and /etc/group read from an overlay snapshot's layer directories, unmounted.

``berth run`` needs only these two files of the new container's snapshot to
build its spec (who the process runs as, its supplementary groups). Mounting
the snapshot read-only for that costs two mount(8) children and the unmount;
reading the layers as overlayfs would is a handful of ``lstat`` calls.

:func:`copy_user_files` resolves each file through the layers, top first, as
the kernel merges them: a directory in a layer is merged with the same
directory below unless it is opaque (``trusted.overlay.opaque=y``, or
``user.overlay.opaque`` with ``userxattr``); a whiteout (character device
0/0) hides the name below; the first layer holding the name decides. Only
the plain case is handled here: every directory on the path a directory in
every layer that has it, the file itself a regular file or absent. Anything
else (a symlink such as ``/etc -> /usr/etc``, a redirect or metacopy
xattr, a mount option this reader does not model) raises :class:`NeedsMount`
and the caller mounts the snapshot as before, so the answer never differs
from the mounted view's.

Blocking (a few syscalls): the CLI calls it inline.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from typing import Protocol

#: The files the spec reads from an image, relative to its root.
USER_FILES = ("etc/passwd", "etc/group")
#: Overlay options that do not change how names resolve (anything else: :class:`NeedsMount`).
_NEUTRAL_OPTIONS = frozenset(
    {"ro", "rw", "index=off", "userxattr", "volatile", "redirect_dir=off", "metacopy=off", "xino=off"}
)
#: Largest file copied (as :data:`daemon.oci.users.MAX_FILE_BYTES`; a larger one is left to the mounted
#: path, which refuses it with its own error).
MAX_FILE_BYTES = 4 << 20


class NeedsMount(Exception):
    """The layers hold something this reader does not resolve itself; the message says what."""


class MountLike(Protocol):
    type: str
    source: str
    options: list[str]


def overlay_layers(mounts: Sequence[MountLike]) -> tuple[list[str], str]:
    """The layer directories of a single overlay mount, top (upper) first, and its xattr namespace.

    NeedsMount for anything but one overlay mount with only options that
    leave name resolution alone.
    """
    if len(mounts) != 1 or mounts[0].type != "overlay":
        raise NeedsMount(f"{len(mounts)} mount(s) of type {', '.join(m.type for m in mounts) or '-'}")
    upper = ""
    lowers: list[str] = []
    xattr = "trusted.overlay."
    for option in mounts[0].options:
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
    if not layers or not all(os.path.isabs(d) for d in layers):
        raise NeedsMount("overlay without absolute layer directories")
    return layers, xattr


def _xattr(path: str, name: str) -> bytes | None:
    try:
        return os.getxattr(path, name, follow_symlinks=False)
    except OSError:
        return None


def find_in_layers(layers: Sequence[str], relpath: str, xattr: str = "trusted.overlay.") -> str | None:
    """The layer path that the merged view shows at ``relpath`` (a regular file), None if absent."""
    parts = [p for p in relpath.split("/") if p]
    if not parts or any(p in (".", "..") for p in parts):
        raise ValueError(f"{relpath!r}: expected a relative path of plain names")
    merged = list(layers)  # the layers' directories making up the current merged directory, top first
    for depth, name in enumerate(parts):
        last = depth == len(parts) - 1
        below: list[str] = []
        for directory in merged:
            path = os.path.join(directory, name)
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                continue
            if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                break  # a whiteout: nothing below shows
            for marker in ("redirect", "metacopy", "whiteout"):
                if _xattr(path, xattr + marker) is not None:
                    raise NeedsMount(f"{path}: overlay {marker} xattr")
            if last:
                if stat.S_ISREG(st.st_mode):
                    return path
                raise NeedsMount(f"{path}: not a regular file")
            if not stat.S_ISDIR(st.st_mode):
                if not below:
                    raise NeedsMount(f"{path}: not a directory")
                break  # a non-directory under a directory ends the merge
            below.append(path)
            opaque = _xattr(path, xattr + "opaque")
            if opaque == b"y":
                break
            if opaque is not None:
                raise NeedsMount(f"{path}: overlay opaque={opaque!r}")
        if not below:
            return None
        merged = below
    return None


def _read_regular(path: str) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_FILE_BYTES:
            raise NeedsMount(f"{path}: not a regular file of at most {MAX_FILE_BYTES} bytes")
        chunks: list[bytes] = []
        size = 0
        while chunk := os.read(fd, 1 << 16):
            size += len(chunk)
            if size > MAX_FILE_BYTES:
                raise NeedsMount(f"{path}: larger than {MAX_FILE_BYTES} bytes")
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def copy_user_files(mounts: Sequence[MountLike], target: str) -> None:
    """Write the snapshot's :data:`USER_FILES` under ``target`` (a missing one stays missing).

    ``target`` is then, for the user lookups of :mod:`daemon.oci.users`, the
    snapshot's root. NeedsMount when the snapshot must be mounted to answer.
    """
    layers, xattr = overlay_layers(mounts)
    found = {rel: find_in_layers(layers, rel, xattr) for rel in USER_FILES}
    texts = {rel: _read_regular(path) for rel, path in found.items() if path is not None}
    for rel, data in texts.items():
        dest = os.path.join(target, rel)
        os.makedirs(os.path.dirname(dest), mode=0o755, exist_ok=True)
        with open(dest, "wb") as f:
            f.write(data)


__all__ = ["USER_FILES", "NeedsMount", "copy_user_files", "find_in_layers", "overlay_layers"]
