"""The snapshot tree a layer is written into, opened so that nothing escapes it.

Every path is walked from a directory fd held on the snapshot root with
:func:`daemon.pathsafe.walk`: one component at a time, ``O_NOFOLLOW``, a
symlink (the layer, or a lower layer, put it there) walked again from the
root fd, so ``lib -> usr/lib`` works as images expect and ``evil -> /etc``
means ``<root>/etc``, never the host's.

Overlay form: the tree is the snapshot's upper dir; the lower dirs are read
(never written) to know what the merged view holds, the way overlayfs looks
names up: top layer first, a whiteout (0/0 character device) or a non-directory
hides what is below, a directory merges with the ones below it unless it is
opaque (``trusted.overlay.opaque=y``). A directory needed in the upper that
exists only below is created with the lower one's mode, owner, xattrs and
times (directory copy-up, as containerd's ``mkparent``).
"""

from __future__ import annotations

import errno
import os
import posixpath
import shutil
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum

import structlog

from daemon.pathsafe import O_DIR, walk

log = structlog.get_logger("berth.diff")

OPAQUE_XATTR = "trusted.overlay.opaque"
OVERLAY_XATTR_PREFIX = "trusted.overlay."


class Resolve(Enum):
    """What resolving a directory may change in the tree."""

    #: create missing directories (0755, root-owned) and copy up lower-only ones
    CREATE = "create"
    #: copy up a directory that only a lower layer has; a missing one is None
    COPY_UP = "copy-up"
    #: change nothing; a directory the tree itself lacks is None
    LOOKUP = "lookup"


@dataclass
class Dir:
    """An open directory of the tree: its fd (owned by whoever got the Dir) and where it is."""

    fd: int
    #: canonical path from the root, symlinks resolved
    parts: tuple[str, ...]
    #: lower directories merging into this one in the overlay view, top first
    lowers: tuple[str, ...] = ()

    @property
    def path(self) -> str:
        return "/".join(self.parts)

    def close(self) -> None:
        os.close(self.fd)

    def __enter__(self) -> Dir:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class _Found:
    """A name as the lower layers show it: the topmost entry, and the dirs merging under it."""

    st: os.stat_result | None = None
    path: str = ""
    merging: tuple[str, ...] = field(default=())


def is_whiteout(st: os.stat_result) -> bool:
    """An overlayfs whiteout: a character device 0/0."""
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def lstat_at(d: Dir, name: str) -> os.stat_result | None:
    try:
        return os.lstat(name, dir_fd=d.fd)
    except FileNotFoundError:
        return None


def _is_opaque(target: int | str) -> bool:
    """Whether a directory (an fd, or a path that is not followed) is marked opaque."""
    try:
        if isinstance(target, int):
            return os.getxattr(target, OPAQUE_XATTR) == b"y"
        return os.getxattr(target, OPAQUE_XATTR, follow_symlinks=False) == b"y"
    except OSError:
        return False


class Tree:
    """A snapshot root opened for writing a layer, plus (overlay form) its read-only lowers."""

    def __init__(self, root: str, lowers: Sequence[str] = (), overlay: bool = False) -> None:
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self.root_path = root
        self.overlay = overlay
        lower_roots = tuple(lowers) if overlay and not _is_opaque(fd) else ()
        self.root = Dir(fd, (), lower_roots)
        #: copied-up directories whose times are set last (creating entries in them changes mtime)
        self.copied_up: list[tuple[tuple[str, ...], int, int]] = []
        self._cache: tuple[tuple[str, ...], Dir] | None = None

    def close(self) -> None:
        self.invalidate()
        self.root.close()

    def __enter__(self) -> Tree:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def invalidate(self) -> None:
        """Forget the cached resolution: call after anything existing was removed or replaced."""
        if self._cache is not None:
            self._cache[1].close()
            self._cache = None

    # -- resolution ---------------------------------------------------------

    def resolve(self, parts: Sequence[str], mode: Resolve) -> Dir | None:
        """Open the directory ``parts`` (lexically clean, relative) inside the tree.

        The returned :class:`Dir` is the caller's to close. None when it does
        not exist and ``mode`` may not create it. OSError (ENOTDIR, ELOOP)
        when a component is not a directory or symlinks loop.
        """
        key = tuple(parts)
        if mode is Resolve.CREATE and self._cache is not None and self._cache[0] == key:
            hit = self._cache[1]
            return Dir(os.dup(hit.fd), hit.parts, hit.lowers)
        found = walk(
            self.root, key, lambda cur, name, _last: self._step(cur, name, mode), Dir.close, "/".join(key)
        )
        if found is None:
            return None
        if found is self.root:
            found = Dir(os.dup(self.root.fd), (), self.root.lowers)
        if mode is Resolve.CREATE:
            self.invalidate()
            self._cache = (key, Dir(os.dup(found.fd), found.parts, found.lowers))
        return found

    def _step(self, cur: Dir, name: str, mode: Resolve) -> Dir | str | None:
        """One component: the child directory, a symlink target to walk, or None (absent)."""
        try:
            fd = os.open(name, O_DIR, dir_fd=cur.fd)
        except FileNotFoundError:
            st = None
        except OSError as exc:
            if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                raise
            st = os.lstat(name, dir_fd=cur.fd)
        else:
            lowers = () if not cur.lowers or _is_opaque(fd) else self._lower(cur, name).merging
            return Dir(fd, (*cur.parts, name), lowers)
        here = posixpath.join(cur.path, name)
        if st is not None:
            if stat.S_ISLNK(st.st_mode):
                return os.readlink(name, dir_fd=cur.fd)
            if self.overlay and is_whiteout(st):
                # Deleted by this layer: only a new, opaque directory may take its place.
                if mode is not Resolve.CREATE:
                    return None
                os.unlink(name, dir_fd=cur.fd)
                return self._mkdir(cur, name, opaque=True)
            raise NotADirectoryError(errno.ENOTDIR, "not a directory", here)
        below = self._lower(cur, name)
        if below.st is None or is_whiteout(below.st):
            return self._mkdir(cur, name) if mode is Resolve.CREATE else None
        if stat.S_ISLNK(below.st.st_mode):
            return os.readlink(below.path)
        if not stat.S_ISDIR(below.st.st_mode):
            raise NotADirectoryError(errno.ENOTDIR, "not a directory (in a lower layer)", here)
        if mode is Resolve.LOOKUP:
            return None
        return self._copy_up(cur, name, below)

    def _lower(self, cur: Dir, name: str) -> _Found:
        """``name`` in the lowers merging into ``cur``, looked up as overlayfs does."""
        found = _Found()
        merging: list[str] = []
        for lower in cur.lowers:
            path = os.path.join(lower, name)
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                continue
            if found.st is None:
                found.st, found.path = st, path
            if not stat.S_ISDIR(st.st_mode):
                break
            merging.append(path)
            if _is_opaque(path):
                break
        found.merging = tuple(merging)
        return found

    def _mkdir(self, cur: Dir, name: str, opaque: bool = False) -> Dir:
        os.mkdir(name, 0o755, dir_fd=cur.fd)
        fd = os.open(name, O_DIR, dir_fd=cur.fd)
        os.fchmod(fd, 0o755)  # whatever the umask
        if opaque:
            os.setxattr(fd, OPAQUE_XATTR, b"y")
        return Dir(fd, (*cur.parts, name), ())

    def _copy_up(self, cur: Dir, name: str, below: _Found) -> Dir:
        assert below.st is not None
        st = below.st
        d = self._mkdir(cur, name)
        d.lowers = below.merging
        os.fchown(d.fd, st.st_uid, st.st_gid)
        copy_xattrs(below.path, d.fd, d.path)
        os.fchmod(d.fd, stat.S_IMODE(st.st_mode))
        self.copied_up.append((d.parts, st.st_atime_ns, st.st_mtime_ns))
        return d

    def open_exact(self, parts: Sequence[str]) -> int | None:
        """The fd of the directory at exactly ``parts`` (no symlinks anywhere), or None."""
        fd = os.dup(self.root.fd)
        try:
            for name in parts:
                nxt = os.open(name, O_DIR, dir_fd=fd)
                os.close(fd)
                fd = nxt
        except OSError:
            os.close(fd)
            return None
        return fd

    # -- changes ------------------------------------------------------------

    def remove(self, d: Dir, name: str) -> os.stat_result | None:
        """Remove ``name`` from ``d`` (a directory recursively, without following symlinks).

        Returns what was there (None if nothing). In the overlay form this
        only removes the upper's entry; callers put a whiteout or a new entry
        in its place.
        """
        st = lstat_at(d, name)
        if st is None:
            return None
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(name, dir_fd=d.fd)
        else:
            os.unlink(name, dir_fd=d.fd)
        self.invalidate()
        return st

    def clear_opaque(self, d: Dir, keep: set[str]) -> None:
        """Delete form of an opaque marker: remove what this layer did not put in ``d``.

        ``keep`` holds the canonical paths of the entries unpacked so far;
        kept directories are cleared the same way, recursively (containerd's
        rule: an opaque directory shows only this layer's entries).
        """
        for name in os.listdir(d.fd):
            path = posixpath.join(d.path, name)
            if path not in keep:
                self.remove(d, name)
                continue
            try:
                fd = os.open(name, O_DIR, dir_fd=d.fd)
            except OSError:  # a kept non-directory
                continue
            with Dir(fd, (*d.parts, name)) as child:
                self.clear_opaque(child, keep)


def copy_xattrs(src: str, dst_fd: int, what: str) -> None:
    """Copy the xattrs of ``src`` (not followed) onto ``dst_fd``; overlay's own are not copied."""
    try:
        names = os.listxattr(src, follow_symlinks=False)
    except OSError:
        return
    for key in names:
        if key.startswith(OVERLAY_XATTR_PREFIX):
            continue
        try:
            os.setxattr(dst_fd, key, os.getxattr(src, key, follow_symlinks=False))
        except OSError as exc:
            log.warning("diff.copy_up_xattr_skipped", path=what, xattr=key, error=exc.strerror)
