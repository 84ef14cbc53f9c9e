"""SPDY/3 frames: the 8-byte header, the control frame bodies, DATA.

Wire layout (SPDY/3 section 2.2), big-endian:

* control frame: ``1 | version:15 | type:16``, ``flags:8 | length:24``, body;
* data frame: ``0 | stream-id:31``, ``flags:8 | length:24``, payload.

The decoder never trusts a length: a control frame is refused above
``max_control_length`` and a data frame above ``max_data_length`` *before* its
body is read, so a hostile peer cannot make us buffer 16 MiB. Control frames of
an unknown type are skipped (the spec says to ignore them) and come back as
:class:`UnknownFrame`. Anything else malformed raises
:class:`~daemon.streaming.errors.ProtocolError`, which is fatal for the session.

Header blocks go through the session's one :class:`HeaderDeflater` /
:class:`HeaderInflater`, so frames must be encoded and decoded in wire order.
"""

from __future__ import annotations

import asyncio
import enum
import struct
from dataclasses import dataclass, field

from daemon.streaming.errors import ProtocolError
from daemon.streaming.spdy.headers import HeaderDeflater, HeaderInflater, Headers

VERSION = 3
HEADER_LENGTH = 8
MAX_LENGTH = (1 << 24) - 1  # the 24-bit length field
DEFAULT_MAX_CONTROL_LENGTH = 256 << 10
DEFAULT_MAX_DATA_LENGTH = 1 << 20
STREAM_ID_MAX = 0x7FFFFFFF

FLAG_FIN = 0x01
FLAG_UNIDIRECTIONAL = 0x02
FLAG_SETTINGS_CLEAR_SETTINGS = 0x01

_U32 = struct.Struct(">I")
_U32X2 = struct.Struct(">II")


class ControlType(enum.IntEnum):
    SYN_STREAM = 1
    SYN_REPLY = 2
    RST_STREAM = 3
    SETTINGS = 4
    PING = 6
    GOAWAY = 7
    HEADERS = 8
    WINDOW_UPDATE = 9


class RstStatus(enum.IntEnum):
    PROTOCOL_ERROR = 1
    INVALID_STREAM = 2
    REFUSED_STREAM = 3
    UNSUPPORTED_VERSION = 4
    CANCEL = 5
    INTERNAL_ERROR = 6
    FLOW_CONTROL_ERROR = 7
    STREAM_IN_USE = 8
    STREAM_ALREADY_CLOSED = 9
    INVALID_CREDENTIALS = 10
    FRAME_TOO_LARGE = 11


class GoAwayStatus(enum.IntEnum):
    OK = 0
    PROTOCOL_ERROR = 1
    INTERNAL_ERROR = 2


class SettingId(enum.IntEnum):
    UPLOAD_BANDWIDTH = 1
    DOWNLOAD_BANDWIDTH = 2
    ROUND_TRIP_TIME = 3
    MAX_CONCURRENT_STREAMS = 4
    CURRENT_CWND = 5
    DOWNLOAD_RETRANS_RATE = 6
    INITIAL_WINDOW_SIZE = 7
    CLIENT_CERTIFICATE_VECTOR_SIZE = 8


@dataclass(frozen=True)
class DataFrame:
    stream_id: int
    data: bytes
    flags: int = 0


@dataclass(frozen=True)
class SynStream:
    stream_id: int
    headers: Headers
    flags: int = 0
    associated_to: int = 0
    priority: int = 0  # 3 bits, 0 is highest
    slot: int = 0


@dataclass(frozen=True)
class SynReply:
    stream_id: int
    headers: Headers
    flags: int = 0


@dataclass(frozen=True)
class RstStream:
    stream_id: int
    status: int


@dataclass(frozen=True)
class Setting:
    id: int
    value: int
    flags: int = 0


@dataclass(frozen=True)
class Settings:
    entries: tuple[Setting, ...] = field(default_factory=tuple)
    flags: int = 0


@dataclass(frozen=True)
class Ping:
    id: int


@dataclass(frozen=True)
class GoAway:
    last_good_stream_id: int
    status: int = GoAwayStatus.OK


@dataclass(frozen=True)
class HeadersFrame:
    stream_id: int
    headers: Headers
    flags: int = 0


@dataclass(frozen=True)
class WindowUpdate:
    stream_id: int  # 0 is the session-level window (SPDY/3.1)
    delta: int


@dataclass(frozen=True)
class UnknownFrame:
    """A control frame of a type this codec does not know; the session ignores it."""

    version: int
    type: int
    flags: int
    length: int


Frame = (
    DataFrame
    | SynStream
    | SynReply
    | RstStream
    | Settings
    | Ping
    | GoAway
    | HeadersFrame
    | WindowUpdate
    | UnknownFrame
)


def _control(type_: ControlType, flags: int, body: bytes) -> bytes:
    if len(body) > MAX_LENGTH:
        raise ProtocolError(f"spdy {type_.name}: body of {len(body)} bytes exceeds the 24-bit length")
    return _U32X2.pack(0x80000000 | (VERSION << 16) | type_, (flags << 24) | len(body)) + body


def _check_id(stream_id: int, what: str, *, zero_ok: bool = False) -> None:
    if not (0 if zero_ok else 1) <= stream_id <= STREAM_ID_MAX:
        raise ProtocolError(f"spdy {what}: stream id {stream_id} out of range")


def encode_frame(frame: Frame, deflater: HeaderDeflater) -> bytes:
    """Serialize one frame; header-bearing frames advance ``deflater`` (call in wire order)."""
    match frame:
        case DataFrame(stream_id, data, flags):
            _check_id(stream_id, "DATA")
            if len(data) > MAX_LENGTH:
                raise ProtocolError(f"spdy DATA: {len(data)} bytes exceed the 24-bit length")
            return _U32X2.pack(stream_id, (flags << 24) | len(data)) + data
        case SynStream(stream_id, headers, flags, associated_to, priority, slot):
            _check_id(stream_id, "SYN_STREAM")
            _check_id(associated_to, "SYN_STREAM associated-to", zero_ok=True)
            body = _U32X2.pack(stream_id, associated_to) + bytes([(priority & 0x7) << 5, slot & 0xFF])
            return _control(ControlType.SYN_STREAM, flags, body + deflater.compress(headers))
        case SynReply(stream_id, headers, flags):
            _check_id(stream_id, "SYN_REPLY")
            return _control(ControlType.SYN_REPLY, flags, _U32.pack(stream_id) + deflater.compress(headers))
        case RstStream(stream_id, status):
            _check_id(stream_id, "RST_STREAM")
            return _control(ControlType.RST_STREAM, 0, _U32X2.pack(stream_id, status))
        case Settings(entries, flags):
            body = _U32.pack(len(entries)) + b"".join(
                _U32X2.pack((e.flags << 24) | (e.id & 0xFFFFFF), e.value) for e in entries
            )
            return _control(ControlType.SETTINGS, flags, body)
        case Ping(ping_id):
            return _control(ControlType.PING, 0, _U32.pack(ping_id))
        case GoAway(last_good, status):
            _check_id(last_good, "GOAWAY", zero_ok=True)
            return _control(ControlType.GOAWAY, 0, _U32X2.pack(last_good, status))
        case HeadersFrame(stream_id, headers, flags):
            _check_id(stream_id, "HEADERS")
            return _control(ControlType.HEADERS, flags, _U32.pack(stream_id) + deflater.compress(headers))
        case WindowUpdate(stream_id, delta):
            _check_id(stream_id, "WINDOW_UPDATE", zero_ok=True)
            if not 1 <= delta <= STREAM_ID_MAX:
                raise ProtocolError(f"spdy WINDOW_UPDATE: delta {delta} out of range")
            return _control(ControlType.WINDOW_UPDATE, 0, _U32X2.pack(stream_id, delta))
    raise TypeError(f"spdy: cannot encode {type(frame).__name__}")


def _fixed(type_: ControlType, body: bytes, size: int) -> None:
    if len(body) != size:
        raise ProtocolError(f"spdy {type_.name}: length {len(body)}, expected {size}")


def _stream_id(word: int, what: str) -> int:
    stream_id = word & STREAM_ID_MAX
    if stream_id == 0:
        raise ProtocolError(f"spdy {what}: stream id 0")
    return stream_id


def decode_control(version: int, type_: int, flags: int, body: bytes, inflater: HeaderInflater) -> Frame:
    """Decode one control frame body (the 8-byte header already split off)."""
    if version != VERSION:
        raise ProtocolError(f"spdy: unsupported version {version} (want {VERSION})")
    try:
        kind = ControlType(type_)
    except ValueError:
        return UnknownFrame(version, type_, flags, len(body))
    if kind is ControlType.SYN_STREAM:
        if len(body) < 10:
            raise ProtocolError(f"spdy SYN_STREAM: length {len(body)} below the minimum 10")
        sid, assoc = _U32X2.unpack_from(body)
        stream_id = _stream_id(sid, "SYN_STREAM")
        headers = inflater.decompress(body[10:])
        return SynStream(stream_id, headers, flags, assoc & STREAM_ID_MAX, body[8] >> 5, body[9])
    if kind in (ControlType.SYN_REPLY, ControlType.HEADERS):
        if len(body) < 4:
            raise ProtocolError(f"spdy {kind.name}: length {len(body)} below the minimum 4")
        sid = _stream_id(_U32.unpack_from(body)[0], kind.name)
        headers = inflater.decompress(body[4:])
        if kind is ControlType.SYN_REPLY:
            return SynReply(sid, headers, flags)
        return HeadersFrame(sid, headers, flags)
    if kind is ControlType.RST_STREAM:
        _fixed(kind, body, 8)
        sid, status = _U32X2.unpack(body)
        if status == 0:
            raise ProtocolError("spdy RST_STREAM: status 0")
        return RstStream(_stream_id(sid, kind.name), status)
    if kind is ControlType.SETTINGS:
        if len(body) < 4:
            raise ProtocolError(f"spdy SETTINGS: length {len(body)} below the minimum 4")
        (count,) = _U32.unpack_from(body)
        _fixed(kind, body, 4 + 8 * count)
        entries = tuple(
            Setting(word & 0xFFFFFF, value, word >> 24)
            for word, value in (_U32X2.unpack_from(body, 4 + 8 * i) for i in range(count))
        )
        return Settings(entries, flags)
    if kind is ControlType.PING:
        _fixed(kind, body, 4)
        return Ping(_U32.unpack(body)[0])
    if kind is ControlType.GOAWAY:
        _fixed(kind, body, 8)
        last, status = _U32X2.unpack(body)
        return GoAway(last & STREAM_ID_MAX, status)
    _fixed(kind, body, 8)  # WINDOW_UPDATE
    sid, delta = _U32X2.unpack(body)
    delta &= STREAM_ID_MAX
    if delta == 0:
        raise ProtocolError("spdy WINDOW_UPDATE: delta 0")
    return WindowUpdate(sid & STREAM_ID_MAX, delta)


class FrameReader:
    """Reads frames off a StreamReader with bounded memory and one header inflater."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        *,
        max_control_length: int = DEFAULT_MAX_CONTROL_LENGTH,
        max_data_length: int = DEFAULT_MAX_DATA_LENGTH,
    ) -> None:
        self._reader = reader
        self._inflater = HeaderInflater()
        self.max_control_length = max_control_length
        self.max_data_length = max_data_length

    async def read(self) -> Frame | None:
        """The next frame, or None on a clean EOF between frames.

        A connection cut inside a frame is a ProtocolError ("truncated").
        """
        try:
            head = await self._reader.readexactly(HEADER_LENGTH)
        except asyncio.IncompleteReadError as exc:
            if not exc.partial:
                return None
            raise ProtocolError(f"spdy: truncated frame header ({len(exc.partial)} bytes)") from exc
        first, second = _U32X2.unpack(head)
        flags, length = second >> 24, second & MAX_LENGTH
        control = bool(first & 0x80000000)
        limit = self.max_control_length if control else self.max_data_length
        if length > limit:
            kind = "control" if control else "DATA"
            raise ProtocolError(f"spdy: {kind} frame length {length} exceeds the limit {limit}")
        try:
            body = await self._reader.readexactly(length) if length else b""
        except asyncio.IncompleteReadError as exc:
            raise ProtocolError(f"spdy: truncated frame body ({len(exc.partial)} of {length} bytes)") from exc
        if control:
            return decode_control((first >> 16) & 0x7FFF, first & 0xFFFF, flags, body, self._inflater)
        return DataFrame(_stream_id(first, "DATA"), body, flags)
