"""The Kubernetes streaming conventions over SPDY: remotecommand and portforward.

What kubelet, kubectl and crictl agree on (k8s.io/apimachinery util/remotecommand,
util/httpstream, wsstream; kubelet pkg/cri/streaming), as data and pure
functions, so the CRI streaming server and the ``berth`` client share one copy:

* **SPDY upgrade**: the client sends ``Connection: Upgrade``, ``Upgrade: SPDY/3.1``
  and one ``X-Stream-Protocol-Version`` per subprotocol it speaks, best first; the
  server picks the first the client lists that it supports, answers
  ``101 Switching Protocols`` naming it, or 403 listing what it accepts
  (``X-Accepted-Stream-Protocol-Versions``).
* **remotecommand over SPDY**: one stream per ``streamtype`` (stdin, stdout,
  stderr, error, and resize from v3 on). The error stream carries, in v4, a JSON
  ``metav1.Status`` with the exit code; before v4, just the error text.
  The resize stream carries ``{"Width":w,"Height":h}`` objects back to back.
* **portforward over SPDY** (``portforward.k8s.io``): per forwarded connection, a
  ``data`` and an ``error`` stream with headers ``port`` and ``requestid``.

The WebSocket channel framing is in :mod:`daemon.streaming.wschannel`; the
subprotocol names and exit-status payloads here serve both transports.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from daemon.streaming.errors import ProtocolError

# -- stream types and headers (header names as they travel: lowercase) -------------

STREAM_TYPE_HEADER = "streamtype"
PORT_HEADER = "port"
REQUEST_ID_HEADER = "requestid"

STREAM_STDIN = "stdin"
STREAM_STDOUT = "stdout"
STREAM_STDERR = "stderr"
STREAM_ERROR = "error"
STREAM_RESIZE = "resize"
STREAM_DATA = "data"  # port-forward

# -- subprotocols ---------------------------------------------------------------

PROTOCOL_V1 = "channel.k8s.io"
PROTOCOL_V2 = "v2.channel.k8s.io"
PROTOCOL_V3 = "v3.channel.k8s.io"
PROTOCOL_V4 = "v4.channel.k8s.io"
PROTOCOL_V5 = "v5.channel.k8s.io"
PORTFORWARD_PROTOCOL = "portforward.k8s.io"
BASE64_PROTOCOL = "base64.channel.k8s.io"
V4_BASE64_PROTOCOL = "v4.base64.channel.k8s.io"

# What the server offers over SPDY, best first (v5 is a WebSocket-only feature).
SPDY_REMOTECOMMAND_PROTOCOLS = (PROTOCOL_V4, PROTOCOL_V3, PROTOCOL_V2, PROTOCOL_V1)
SPDY_PORTFORWARD_PROTOCOLS = (PORTFORWARD_PROTOCOL,)

_VERSION_OF = {PROTOCOL_V1: 1, PROTOCOL_V2: 2, PROTOCOL_V3: 3, PROTOCOL_V4: 4, PROTOCOL_V5: 5}


def protocol_version(protocol: str) -> int:
    """1..5 for a remotecommand subprotocol; an empty protocol (no negotiation) is v1."""
    if not protocol:
        return 1
    try:
        return _VERSION_OF[protocol]
    except KeyError:
        raise ProtocolError(f"remotecommand: unknown subprotocol {protocol!r}") from None


@dataclass(frozen=True)
class StreamOptions:
    """Which streams an exec/attach asked for (the CRI request's stdin/stdout/stderr/tty)."""

    stdin: bool
    stdout: bool
    stderr: bool
    tty: bool

    def expected_streams(self, protocol: str) -> int:
        """How many SPDY streams the client will open: error, each asked-for stdio, resize (v3+, tty)."""
        count = 1 + self.stdin + self.stdout + self.stderr
        return count + (self.tty and protocol_version(protocol) >= 3)


# -- SPDY upgrade handshake -----------------------------------------------------

HEADER_CONNECTION = "Connection"
HEADER_UPGRADE = "Upgrade"
HEADER_PROTOCOL_VERSION = "X-Stream-Protocol-Version"
HEADER_ACCEPTED_PROTOCOL_VERSIONS = "X-Accepted-Stream-Protocol-Versions"
SPDY_31 = "SPDY/3.1"


def tokens(values: Iterable[str]) -> list[str]:
    """Header values split on commas, blanks dropped (several headers or one comma list alike)."""
    return [t.strip() for v in values for t in v.split(",") if t.strip()]


def is_spdy_upgrade(connection: str | None, upgrade: str | None) -> bool:
    """The request's Connection and Upgrade headers ask for SPDY/3.1 (case-insensitive, as kubelet)."""
    return "upgrade" in (connection or "").lower() and SPDY_31.lower() in (upgrade or "").lower()


def negotiate_protocol(client_values: Iterable[str], server_protocols: Sequence[str]) -> str | None:
    """The first protocol the client lists that the server supports (client order wins), or None.

    ``client_values`` are the raw ``X-Stream-Protocol-Version`` header values; each
    may hold a comma-separated list.
    """
    for protocol in tokens(client_values):
        if protocol in server_protocols:
            return protocol
    return None


def spdy_upgrade_request(method: str, target: str, host: str, protocols: Sequence[str]) -> bytes:
    """The client's HTTP/1.1 upgrade request, ready to write on a fresh connection."""
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}", "Connection: Upgrade", f"Upgrade: {SPDY_31}"]
    lines += [f"{HEADER_PROTOCOL_VERSION}: {p}" for p in protocols]
    lines.append("Content-Length: 0")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def spdy_switching_protocols(protocol: str | None) -> bytes:
    """The server's 101 answer; names the negotiated subprotocol when there is one."""
    lines = [
        "HTTP/1.1 101 Switching Protocols",
        f"{HEADER_CONNECTION}: Upgrade",
        f"{HEADER_UPGRADE}: {SPDY_31}",
    ]
    if protocol:
        lines.append(f"{HEADER_PROTOCOL_VERSION}: {protocol}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def spdy_upgrade_response_headers(protocol: str | None) -> list[tuple[str, str]]:
    """The same answer as header pairs, for a server framework that writes the status line itself."""
    headers = [(HEADER_CONNECTION, "Upgrade"), (HEADER_UPGRADE, SPDY_31)]
    if protocol:
        headers.append((HEADER_PROTOCOL_VERSION, protocol))
    return headers


def check_spdy_upgrade_response(
    status: int, headers: Sequence[tuple[str, str]], offered: Sequence[str]
) -> str:
    """Validate the server's answer on the client side; returns the negotiated subprotocol.

    A missing protocol header means the server did not negotiate (v1, as client-go falls back).
    """
    lower = [(k.lower(), v) for k, v in headers]
    if status != 101:
        accepted = tokens(v for k, v in lower if k == HEADER_ACCEPTED_PROTOCOL_VERSIONS.lower())
        hint = f" (server accepts {', '.join(accepted)})" if accepted else ""
        raise ProtocolError(f"spdy upgrade: server answered {status}, not 101{hint}")
    get = dict(lower).get
    if not is_spdy_upgrade(get("connection"), get("upgrade")):
        raise ProtocolError("spdy upgrade: 101 answer lacks Connection: Upgrade / Upgrade: SPDY/3.1")
    protocol = get(HEADER_PROTOCOL_VERSION.lower(), "").strip()
    if protocol and protocol not in offered:
        raise ProtocolError(f"spdy upgrade: server chose {protocol!r}, which we did not offer")
    return protocol


# -- exit status (the error stream) ------------------------------------------------

NON_ZERO_EXIT_CODE_REASON = "NonZeroExitCode"
EXIT_CODE_CAUSE = "ExitCode"


def _json(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def success_status() -> bytes:
    """The v4 Status for exit code 0."""
    return _json({"metadata": {}, "status": "Success"})


def _exit_message(exit_code: int, detail: str | None) -> str:
    return f"command terminated with non-zero exit code: {detail or f'exit code {exit_code}'}"


def exit_code_status(exit_code: int, detail: str | None = None) -> bytes:
    """The v4 Status for a non-zero exit; ``detail`` ends the message (default ``exit code N``)."""
    message = _exit_message(exit_code, detail)
    return _json(
        {
            "metadata": {},
            "status": "Failure",
            "message": message,
            "reason": NON_ZERO_EXIT_CODE_REASON,
            "details": {"causes": [{"reason": EXIT_CODE_CAUSE, "message": str(exit_code)}]},
        }
    )


def failure_status(message: str, reason: str = "InternalError") -> bytes:
    """A v4 Status for an error that is not an exit code (the exec could not run at all)."""
    return _json({"metadata": {}, "status": "Failure", "message": message, "reason": reason})


def error_stream_payload(protocol: str, exit_code: int, detail: str | None = None) -> bytes:
    """What the server writes on the error stream for this subprotocol; b"" means write nothing.

    v4/v5 always send a Status; v1-v3 send only an error text, and nothing on success.
    """
    if protocol_version(protocol) >= 4:
        return success_status() if exit_code == 0 else exit_code_status(exit_code, detail)
    if exit_code == 0:
        return b""
    return _exit_message(exit_code, detail).encode()


@dataclass(frozen=True)
class ExitStatus:
    """The client's reading of the error stream: an exit code, or an error that is not one."""

    exit_code: int | None
    message: str = ""


def parse_error_stream(protocol: str, data: bytes) -> ExitStatus:
    """Decode everything the error stream carried (read to EOF) into an exit status."""
    if protocol_version(protocol) < 4:
        text = data.decode("utf-8", "replace").strip()
        return ExitStatus(0) if not text else ExitStatus(None, text)
    if not data.strip():
        return ExitStatus(0)  # the server closed the stream without a Status
    try:
        status = json.loads(data)
    except ValueError as exc:
        raise ProtocolError(f"remotecommand: error stream is not a JSON Status: {exc}") from exc
    if not isinstance(status, dict):
        raise ProtocolError("remotecommand: error stream Status is not a JSON object")
    if status.get("status") == "Success":
        return ExitStatus(0)
    message = str(status.get("message", ""))
    if status.get("reason") == NON_ZERO_EXIT_CODE_REASON:
        causes = (status.get("details") or {}).get("causes") or []
        for cause in causes:
            if isinstance(cause, dict) and cause.get("reason") == EXIT_CODE_CAUSE:
                try:
                    return ExitStatus(int(cause.get("message", "")), message)
                except ValueError:
                    break
    return ExitStatus(None, message or "remotecommand: failure without a message")


def portforward_error(message: str, close_connection: bool) -> bytes:
    """kubelet's port-forward error JSON (newline-terminated, as Go's json.Encoder writes it)."""
    body: dict[str, object] = {"message": message}
    if close_connection:
        body = {"closeConnection": True, **body}
    return _json(body) + b"\n"


# -- terminal resize ---------------------------------------------------------------


@dataclass(frozen=True)
class TerminalSize:
    width: int
    height: int

    def encode(self) -> bytes:
        return _json({"Width": self.width, "Height": self.height})


class ResizeDecoder:
    """Splits the resize stream into TerminalSize objects, whatever the frame boundaries.

    kubelet reads it with a json.Decoder: objects back to back, optionally
    separated by whitespace. A partial object waits for more bytes; more than
    ``max_pending`` bytes without a complete object, or an object that is not a
    size, is a ProtocolError.
    """

    def __init__(self, max_pending: int = 4096) -> None:
        self._buf = b""
        self._max = max_pending

    def feed(self, data: bytes) -> list[TerminalSize]:
        self._buf += data
        sizes: list[TerminalSize] = []
        while True:
            self._buf = self._buf.lstrip()
            end = _object_end(self._buf)
            if end is None:
                break
            sizes.append(_size(self._buf[:end]))
            self._buf = self._buf[end:]
        if len(self._buf) > self._max:
            raise ProtocolError(f"resize stream: {len(self._buf)} bytes without a complete JSON object")
        return sizes


def _object_end(buf: bytes) -> int | None:
    """Index just past the first complete top-level JSON object in ``buf`` (None: incomplete)."""
    if not buf:
        return None
    if buf[:1] != b"{":
        raise ProtocolError(f"resize stream: expected a JSON object, got {buf[:16]!r}")
    depth, in_string, escaped = 0, False, False
    for i, byte in enumerate(buf):
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte == 0x7B:
            depth += 1
        elif byte == 0x7D:
            depth -= 1
            if depth == 0:
                return i + 1
    return None


def _size(raw: bytes) -> TerminalSize:
    try:
        obj = json.loads(raw)
    except ValueError as exc:
        raise ProtocolError(f"resize stream: bad JSON: {exc}") from exc
    values = []
    for key in ("Width", "Height"):
        value = obj.get(key, 0)  # Go leaves a missing field at zero
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 0xFFFF:
            raise ProtocolError(f"resize stream: {key} {value!r} is not a uint16")
        values.append(value)
    return TerminalSize(values[0], values[1])
