"""Crafting layer tars (honest and hostile) and looking at trees, for the diff tests.

``tarfile`` writes whatever a :class:`tarfile.TarInfo` says (``addfile`` does
not clean names), so ``../x``, ``/abs`` and links anywhere are easy to make.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import tarfile
import zlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import zstandard

MTIME = 1_600_000_000


@dataclass
class E:
    """One tar entry: ``kind`` is file, dir, symlink, link, chr, blk or fifo."""

    name: str
    kind: str = "file"
    data: bytes = b""
    link: str = ""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    mtime: float = MTIME
    major: int = 0
    minor: int = 0
    xattrs: Mapping[str, bytes] = field(default_factory=dict)
    pax: Mapping[str, str] = field(default_factory=dict)


_TYPES = {
    "file": tarfile.REGTYPE,
    "dir": tarfile.DIRTYPE,
    "symlink": tarfile.SYMTYPE,
    "link": tarfile.LNKTYPE,
    "chr": tarfile.CHRTYPE,
    "blk": tarfile.BLKTYPE,
    "fifo": tarfile.FIFOTYPE,
}


def file(name: str, data: bytes = b"", **kw: object) -> E:
    return E(name, "file", data=data, **kw)  # type: ignore[arg-type]


def dir_(name: str, mode: int = 0o755, **kw: object) -> E:
    return E(name, "dir", mode=mode, **kw)  # type: ignore[arg-type]


def symlink(name: str, target: str) -> E:
    return E(name, "symlink", link=target, mode=0o777)


def hardlink(name: str, target: str) -> E:
    return E(name, "link", link=target)


def whiteout(path: str) -> E:
    """A ``.wh.`` marker deleting ``path``."""
    head, _, base = path.rpartition("/")
    return file(f"{head}/.wh.{base}" if head else f".wh.{base}")


def opaque(directory: str) -> E:
    return file(f"{directory}/.wh..wh..opq")


def tar_bytes(entries: Iterable[E]) -> bytes:
    """A PAX tar of ``entries``, names and link targets written exactly as given."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for e in entries:
            ti = tarfile.TarInfo(e.name)
            ti.type = _TYPES[e.kind]
            ti.mode, ti.uid, ti.gid, ti.mtime = e.mode, e.uid, e.gid, e.mtime
            ti.linkname = e.link
            ti.devmajor, ti.devminor = e.major, e.minor
            pax = dict(e.pax)
            for key, value in e.xattrs.items():
                pax["SCHILY.xattr." + key] = value.decode("utf-8", "surrogateescape")
            ti.pax_headers = pax
            if e.kind == "file":
                ti.size = len(e.data)
                tf.addfile(ti, io.BytesIO(e.data))
            else:
                tf.addfile(ti)
    return buf.getvalue()


def gzip_bytes(data: bytes) -> bytes:
    c = zlib.compressobj(6, zlib.DEFLATED, 31)
    return c.compress(data) + c.flush()


def zstd_bytes(data: bytes) -> bytes:
    return zstandard.ZstdCompressor().compress(data)


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class BytesStream:
    """An async :class:`daemon.protocols.ByteStream` over bytes, ``chunk`` at most per read."""

    def __init__(self, data: bytes, chunk: int = 64 * 1024) -> None:
        self._data = memoryview(data)
        self._chunk = chunk
        self.given = 0

    async def read(self, n: int = -1) -> bytes:
        size = min(self._chunk, n if n > 0 else self._chunk)
        out = bytes(self._data[self.given : self.given + size])
        self.given += len(out)
        return out


class GenStream:
    """An async byte stream produced lazily from an iterator of byte pieces."""

    def __init__(self, pieces: Iterator[bytes]) -> None:
        self._pieces = pieces
        self._buf = b""
        self.given = 0

    async def read(self, n: int = -1) -> bytes:
        while not self._buf:
            piece = next(self._pieces, None)
            if piece is None:
                return b""
            self._buf = piece
        n = n if n > 0 else len(self._buf)
        out, self._buf = self._buf[:n], self._buf[n:]
        self.given += len(out)
        return out


def big_file_tar(name: str, size: int, block: bytes) -> Iterator[bytes]:
    """An uncompressed tar holding one ``size``-byte file made of ``block`` repeated, lazily."""
    ti = tarfile.TarInfo(name)
    ti.size, ti.mode, ti.mtime = size, 0o644, MTIME
    yield ti.tobuf(format=tarfile.PAX_FORMAT)
    left = size
    while left:
        piece = block[: min(left, len(block))]
        left -= len(piece)
        yield piece
    yield b"\0" * (-size % tarfile.BLOCKSIZE) + b"\0" * (2 * tarfile.BLOCKSIZE)


# -- looking at trees ----------------------------------------------------------


def snapshot(root: str, skip: Iterable[str] = ()) -> dict[str, tuple[object, ...]]:
    """Everything observable about a tree (types, modes, owners, times, data, links, xattrs)."""
    skipped = {os.path.abspath(s) for s in skip}
    out: dict[str, tuple[object, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = [d for d in dirnames if os.path.join(dirpath, d) not in skipped]
        for name in ["", *dirnames, *filenames]:
            path = os.path.join(dirpath, name) if name else dirpath
            st = os.lstat(path)
            extra: object = None
            if stat.S_ISREG(st.st_mode):
                with open(path, "rb") as f:
                    extra = hashlib.sha256(f.read()).hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                extra = os.readlink(path)
            try:
                xattrs = tuple(
                    sorted(
                        (k, os.getxattr(path, k, follow_symlinks=False))
                        for k in os.listxattr(path, follow_symlinks=False)
                    )
                )
            except OSError:
                xattrs = ()
            out[os.path.relpath(path, root)] = (
                st.st_mode,
                st.st_uid,
                st.st_gid,
                st.st_size,
                st.st_mtime_ns,
                st.st_ino,
                st.st_nlink,
                st.st_rdev,
                extra,
                xattrs,
            )
    return out


def make_tree(root: str, entries: Iterable[E]) -> None:
    """Lay ``entries`` out on disk directly (a lower layer, or a snapshot's existing content)."""
    os.makedirs(root, exist_ok=True)
    for e in entries:
        path = os.path.join(root, e.name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if e.kind == "dir":
            os.makedirs(path, exist_ok=True)
        elif e.kind == "symlink":
            os.symlink(e.link, path)
        elif e.kind == "file":
            with open(path, "wb") as f:
                f.write(e.data)
        elif e.kind == "chr":
            os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(e.major, e.minor))
        else:
            raise ValueError(e.kind)
        for key, value in e.xattrs.items():
            os.setxattr(path, key, value, follow_symlinks=False)
        if e.kind != "symlink":
            os.chown(path, e.uid, e.gid)
            os.chmod(path, e.mode)
            os.utime(path, (e.mtime, e.mtime))
