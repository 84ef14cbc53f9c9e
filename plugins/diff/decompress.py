"""From raw layer bytes to the uncompressed tar stream, incrementally.

Everything here runs in the apply worker thread and reads a little at a time:
no reader ever asks for more than a bounded number of bytes, so a layer is
never held in memory, and neither is its decompressed form (a gzip or zstd
"bomb" of a few kilobytes that expands to gigabytes is fine: output comes
out in pieces as small as the tar parser asks for).

Compression is detected from the magic bytes, as containerd does
(``compression.DecompressStream``): Docker's ``rootfs.diff.tar.gzip`` layers
are sometimes not compressed at all, so the media type is only a hint and
must merely be one we know. A malformed stream (not gzip/zstd where the magic
says so, truncated, corrupt, bad checksum, trailing garbage) is an
:class:`~daemon.errors.InvalidArgument` naming the layer digest: the bytes
are not a valid layer, whatever the reason they came out that way.
"""

from __future__ import annotations

import enum
import hashlib
import zlib
from typing import IO, Protocol, cast

import zstandard

from daemon.errors import InvalidArgument

#: How much a reader asks of the stream below it at a time.
READ_SIZE = 256 * 1024

#: Largest zstd window accepted (the library's default limit, 2**27): a frame
#: declaring more is refused rather than allowed to allocate it.
ZSTD_MAX_WINDOW = 1 << 27

#: The media type of what :meth:`TarApplier.apply` returns: an uncompressed layer.
MEDIA_TYPE_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"

_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_XZ_MAGIC = b"\xfd7zXZ\x00"
_BZIP2_MAGIC = b"BZh"
_BZIP2_BLOCK = b"1AY&SY"


class Compression(enum.Enum):
    NONE = "none"
    GZIP = "gzip"
    ZSTD = "zstd"


#: The layer media types the applier takes, with the compression they announce.
#: ``""`` (no media type given) means: detect.
MEDIA_TYPES: dict[str, Compression | None] = {
    "": None,
    "application/vnd.oci.image.layer.v1.tar": Compression.NONE,
    "application/vnd.oci.image.layer.v1.tar+gzip": Compression.GZIP,
    "application/vnd.oci.image.layer.v1.tar+zstd": Compression.ZSTD,
    "application/vnd.oci.image.layer.nondistributable.v1.tar": Compression.NONE,
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip": Compression.GZIP,
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd": Compression.ZSTD,
    "application/vnd.docker.image.rootfs.diff.tar": Compression.NONE,
    "application/vnd.docker.image.rootfs.diff.tar.gzip": Compression.GZIP,
    "application/vnd.docker.image.rootfs.diff.tar.zstd": Compression.ZSTD,
    "application/vnd.docker.image.rootfs.foreign.diff.tar": Compression.NONE,
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip": Compression.GZIP,
}


class Source(Protocol):
    """A blocking byte source: up to ``n`` bytes, ``b""`` only at the end."""

    def read(self, n: int) -> bytes: ...


def media_type_hint(media_type: str, layer: str) -> Compression | None:
    """The compression ``media_type`` announces; InvalidArgument if it is not a layer type we know."""
    try:
        return MEDIA_TYPES[media_type]
    except KeyError:
        raise InvalidArgument(
            f"layer {layer}: media type {media_type!r} is not a supported layer type "
            "(OCI or Docker layer tar, uncompressed, gzip or zstd)"
        ) from None


def detect(head: bytes, layer: str) -> Compression:
    """Compression from the first bytes of a layer (at least 10 when the layer has them)."""
    if head.startswith(_GZIP_MAGIC):
        return Compression.GZIP
    if head.startswith(_ZSTD_MAGIC):
        return Compression.ZSTD
    if head.startswith(_XZ_MAGIC):
        raise InvalidArgument(f"layer {layer}: xz compression is not supported (gzip or zstd only)")
    if head.startswith(_BZIP2_MAGIC) and head[4:10] == _BZIP2_BLOCK:
        raise InvalidArgument(f"layer {layer}: bzip2 compression is not supported (gzip or zstd only)")
    return Compression.NONE


class PeekSource:
    """A :class:`Source` whose first bytes can be looked at before reading."""

    def __init__(self, inner: Source) -> None:
        self._inner = inner
        self._head = b""

    def peek(self, n: int) -> bytes:
        while len(self._head) < n:
            data = self._inner.read(max(n - len(self._head), READ_SIZE))
            if not data:
                break
            self._head += data
        return self._head[:n]

    def read(self, n: int) -> bytes:
        if self._head:
            out, self._head = self._head[:n], self._head[n:]
            return out
        return self._inner.read(n)


class GzipReader:
    """Incremental gzip, multi-member (``pigz``, concatenated files), output bounded per read.

    Zero bytes after a member are padding (as Python's gzip and GNU gzip
    accept); anything else after a member must be another member.
    """

    def __init__(self, src: Source, layer: str) -> None:
        self._src = src
        self._layer = layer
        self._d = zlib.decompressobj(wbits=31)
        self._pending = b""
        self._between = False  # a member just ended; the next bytes start another or end the stream
        self._consumed = 0

    def _fill(self) -> bool:
        data = self._src.read(READ_SIZE)
        self._consumed += len(data)
        self._pending = data
        return bool(data)

    def read(self, n: int) -> bytes:
        while True:
            if self._between:
                while not (pending := self._pending.lstrip(b"\0")):
                    if not self._fill():
                        return b""
                self._pending = pending
                if len(self._pending) < 2:
                    more = self._src.read(READ_SIZE)
                    self._consumed += len(more)
                    self._pending += more
                if not self._pending.startswith(_GZIP_MAGIC):
                    at = self._consumed
                    raise InvalidArgument(
                        f"layer {self._layer}: trailing data after the gzip stream, near byte {at}"
                    )
                self._d = zlib.decompressobj(wbits=31)
                self._between = False
            if not self._pending and not self._fill():
                raise InvalidArgument(
                    f"layer {self._layer}: gzip stream truncated after {self._consumed} compressed bytes"
                )
            try:
                out = self._d.decompress(self._pending, n)
            except zlib.error as exc:
                raise InvalidArgument(f"layer {self._layer}: corrupt gzip stream: {exc}") from None
            if self._d.eof:
                self._pending = self._d.unused_data
                self._between = True
            else:
                self._pending = self._d.unconsumed_tail
            if out:
                return out


class ZstdFrames:
    """Follows zstd frame and block boundaries in the compressed bytes.

    The ``zstandard`` stream reader reports a truncated stream as a clean end
    (it returns ``b""``), so the frame structure is tracked here (RFC 8878,
    headers only: a few bytes per 128 KiB block) to tell a complete stream
    from a cut one.
    """

    _MAGIC, _FHD, _HEADER, _BLOCK, _CHECKSUM, _SKIP_SIZE = range(6)

    def __init__(self, layer: str) -> None:
        self._layer = layer
        self._state = self._MAGIC
        self._need = 4
        self._buf = bytearray()
        self._skip = 0
        self._after_skip = self._MAGIC
        self._checksum = False
        self._offset = 0
        self.frames = 0

    def feed(self, data: bytes) -> None:
        i, n = 0, len(data)
        while i < n:
            if self._skip:
                take = min(self._skip, n - i)
                self._skip -= take
                i += take
                if not self._skip:
                    self._goto(self._after_skip)
                continue
            take = min(self._need - len(self._buf), n - i)
            self._buf += data[i : i + take]
            i += take
            if len(self._buf) == self._need:
                field = bytes(self._buf)
                self._buf.clear()
                self._field(field)
        self._offset += n

    def finish(self) -> None:
        if self._state != self._MAGIC or self._buf or self._skip or not self.frames:
            raise InvalidArgument(
                f"layer {self._layer}: zstd stream truncated after {self._offset} compressed bytes"
            )

    def _goto(self, state: int) -> None:
        if state == self._MAGIC:
            self.frames += 1
        self._state = state
        self._need = {
            self._MAGIC: 4,
            self._FHD: 1,
            self._BLOCK: 3,
            self._CHECKSUM: 4,
            self._SKIP_SIZE: 4,
        }.get(state, self._need)

    def _field(self, b: bytes) -> None:
        value = int.from_bytes(b, "little")
        if self._state == self._MAGIC:
            if value == 0xFD2FB528:
                self._state, self._need = self._FHD, 1
            elif 0x184D2A50 <= value <= 0x184D2A5F:
                self._state, self._need = self._SKIP_SIZE, 4
            else:
                raise InvalidArgument(f"layer {self._layer}: not a zstd frame (magic {b.hex()})")
        elif self._state == self._FHD:
            fcs, single, reserved = value >> 6, (value >> 5) & 1, (value >> 3) & 1
            if reserved:
                raise InvalidArgument(f"layer {self._layer}: corrupt zstd frame header")
            self._checksum = bool((value >> 2) & 1)
            size = (0 if single else 1) + (0, 1, 2, 4)[value & 3] + ((1 if single else 0), 2, 4, 8)[fcs]
            if size:
                self._state, self._need = self._HEADER, size
            else:
                self._goto(self._BLOCK)
        elif self._state == self._HEADER:
            self._goto(self._BLOCK)
        elif self._state == self._BLOCK:
            last, kind, size = value & 1, (value >> 1) & 3, value >> 3
            if kind == 3:
                raise InvalidArgument(f"layer {self._layer}: corrupt zstd block (reserved type)")
            nxt = self._BLOCK
            if last:
                nxt = self._CHECKSUM if self._checksum else self._MAGIC
            content = 1 if kind == 1 else size
            if content:
                self._skip, self._after_skip = content, nxt
            else:
                self._goto(nxt)
        elif self._state == self._CHECKSUM:
            self._goto(self._MAGIC)
        elif self._state == self._SKIP_SIZE:
            if value:
                self._skip, self._after_skip = value, self._MAGIC
            else:
                self._goto(self._MAGIC)


class _Tracked:
    """The compressed source, seen by :class:`ZstdFrames` on its way to the decoder."""

    def __init__(self, src: Source, frames: ZstdFrames) -> None:
        self._src = src
        self._frames = frames

    def read(self, n: int) -> bytes:
        data = self._src.read(n)
        if data:
            self._frames.feed(data)
        else:
            self._frames.finish()
        return data


class ZstdReader:
    """Incremental zstd, multi-frame, output bounded per read."""

    def __init__(self, src: Source, layer: str) -> None:
        self._layer = layer
        self._tracked = _Tracked(src, ZstdFrames(layer))
        dctx = zstandard.ZstdDecompressor(max_window_size=ZSTD_MAX_WINDOW)
        self._reader = dctx.stream_reader(
            cast("IO[bytes]", self._tracked), read_size=READ_SIZE, read_across_frames=True, closefd=False
        )
        self._done = False

    def read(self, n: int) -> bytes:
        if self._done:
            return b""
        try:
            out = self._reader.read(n)
        except zstandard.ZstdError as exc:
            raise InvalidArgument(f"layer {self._layer}: corrupt zstd stream: {exc}") from None
        if not out:
            # The decoder stops at the source's end; make sure it got there.
            if self._tracked.read(READ_SIZE):
                raise InvalidArgument(f"layer {self._layer}: trailing data after the zstd stream")
            self._done = True
        return out


def open_reader(src: Source, compression: Compression, layer: str) -> Source:
    """The uncompressed stream of ``src``."""
    if compression is Compression.GZIP:
        return GzipReader(src, layer)
    if compression is Compression.ZSTD:
        return ZstdReader(src, layer)
    return src


class HashingReader:
    """The uncompressed tar as the parser reads it, hashed and counted on the way: the diff id."""

    def __init__(self, inner: Source) -> None:
        self._inner = inner
        self._hash = hashlib.sha256()
        self.size = 0

    def read(self, n: int = -1) -> bytes:
        data = self._inner.read(n if n > 0 else READ_SIZE)
        self._hash.update(data)
        self.size += len(data)
        return data

    def drain(self) -> None:
        """Read (and hash) what the tar parser left: padding after the end-of-archive marker."""
        while self.read(READ_SIZE):
            pass

    def digest(self) -> str:
        return "sha256:" + self._hash.hexdigest()
