"""SPDY/3 name/value header blocks and their zlib compression.

A header block (SPDY/3 section 2.6.10) is ``u32 count`` followed by ``count``
pairs of ``u32 length, name`` and ``u32 length, value``. Names are lowercase
and unique; one name carrying several values joins them with NUL. The block is
compressed with zlib seeded with the fixed SPDY/3 dictionary (section 2.6.10.1),
and the compression context is *per direction per connection*: every
SYN_STREAM, SYN_REPLY and HEADERS frame a side sends continues the same deflate
stream (each block ends with a sync flush), so a decoder must see every block in
wire order. One :class:`HeaderDeflater` and one :class:`HeaderInflater` per
session, never per stream.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterable, Iterator, Mapping

from daemon.streaming.errors import ProtocolError

# The SPDY/3 dictionary: length-prefixed header names and common values, then a
# raw run of status codes, reason phrases, dates and media types. Built from the
# spec's word list rather than pasted as bytes so a reader can audit it;
# DICTIONARY_ADLER32 (the zlib dictionary id every SPDY/3 peer puts in the
# first block's zlib header) pins it to the byte.
_DICTIONARY_WORDS = (
    "options", "head", "post", "put", "delete", "trace", "accept", "accept-charset",
    "accept-encoding", "accept-language", "accept-ranges", "age", "allow", "authorization",
    "cache-control", "connection", "content-base", "content-encoding", "content-language",
    "content-length", "content-location", "content-md5", "content-range", "content-type",
    "date", "etag", "expect", "expires", "from", "host", "if-match", "if-modified-since",
    "if-none-match", "if-range", "if-unmodified-since", "last-modified", "location",
    "max-forwards", "pragma", "proxy-authenticate", "proxy-authorization", "range", "referer",
    "retry-after", "server", "te", "trailer", "transfer-encoding", "upgrade", "user-agent",
    "vary", "via", "warning", "www-authenticate", "method", "get", "status", "200 OK",
    "version", "HTTP/1.1", "url", "public", "set-cookie", "keep-alive", "origin",
)  # fmt: skip
_DICTIONARY_TAIL = (
    "100101201202205206300302303304305306307402405406407408409410411412413414415416417502504505"
    "203 Non-Authoritative Information"
    "204 No Content"
    "301 Moved Permanently"
    "400 Bad Request"
    "401 Unauthorized"
    "403 Forbidden"
    "404 Not Found"
    "500 Internal Server Error"
    "501 Not Implemented"
    "503 Service Unavailable"
    "Jan Feb Mar Apr May Jun Jul Aug Sept Oct Nov Dec 00:00:00 "
    "Mon, Tue, Wed, Thu, Fri, Sat, Sun, GMT"
    "chunked,text/html,image/png,image/jpg,image/gif,application/xml,application/xhtml+xml,"
    "text/plain,text/javascript,publicprivatemax-age=gzip,deflate,sdch"
    "charset=utf-8charset=iso-8859-1,utf-,*,enq=0."
)
DICTIONARY: bytes = b"".join(
    struct.pack(">I", len(w)) + w.encode("ascii") for w in _DICTIONARY_WORDS
) + _DICTIONARY_TAIL.encode("ascii")
DICTIONARY_LENGTH = 1423
DICTIONARY_ADLER32 = 0xE3C6A7C2

# A decompressed block larger than this is refused (a zlib bomb in a header
# block must not cost more than this much memory).
MAX_HEADER_BLOCK = 256 << 10
_U32 = struct.Struct(">I")


class Headers(Mapping[str, str]):
    """An immutable, case-insensitive header block; a name may carry several values.

    ``headers["streamtype"]`` is the first value (what Go's ``Header.Get`` gives),
    :meth:`get_all` every value in order. Names are stored lowercase, as the wire
    requires.
    """

    __slots__ = ("_values",)

    def __init__(self, items: Mapping[str, str] | Iterable[tuple[str, str]] = ()) -> None:
        pairs = items.items() if isinstance(items, Mapping) else items
        values: dict[str, list[str]] = {}
        for name, value in pairs:
            values.setdefault(name.lower(), []).append(value)
        self._values = values

    def __getitem__(self, name: str) -> str:
        return self._values[name.lower()][0]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._values

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Headers):
            return self._values == other._values
        return NotImplemented

    def __hash__(self) -> int:
        return hash(tuple((k, tuple(v)) for k, v in self._values.items()))

    def __repr__(self) -> str:
        return f"Headers({self._values!r})"

    def get_all(self, name: str) -> list[str]:
        return list(self._values.get(name.lower(), ()))

    def pairs(self) -> list[tuple[str, str]]:
        return [(k, v) for k, vs in self._values.items() for v in vs]


def encode_block(headers: Headers) -> bytes:
    """The uncompressed name/value block; values of one name are joined with NUL."""
    parts = [_U32.pack(len(headers))]
    for name, values in headers._values.items():
        if not name:
            raise ProtocolError("spdy headers: empty header name")
        raw_name = name.encode("utf-8")
        raw_value = "\0".join(values).encode("utf-8")
        parts += [_U32.pack(len(raw_name)), raw_name, _U32.pack(len(raw_value)), raw_value]
    return b"".join(parts)


def decode_block(block: bytes) -> Headers:
    """Parse an uncompressed block; every length is checked against what is left."""
    view = memoryview(block)
    pos = 0

    def take(n: int, what: str) -> bytes:
        nonlocal pos
        if n > len(view) - pos:
            raise ProtocolError(f"spdy headers: truncated {what} (need {n} bytes, have {len(view) - pos})")
        out = bytes(view[pos : pos + n])
        pos += n
        return out

    (count,) = _U32.unpack(take(4, "pair count"))
    if count * 8 > len(view) - pos:
        raise ProtocolError(f"spdy headers: {count} pairs cannot fit in {len(view) - pos} bytes")
    pairs: list[tuple[str, str]] = []
    seen: set[str] = set()
    for _ in range(count):
        (nlen,) = _U32.unpack(take(4, "name length"))
        name = take(nlen, "name").decode("utf-8", "replace")
        (vlen,) = _U32.unpack(take(4, "value length"))
        value = take(vlen, "value").decode("utf-8", "replace")
        if not name:
            raise ProtocolError("spdy headers: empty header name")
        key = name.lower()
        if key in seen:
            raise ProtocolError(f"spdy headers: duplicate header name {key!r}")
        seen.add(key)
        pairs.extend((key, v) for v in value.split("\0"))
    if pos != len(view):
        raise ProtocolError(f"spdy headers: {len(view) - pos} trailing bytes after the last pair")
    return Headers(pairs)


class HeaderDeflater:
    """The sending side's compression context: one per connection, used in wire order."""

    def __init__(self, level: int = zlib.Z_DEFAULT_COMPRESSION) -> None:
        self._z = zlib.compressobj(level, zlib.DEFLATED, 15, 8, zlib.Z_DEFAULT_STRATEGY, DICTIONARY)

    def compress(self, headers: Headers) -> bytes:
        """Compress one block; it ends on a sync flush, so the peer can decode it at once."""
        return self._z.compress(encode_block(headers)) + self._z.flush(zlib.Z_SYNC_FLUSH)


class HeaderInflater:
    """The receiving side's decompression context: one per connection, fed in wire order."""

    def __init__(self, max_block: int = MAX_HEADER_BLOCK) -> None:
        self._z = zlib.decompressobj(15, DICTIONARY)
        self._max = max_block

    def decompress(self, data: bytes) -> Headers:
        """Decode one frame's compressed block; a bomb, a corrupt stream or a partial block fails.

        Any failure leaves the context unusable (the peer's deflate stream and
        ours have diverged), which is why it is a session-fatal ProtocolError.
        """
        try:
            raw = self._z.decompress(data, self._max)
        except zlib.error as exc:
            raise ProtocolError(f"spdy headers: bad compressed header block: {exc}") from exc
        if self._z.unconsumed_tail:
            raise ProtocolError(f"spdy headers: header block larger than {self._max} bytes")
        if self._z.eof:
            raise ProtocolError("spdy headers: peer ended its compression stream")
        return decode_block(raw)
