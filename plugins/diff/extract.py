"""Writing the entries of a layer tar into a :class:`~plugins.diff.secure.Tree`.

One pass over the tar, in stream mode (``tarfile`` ``r|``: never seeks,
keeps no member list), in the worker thread. Per entry, the rules are
containerd's (``archive.Apply``) unless said otherwise:

* Names: leading ``/`` stripped, then cleaned; a name that still climbs out
  of the root (``../x``) is **refused** with InvalidArgument naming it, as
  Docker does (containerd silently clamps it to the root; a layer carrying
  such a name is broken or hostile either way). The root entry (``./``) is
  skipped.
* Parent directories are resolved inside the tree (symlinks followed *within*
  the root, see :mod:`plugins.diff.secure`) and created when missing (0755,
  root-owned, or copied up from a lower layer in the overlay form).
* An existing entry is removed first (a directory recursively) unless both
  are directories; files are then created with ``O_EXCL | O_NOFOLLOW``, so
  nothing is ever written through a symlink.
* Hard links: the target (cleaned like a name) must already be in the tree
  (overlay form: in this layer); ``linkat`` never follows, so a link to a
  symlink is a second symlink, never the host file it points at. Links carry
  no metadata of their own.
* Symlink targets are data, created as they are.
* Metadata: numeric owner (lchown), xattrs from PAX ``SCHILY.xattr.*`` (what
  the host refuses is logged and skipped; ``trusted.overlay.*`` is never taken
  from a layer), then mode (setuid/setgid kept: chown clears them, so chmod
  comes after), then times (PAX sub-second times exact; out-of-range times
  become the epoch). Directory times are set at the end, once their contents
  stopped changing them.
* Whiteouts: ``.wh.<name>`` and ``.wh..wh..opq``, in the form of the tree:
  overlay (0/0 character device, ``trusted.overlay.opaque=y``) or delete
  (remove ``<name>``; empty the directory of what this layer did not create).
  Other ``.wh..wh.`` names are AUFS metadata and skipped.
* Device nodes the host refuses (EPERM, e.g. in a user namespace) are logged
  and skipped, as containerd does in a user namespace.
"""

from __future__ import annotations

import errno
import os
import posixpath
import stat
import tarfile
from decimal import Decimal
from typing import IO, Self, cast

import structlog

from daemon.errors import (
    BerthError,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    PermissionDenied,
    ResourceExhausted,
)
from daemon.pathsafe import O_DIR
from plugins.diff.decompress import HashingReader
from plugins.diff.secure import (
    OPAQUE_XATTR,
    OVERLAY_XATTR_PREFIX,
    Dir,
    Resolve,
    Tree,
    is_whiteout,
    lstat_at,
)

log = structlog.get_logger("berth.diff")

WHITEOUT_PREFIX = ".wh."
WHITEOUT_META_PREFIX = ".wh..wh."
WHITEOUT_OPAQUE = ".wh..wh..opq"
XATTR_PAX_PREFIX = "SCHILY.xattr."

#: Bytes of file data copied per write.
COPY_SIZE = 1 << 20
#: The tar parser's read size.
TAR_BUFSIZE = 64 * 1024
_MAX_NS = 2**63 - 1


class CorruptTar(tarfile.TarError):
    """A damaged header in the middle of a tar (``tarfile`` would take it as the end)."""


#: What ``tarfile`` raises at a clean end: a zero block, or no data at a block boundary
#: (both left out of typeshed, hence the lookup).
_CLEAN_END: tuple[type[Exception], ...] = (vars(tarfile)["EOFHeaderError"], vars(tarfile)["EmptyHeaderError"])


class _StrictTarInfo(tarfile.TarInfo):
    """Tells a damaged header from the end of the archive.

    In stream mode ``tarfile`` ends the archive quietly at a truncated or
    invalid header after the first one; a layer cut or corrupted there must
    fail instead. A zero block or the end of data at a block boundary is
    still a clean end (Go's archive/tar accepts both too).
    """

    @classmethod
    def fromtarfile(cls, tf: tarfile.TarFile) -> Self:
        try:
            return super().fromtarfile(tf)
        except _CLEAN_END:
            raise
        except tarfile.HeaderError as exc:
            raise CorruptTar(str(exc)) from None


def clean_name(name: str, layer: str, what: str) -> tuple[str, ...] | None:
    """``name`` as path components inside the root; None for the root itself.

    InvalidArgument (naming ``what`` and ``name``) if it leads outside.
    """
    path = posixpath.normpath(name.lstrip("/") or ".")
    if path == ".." or path.startswith("../"):
        raise InvalidArgument(f"layer {layer}: {what} {name!r}: path leads outside the snapshot root")
    if path == ".":
        return None
    return tuple(path.split("/"))


def os_error(layer: str, entry: str, exc: OSError) -> BerthError:
    """An OSError met while writing ``entry``, as the error class its cause calls for."""
    where = f" ({exc.filename})" if exc.filename else ""
    msg = f"layer {layer}: entry {entry!r}: {exc.strerror or exc}{where}"
    code = exc.errno
    if code in (errno.ENOSPC, errno.EDQUOT, errno.EMFILE, errno.ENFILE, errno.ENOMEM):
        return ResourceExhausted(msg)
    if code == errno.EROFS:
        return FailedPrecondition(msg)
    if code in (errno.EPERM, errno.EACCES):
        return PermissionDenied(msg)
    if code == errno.EIO:
        return Internal(msg)
    return InvalidArgument(msg)


def _ns(pax: str | None, value: float | None) -> int | None:
    if pax:
        try:
            return int(Decimal(pax) * 1_000_000_000)
        except (ArithmeticError, ValueError):
            pass
    if value is None:
        return None
    if isinstance(value, int):
        return value * 1_000_000_000
    return round(value * 1e9)


def _bound(ns: int) -> int:
    return ns if 0 <= ns <= _MAX_NS else 0


def entry_times(m: tarfile.TarInfo) -> tuple[int, int]:
    """(atime, mtime) in ns; atime is the later of the two, as containerd sets it."""
    mtime = _ns(m.pax_headers.get("mtime"), m.mtime) or 0
    atime = _ns(m.pax_headers.get("atime"), None)
    atime = mtime if atime is None else max(atime, mtime)
    return _bound(atime), _bound(mtime)


def _mode(m: tarfile.TarInfo) -> int:
    return m.mode & 0o7777


def _copy(src: IO[bytes], fd: int) -> None:
    while chunk := src.read(COPY_SIZE):
        view = memoryview(chunk)
        while view:
            view = view[os.write(fd, view) :]


class Extractor:
    """Writes one layer's entries into a tree; :meth:`run` returns how many entries it read."""

    def __init__(self, tree: Tree, layer: str) -> None:
        self.tree = tree
        self.layer = layer
        self.entries = 0
        #: delete form: canonical paths this layer unpacked (what an opaque marker keeps)
        self._keep: set[str] | None = None if tree.overlay else set()
        self._dir_times: list[tuple[tuple[str, ...], int, int]] = []

    def run(self, reader: HashingReader) -> int:
        try:
            tf = tarfile.open(  # noqa: SIM115 - closed by the with below
                fileobj=cast("IO[bytes]", reader),  # read() is all stream mode uses
                mode="r|",
                bufsize=TAR_BUFSIZE,
                tarinfo=_StrictTarInfo,
                encoding="utf-8",
                errors="surrogateescape",
            )
        except tarfile.TarError as exc:
            if reader.size == 0:
                return 0  # an empty stream is an empty layer, as for Go's archive/tar
            raise InvalidArgument(f"layer {self.layer}: not a valid tar archive: {exc}") from None
        with tf:
            while True:
                try:
                    member = tf.next()
                except tarfile.TarError as exc:
                    raise InvalidArgument(
                        f"layer {self.layer}: not a valid tar archive after {self.entries} entries: {exc}"
                    ) from None
                if member is None:
                    break
                tf.members.clear()  # type: ignore[attr-defined]  # stream mode would keep every TarInfo
                self.entries += 1
                try:
                    self._entry(tf, member)
                except OSError as exc:
                    raise os_error(self.layer, member.name, exc) from None
                except tarfile.TarError as exc:
                    raise InvalidArgument(
                        f"layer {self.layer}: entry {member.name!r}: not a valid tar archive: {exc}"
                    ) from None
        self._set_dir_times()
        return self.entries

    # -- entries ------------------------------------------------------------

    def _entry(self, tf: tarfile.TarFile, m: tarfile.TarInfo) -> None:
        parts = clean_name(m.name, self.layer, "entry")
        if parts is None:
            log.debug("diff.root_entry_skipped", layer=self.layer, entry=m.name)
            return
        *parent, base = parts
        if base.startswith(WHITEOUT_PREFIX):
            self._whiteout(parent, base, m)
        elif m.isreg():
            self._file(tf, parent, base, m)
        elif m.isdir():
            self._dir(parent, base, m)
        elif m.issym():
            self._symlink(parent, base, m)
        elif m.islnk():
            self._hardlink(parent, base, m)
        elif m.ischr() or m.isblk() or m.isfifo():
            self._node(parent, base, m)
        else:
            raise InvalidArgument(
                f"layer {self.layer}: entry {m.name!r}: unsupported tar entry type {m.type!r}"
            )

    def _parent(self, parent: list[str]) -> Dir:
        d = self.tree.resolve(parent, Resolve.CREATE)
        assert d is not None  # CREATE always yields a directory or raises
        return d

    def _clear(self, d: Dir, name: str, keep_dir: bool = False) -> os.stat_result | None:
        """Make room for a new entry; returns what was there."""
        st = lstat_at(d, name)
        if st is None or (keep_dir and stat.S_ISDIR(st.st_mode)):
            return st
        self.tree.remove(d, name)
        return st

    def _created(self, d: Dir, name: str) -> None:
        if self._keep is not None:
            self._keep.add(posixpath.join(d.path, name))

    def _file(self, tf: tarfile.TarFile, parent: list[str], base: str, m: tarfile.TarInfo) -> None:
        with self._parent(parent) as d:
            self._clear(d, base)
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            fd = os.open(base, flags, 0o600, dir_fd=d.fd)
            try:
                src = tf.extractfile(m)
                if src is not None:
                    _copy(src, fd)
                os.fchown(fd, m.uid, m.gid)
                self._xattrs(fd, m)
                os.fchmod(fd, _mode(m))
                os.utime(fd, ns=entry_times(m))
            finally:
                os.close(fd)
            self._created(d, base)

    def _dir(self, parent: list[str], base: str, m: tarfile.TarInfo) -> None:
        with self._parent(parent) as d:
            st = self._clear(d, base, keep_dir=True)
            if st is None or not stat.S_ISDIR(st.st_mode):
                os.mkdir(base, 0o700, dir_fd=d.fd)
            fd = os.open(base, O_DIR, dir_fd=d.fd)
            try:
                if st is not None and self.tree.overlay and is_whiteout(st):
                    # deleted then recreated by this layer: nothing below may show through
                    os.setxattr(fd, OPAQUE_XATTR, b"y")
                os.fchown(fd, m.uid, m.gid)
                self._xattrs(fd, m)
                os.fchmod(fd, _mode(m))
            finally:
                os.close(fd)
            self._dir_times.append(((*d.parts, base), *entry_times(m)))
            self._created(d, base)

    def _symlink(self, parent: list[str], base: str, m: tarfile.TarInfo) -> None:
        with self._parent(parent) as d:
            self._clear(d, base)
            os.symlink(m.linkname, base, dir_fd=d.fd)
            os.chown(base, m.uid, m.gid, dir_fd=d.fd, follow_symlinks=False)
            self._xattrs(_at(d, base), m)
            os.utime(base, ns=entry_times(m), dir_fd=d.fd, follow_symlinks=False)
            self._created(d, base)

    def _hardlink(self, parent: list[str], base: str, m: tarfile.TarInfo) -> None:
        what = f"entry {m.name!r}: hard link target"
        target = clean_name(m.linkname, self.layer, what)
        if target is None:
            raise InvalidArgument(f"layer {self.layer}: {what} {m.linkname!r}: is the root directory")
        *tparent, tbase = target
        src = self.tree.resolve(tparent, Resolve.LOOKUP)
        if src is None:
            raise InvalidArgument(f"layer {self.layer}: {what} {m.linkname!r}: not found in the layer")
        with src:
            tst = lstat_at(src, tbase)
            if tst is None or (self.tree.overlay and is_whiteout(tst)):
                raise InvalidArgument(f"layer {self.layer}: {what} {m.linkname!r}: not found in the layer")
            if stat.S_ISDIR(tst.st_mode):
                raise InvalidArgument(f"layer {self.layer}: {what} {m.linkname!r}: is a directory")
            with self._parent(parent) as d:
                same_dir = os.path.samestat(os.fstat(src.fd), os.fstat(d.fd))
                if not (same_dir and tbase == base):
                    self._clear(d, base)
                    os.link(tbase, base, src_dir_fd=src.fd, dst_dir_fd=d.fd, follow_symlinks=False)
                self._created(d, base)

    def _node(self, parent: list[str], base: str, m: tarfile.TarInfo) -> None:
        kind = stat.S_IFIFO if m.isfifo() else stat.S_IFCHR if m.ischr() else stat.S_IFBLK
        with self._parent(parent) as d:
            self._clear(d, base)
            try:
                os.mknod(base, kind | _mode(m), os.makedev(m.devmajor, m.devminor), dir_fd=d.fd)
            except PermissionError as exc:
                if m.isfifo():
                    raise
                log.warning("diff.device_skipped", layer=self.layer, entry=m.name, error=exc.strerror)
                return
            os.chown(base, m.uid, m.gid, dir_fd=d.fd, follow_symlinks=False)
            self._xattrs(_at(d, base), m)
            os.chmod(base, _mode(m), dir_fd=d.fd, follow_symlinks=False)
            os.utime(base, ns=entry_times(m), dir_fd=d.fd, follow_symlinks=False)
            self._created(d, base)

    def _whiteout(self, parent: list[str], base: str, m: tarfile.TarInfo) -> None:
        overlay = self.tree.overlay
        if base == WHITEOUT_OPAQUE:
            d = self.tree.resolve(parent, Resolve.COPY_UP if overlay else Resolve.LOOKUP)
            if d is None:
                return  # no such directory: nothing to hide
            with d:
                if overlay:
                    os.setxattr(d.fd, OPAQUE_XATTR, b"y")
                else:
                    assert self._keep is not None
                    self.tree.clear_opaque(d, self._keep)
            self.tree.invalidate()
            return
        if base.startswith(WHITEOUT_META_PREFIX):
            log.debug("diff.aufs_metadata_skipped", layer=self.layer, entry=m.name)
            return
        name = base[len(WHITEOUT_PREFIX) :]
        if name in ("", ".", ".."):
            raise InvalidArgument(f"layer {self.layer}: entry {m.name!r}: whiteout of {name!r} is not a name")
        d = self.tree.resolve(parent, Resolve.COPY_UP if overlay else Resolve.LOOKUP)
        if d is None:
            return
        with d:
            self.tree.remove(d, name)
            if overlay:
                os.mknod(name, stat.S_IFCHR, os.makedev(0, 0), dir_fd=d.fd)
                os.chown(name, m.uid, m.gid, dir_fd=d.fd, follow_symlinks=False)
        self.tree.invalidate()

    # -- metadata -----------------------------------------------------------

    def _xattrs(self, target: int | str, m: tarfile.TarInfo) -> None:
        """Set the entry's PAX xattrs on an fd, or on a path that is not followed."""
        for key, value in m.pax_headers.items():
            if not key.startswith(XATTR_PAX_PREFIX):
                continue
            name = key[len(XATTR_PAX_PREFIX) :]
            if name.startswith(OVERLAY_XATTR_PREFIX):
                log.warning("diff.xattr_refused", layer=self.layer, entry=m.name, xattr=name)
                continue
            data = value.encode("utf-8", "surrogateescape")
            try:
                if isinstance(target, int):
                    os.setxattr(target, name, data)
                else:
                    os.setxattr(target, name, data, follow_symlinks=False)
            except OSError as exc:
                log.warning(
                    "diff.xattr_skipped", layer=self.layer, entry=m.name, xattr=name, error=exc.strerror
                )

    def _set_dir_times(self) -> None:
        for parts, atime, mtime in [*self.tree.copied_up, *self._dir_times]:
            fd = self.tree.open_exact(parts)
            if fd is None:  # replaced or removed later in the layer
                continue
            try:
                os.utime(fd, ns=(atime, mtime))
            finally:
                os.close(fd)


def _at(d: Dir, name: str) -> str:
    """A path to ``name`` in ``d`` through the held fd; the last component is not followed by callers."""
    return f"/proc/self/fd/{d.fd}/{name}"
