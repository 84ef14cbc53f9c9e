"""The Kubernetes WebSocket channel framing (wsstream), for exec/attach/port-forward over WebSocket.

Every message is one channel's payload: binary ``channel byte + payload``
(``channel.k8s.io``, ``v4.channel.k8s.io``, ``v5.channel.k8s.io``), or, for the
base64 variants (``base64.channel.k8s.io``, ``v4.base64.channel.k8s.io``), text
``'0'+channel`` followed by the payload in base64. Channels follow the file
descriptors: 0 stdin, 1 stdout, 2 stderr, 3 error, 4 resize. v5 adds the close
signal ``[255, channel]``: the sender will send nothing more on that channel
(stdin EOF). Port-forward uses channels 2i (data) and 2i+1 (error) for the i-th
port and first sends the port, u16 little-endian, on both. The WebSocket frames
themselves are aiohttp's business; this module only does what is inside them.
"""

from __future__ import annotations

import base64
import binascii
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from daemon.streaming.channel import (
    BASE64_PROTOCOL,
    PROTOCOL_V1,
    PROTOCOL_V4,
    PROTOCOL_V5,
    V4_BASE64_PROTOCOL,
    tokens,
)
from daemon.streaming.errors import ProtocolError

# -- WebSocket channels ----------------------------------------------------------

CHANNEL_STDIN = 0
CHANNEL_STDOUT = 1
CHANNEL_STDERR = 2
CHANNEL_ERROR = 3
CHANNEL_RESIZE = 4
CHANNEL_CLOSE = 255  # v5: [255, channel] half-closes one channel


@dataclass(frozen=True)
class WsProtocol:
    name: str
    base64: bool
    version: int  # remotecommand semantics of the error channel: 1 (text) or 4+ (Status JSON)

    @property
    def close_signal(self) -> bool:
        return self.version >= 5

    @property
    def remotecommand_protocol(self) -> str:
        """The SPDY subprotocol whose error-stream semantics apply (v4 Status JSON, or v1 text)."""
        return PROTOCOL_V4 if self.version >= 4 else PROTOCOL_V1


WS_PROTOCOLS = {
    "": WsProtocol("", False, 1),  # no subprotocol offered: binary channel.k8s.io
    PROTOCOL_V1: WsProtocol(PROTOCOL_V1, False, 1),
    BASE64_PROTOCOL: WsProtocol(BASE64_PROTOCOL, True, 1),
    PROTOCOL_V4: WsProtocol(PROTOCOL_V4, False, 4),
    V4_BASE64_PROTOCOL: WsProtocol(V4_BASE64_PROTOCOL, True, 4),
    PROTOCOL_V5: WsProtocol(PROTOCOL_V5, False, 5),
}
WS_REMOTECOMMAND_PROTOCOLS = (PROTOCOL_V5, PROTOCOL_V4, V4_BASE64_PROTOCOL, PROTOCOL_V1, BASE64_PROTOCOL)
WS_PORTFORWARD_PROTOCOLS = (PROTOCOL_V4, V4_BASE64_PROTOCOL)


def is_websocket_upgrade(connection: str | None, upgrade: str | None) -> bool:
    """Upgrade is ``websocket`` and Connection lists ``upgrade`` (wsstream.IsWebSocketRequest)."""
    return (upgrade or "").strip().lower() == "websocket" and "upgrade" in (
        t.lower() for t in tokens([connection or ""])
    )


def negotiate_ws_protocol(offered: Iterable[str], allowed: Sequence[str]) -> WsProtocol | None:
    """The first offered subprotocol we allow; none offered means binary channel.k8s.io."""
    names = tokens(offered)
    if not names:
        return WS_PROTOCOLS[""]
    for name in names:
        if name in allowed and name in WS_PROTOCOLS:
            return WS_PROTOCOLS[name]
    return None


@dataclass(frozen=True)
class WsData:
    channel: int
    data: bytes


@dataclass(frozen=True)
class WsClose:
    """v5 close signal: the sender will send nothing more on ``channel``."""

    channel: int


def encode_ws(protocol: WsProtocol, channel: int, data: bytes) -> bytes | str:
    """One message: binary ``channel byte + data``, or text ``'0'+channel + base64(data)``."""
    if not 0 <= channel < CHANNEL_CLOSE:
        raise ValueError(f"websocket channel {channel} out of range")
    if protocol.base64:
        if channel > 9:
            raise ValueError(f"websocket base64 channel {channel} cannot be one digit")
        return chr(0x30 + channel) + base64.b64encode(data).decode("ascii")
    return bytes((channel,)) + data


def encode_ws_close(protocol: WsProtocol, channel: int) -> bytes:
    """The v5 close signal for ``channel``; refused for protocols that lack it."""
    if not protocol.close_signal:
        raise ValueError(f"websocket subprotocol {protocol.name!r} has no close signal")
    return bytes((CHANNEL_CLOSE, channel))


def decode_ws(protocol: WsProtocol, message: bytes | str) -> WsData | WsClose | None:
    """Decode one message; None for an empty one (which kubelet ignores)."""
    if protocol.base64:
        text = message.decode("ascii", "replace") if isinstance(message, bytes) else message
        if not text:
            return None
        channel = ord(text[0]) - 0x30
        if not 0 <= channel <= 9:
            raise ProtocolError(f"websocket base64: bad channel character {text[0]!r}")
        try:
            return WsData(channel, base64.b64decode(text[1:], validate=True))
        except (binascii.Error, ValueError) as exc:
            raise ProtocolError(f"websocket base64: bad payload on channel {channel}: {exc}") from exc
    raw = message.encode("utf-8") if isinstance(message, str) else message
    if not raw:
        return None
    if raw[0] == CHANNEL_CLOSE and protocol.close_signal:
        if len(raw) != 2:
            raise ProtocolError(f"websocket close signal: {len(raw)} bytes, expected 2")
        return WsClose(raw[1])
    return WsData(raw[0], raw[1:])


_PORT = struct.Struct("<H")


def portforward_ws_channels(index: int) -> tuple[int, int]:
    """The (data, error) channels of the ``index``-th forwarded port."""
    return 2 * index, 2 * index + 1


def encode_port_prefix(port: int) -> bytes:
    """The first payload on both channels of a port: the port, u16 little-endian."""
    if not 1 <= port <= 0xFFFF:
        raise ValueError(f"port {port} out of range")
    return _PORT.pack(port)


def decode_port_prefix(data: bytes) -> int:
    if len(data) < 2:
        raise ProtocolError(f"port-forward: port prefix of {len(data)} bytes, expected 2")
    return int(_PORT.unpack_from(data)[0])


def parse_ports(values: Iterable[str]) -> list[int]:
    """The ``port`` query values of a WebSocket port-forward (comma lists allowed), as kubelet checks them."""
    ports: list[int] = []
    for value in values:
        if not value:
            raise ProtocolError('port-forward: query parameter "port" cannot be empty')
        for item in value.split(","):
            if not item.isdigit() or not 1 <= int(item) <= 0xFFFF:
                raise ProtocolError(f"port-forward: {item!r} is not a port in 1..65535")
            ports.append(int(item))
    if not ports:
        raise ProtocolError('port-forward: query parameter "port" is required')
    return ports
