"""ttrpc wire format: the 10-byte frame header and the Request/Response envelopes.

Follows containerd/ttrpc (channel.go, request.proto, PROTOCOL.md) exactly, so
that berth's shims and clients interoperate with containerd's:

* header, big-endian: payload length u32, stream id u32, message type u8, flags u8;
* a frame's payload is at most :data:`MESSAGE_LENGTH_MAX` (4 MiB). A sender
  refuses to write a larger one; a receiver reads and discards it, then reports
  RESOURCE_EXHAUSTED for that stream only, so the connection stays usable.

The envelopes are declared here with betterproto (there is no ttrpc generator
and protos/ does not carry request.proto); field numbers are upstream's.
"""

from __future__ import annotations

import asyncio
import enum
import struct
from dataclasses import dataclass

import betterproto

from daemon.errors import ResourceExhausted
from protos.google.rpc import Status

HEADER_LENGTH = 10
MESSAGE_LENGTH_MAX = 4 << 20
_HEADER = struct.Struct(">IIBB")
_DISCARD_CHUNK = 64 << 10


class MessageType(enum.IntEnum):
    REQUEST = 0x1
    RESPONSE = 0x2
    DATA = 0x3


FLAG_REMOTE_CLOSED = 0x1
FLAG_REMOTE_OPEN = 0x2
FLAG_NO_DATA = 0x4


@dataclass(eq=False, repr=False)
class KeyValue(betterproto.Message):  # type: ignore[misc]
    """``ttrpc.KeyValue``: one metadata entry (a key may repeat)."""

    key: str = betterproto.string_field(1)
    value: str = betterproto.string_field(2)


@dataclass(eq=False, repr=False)
class Request(betterproto.Message):  # type: ignore[misc]
    """``ttrpc.Request``: the payload of a REQUEST frame."""

    service: str = betterproto.string_field(1)
    method: str = betterproto.string_field(2)
    payload: bytes = betterproto.bytes_field(3)
    timeout_nano: int = betterproto.int64_field(4)
    metadata: list[KeyValue] = betterproto.message_field(5)  # noqa: RUF009


@dataclass(eq=False, repr=False)
class Response(betterproto.Message):  # type: ignore[misc]
    """``ttrpc.Response``: the payload of a RESPONSE frame; status code 0 is OK."""

    status: Status = betterproto.message_field(1)  # noqa: RUF009
    payload: bytes = betterproto.bytes_field(2)


@dataclass(frozen=True)
class Header:
    length: int
    stream_id: int
    type: int
    flags: int


@dataclass(frozen=True)
class Frame:
    header: Header
    payload: bytes


class OversizedMessage(ResourceExhausted):
    """A frame announced more than MESSAGE_LENGTH_MAX bytes; ``header`` names its stream.

    Raised by :func:`read_frame` only after the payload was discarded, so the
    reader is positioned at the next frame and the caller may go on.
    """

    def __init__(self, header: Header) -> None:
        super().__init__(
            f"message length {header.length} exceed maximum message size of {MESSAGE_LENGTH_MAX}"
        )
        self.header = header


def encode_header(header: Header) -> bytes:
    return _HEADER.pack(header.length, header.stream_id, header.type, header.flags)


def decode_header(data: bytes) -> Header:
    """Decode exactly HEADER_LENGTH bytes; a shorter buffer is a caller bug (ValueError)."""
    if len(data) != HEADER_LENGTH:
        raise ValueError(f"ttrpc header: need {HEADER_LENGTH} bytes, got {len(data)}")
    length, stream_id, type_, flags = _HEADER.unpack(data)
    return Header(length=length, stream_id=stream_id, type=type_, flags=flags)


def encode_frame(stream_id: int, type_: int, flags: int, payload: bytes) -> bytes:
    """Header plus payload, ready to write; refuses payloads over MESSAGE_LENGTH_MAX."""
    if len(payload) > MESSAGE_LENGTH_MAX:
        raise ResourceExhausted(
            f"message length {len(payload)} exceed maximum message size of {MESSAGE_LENGTH_MAX}"
        )
    return encode_header(Header(len(payload), stream_id, type_, flags)) + payload


async def read_frame(reader: asyncio.StreamReader) -> Frame:
    """Read one frame.

    Raises asyncio.IncompleteReadError when the peer closes mid-frame or
    between frames (terminal for the connection), and OversizedMessage
    (recoverable) for a frame over the size limit.
    """
    header = decode_header(await reader.readexactly(HEADER_LENGTH))
    if header.length > MESSAGE_LENGTH_MAX:
        remaining = header.length
        while remaining:
            chunk = min(remaining, _DISCARD_CHUNK)
            await reader.readexactly(chunk)
            remaining -= chunk
        raise OversizedMessage(header)
    payload = await reader.readexactly(header.length) if header.length else b""
    return Frame(header, payload)
