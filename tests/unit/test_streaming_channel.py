"""Kubernetes streaming conventions: handshakes, exit-status JSON, resize JSON, WebSocket channels."""

from __future__ import annotations

import json

import pytest

from daemon.streaming import channel as ch
from daemon.streaming import wschannel as ws
from daemon.streaming.errors import ProtocolError

# -- SPDY upgrade -------------------------------------------------------------------


def test_negotiation_takes_the_clients_first_supported_protocol() -> None:
    server = ch.SPDY_REMOTECOMMAND_PROTOCOLS
    assert ch.negotiate_protocol(["v5.channel.k8s.io", "v4.channel.k8s.io", "v3.channel.k8s.io"], server) == (
        "v4.channel.k8s.io"
    )
    assert ch.negotiate_protocol(["v2.channel.k8s.io, v4.channel.k8s.io"], server) == "v2.channel.k8s.io"
    assert ch.negotiate_protocol(["nope", " "], server) is None
    assert ch.negotiate_protocol([], server) is None


def test_spdy_upgrade_request_detection() -> None:
    assert ch.is_spdy_upgrade("Upgrade", "SPDY/3.1")
    assert ch.is_spdy_upgrade("keep-alive, upgrade", "spdy/3.1")
    assert not ch.is_spdy_upgrade("Upgrade", "websocket")
    assert not ch.is_spdy_upgrade(None, "SPDY/3.1")


def test_spdy_handshake_lines_round_trip() -> None:
    request = ch.spdy_upgrade_request(
        "POST", "/exec/tok", "127.0.0.1:1", ["v4.channel.k8s.io", "channel.k8s.io"]
    )
    assert request.startswith(b"POST /exec/tok HTTP/1.1\r\nHost: 127.0.0.1:1\r\n")
    assert (
        b"\r\nX-Stream-Protocol-Version: v4.channel.k8s.io\r\nX-Stream-Protocol-Version: channel.k8s.io\r\n"
        in (request)
    )
    assert request.endswith(b"\r\n\r\n")
    answer = ch.spdy_switching_protocols("v4.channel.k8s.io")
    assert answer == (
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\n"
        b"X-Stream-Protocol-Version: v4.channel.k8s.io\r\n\r\n"
    )
    headers = ch.spdy_upgrade_response_headers("v4.channel.k8s.io")
    assert ch.check_spdy_upgrade_response(101, headers, ["v4.channel.k8s.io"]) == "v4.channel.k8s.io"
    assert ch.check_spdy_upgrade_response(101, ch.spdy_upgrade_response_headers(None), ["x"]) == ""


def test_client_rejects_bad_upgrade_answers() -> None:
    with pytest.raises(ProtocolError, match=r"403.*server accepts v4\.channel\.k8s\.io"):
        ch.check_spdy_upgrade_response(
            403, [("X-Accepted-Stream-Protocol-Versions", "v4.channel.k8s.io")], []
        )
    with pytest.raises(ProtocolError, match="lacks"):
        ch.check_spdy_upgrade_response(101, [("Connection", "Upgrade")], [])
    with pytest.raises(ProtocolError, match="did not offer"):
        ch.check_spdy_upgrade_response(101, ch.spdy_upgrade_response_headers("v3.channel.k8s.io"), ["v4"])


def test_expected_streams_follow_the_protocol_version() -> None:
    tty_in_out = ch.StreamOptions(stdin=True, stdout=True, stderr=False, tty=True)
    assert tty_in_out.expected_streams("v4.channel.k8s.io") == 4  # error, stdin, stdout, resize
    assert tty_in_out.expected_streams("v2.channel.k8s.io") == 3  # no resize stream before v3
    assert ch.StreamOptions(False, True, True, False).expected_streams("") == 3
    with pytest.raises(ProtocolError):
        ch.protocol_version("v9.channel.k8s.io")


# -- exit status ------------------------------------------------------------------------


def test_v4_status_json_is_byte_exact() -> None:
    assert ch.success_status() == b'{"metadata":{},"status":"Success"}'
    assert ch.exit_code_status(3, "exit status 3") == (
        b'{"metadata":{},"status":"Failure","message":"command terminated with non-zero exit code: '
        b'exit status 3","reason":"NonZeroExitCode",'
        b'"details":{"causes":[{"reason":"ExitCode","message":"3"}]}}'
    )


@pytest.mark.parametrize("protocol", ["v4.channel.k8s.io", "v5.channel.k8s.io"])
@pytest.mark.parametrize("code", [0, 1, 3, 255])
def test_exit_codes_round_trip_through_the_error_stream(protocol: str, code: int) -> None:
    payload = ch.error_stream_payload(protocol, code)
    assert json.loads(payload)["status"] == ("Success" if code == 0 else "Failure")
    assert ch.parse_error_stream(protocol, payload).exit_code == code


def test_pre_v4_error_stream_is_text_and_silent_on_success() -> None:
    assert ch.error_stream_payload("v3.channel.k8s.io", 0) == b""
    text = ch.error_stream_payload("channel.k8s.io", 2)
    assert text == b"command terminated with non-zero exit code: exit code 2"
    status = ch.parse_error_stream("v2.channel.k8s.io", text)
    assert status.exit_code is None and "exit code 2" in status.message
    assert ch.parse_error_stream("v3.channel.k8s.io", b"").exit_code == 0


def test_error_stream_failures_without_exit_code() -> None:
    status = ch.parse_error_stream("v4.channel.k8s.io", ch.failure_status("container not running"))
    assert status == ch.ExitStatus(None, "container not running")
    with pytest.raises(ProtocolError):
        ch.parse_error_stream("v4.channel.k8s.io", b"{not json")
    with pytest.raises(ProtocolError):
        ch.parse_error_stream("v4.channel.k8s.io", b"[1]")


def test_portforward_error_json() -> None:
    assert ch.portforward_error("boom", True) == b'{"closeConnection":true,"message":"boom"}\n'
    assert ch.portforward_error("reset", False) == b'{"message":"reset"}\n'


# -- resize ------------------------------------------------------------------------------


def test_resize_objects_decode_across_frame_boundaries() -> None:
    assert ch.TerminalSize(80, 24).encode() == b'{"Width":80,"Height":24}'
    decoder = ch.ResizeDecoder()
    stream = ch.TerminalSize(80, 24).encode() + b"\n" + ch.TerminalSize(120, 40).encode()
    sizes = []
    for i in range(len(stream)):  # one byte per frame: the worst split there is
        sizes += decoder.feed(stream[i : i + 1])
    assert sizes == [ch.TerminalSize(80, 24), ch.TerminalSize(120, 40)]
    assert decoder.feed(b' {"Width":1,"Height":2}{"Height":5}') == [
        ch.TerminalSize(1, 2),
        ch.TerminalSize(0, 5),
    ]
    assert decoder.feed(b'{"Width":3,"x":"}{"') == []  # a brace inside a string does not end the object
    assert decoder.feed(b',"Height":4}') == [ch.TerminalSize(3, 4)]


@pytest.mark.parametrize(
    "data",
    [
        b"[80,24]",
        b'{"Width":-1,"Height":2}',
        b'{"Width":70000}',
        b'{"Width":"80"}',
        b'{"Width":true}',
        b"{,}",
    ],
)
def test_bad_resize_objects_are_protocol_errors(data: bytes) -> None:
    with pytest.raises(ProtocolError):
        ch.ResizeDecoder().feed(data)


def test_resize_decoder_bounds_a_never_ending_object() -> None:
    decoder = ch.ResizeDecoder(max_pending=64)
    with pytest.raises(ProtocolError, match="without a complete"):
        decoder.feed(b'{"Width":' + b" " * 100)


# -- WebSocket channels -----------------------------------------------------------------

V1 = ws.WS_PROTOCOLS["channel.k8s.io"]
B64 = ws.WS_PROTOCOLS["base64.channel.k8s.io"]
V4 = ws.WS_PROTOCOLS["v4.channel.k8s.io"]
V5 = ws.WS_PROTOCOLS["v5.channel.k8s.io"]


def test_binary_channel_byte_precedes_the_payload() -> None:
    # wsstream's own example: "foo\n" on channel 0 is [0, 102, 111, 111, 10].
    assert ws.encode_ws(V4, ws.CHANNEL_STDIN, b"foo\n") == bytes([0, 102, 111, 111, 10])
    assert ws.decode_ws(V1, bytes([1, 10])) == ws.WsData(ws.CHANNEL_STDOUT, b"\n")
    assert ws.decode_ws(V4, bytes([3])) == ws.WsData(ws.CHANNEL_ERROR, b"")
    assert ws.decode_ws(V4, b"") is None  # kubelet skips empty messages


def test_base64_channel_is_a_digit_then_base64() -> None:
    assert ws.encode_ws(B64, ws.CHANNEL_STDOUT, b"\n") == "1Cg=="  # [49, 67, 103, 61, 61]
    assert ws.decode_ws(B64, "0Zm9vCg==") == ws.WsData(0, b"foo\n")
    assert ws.decode_ws(B64, b"2") == ws.WsData(2, b"")
    with pytest.raises(ProtocolError, match="bad payload"):
        ws.decode_ws(B64, "1not base64!")
    with pytest.raises(ProtocolError, match="channel character"):
        ws.decode_ws(B64, "xCg==")
    with pytest.raises(ValueError):
        ws.encode_ws(B64, 12, b"")


def test_v5_close_signal() -> None:
    assert ws.encode_ws_close(V5, ws.CHANNEL_STDIN) == b"\xff\x00"
    assert ws.decode_ws(V5, b"\xff\x00") == ws.WsClose(ws.CHANNEL_STDIN)
    assert ws.decode_ws(V4, b"\xff\x00") == ws.WsData(255, b"\x00")  # before v5, 255 is no signal
    with pytest.raises(ValueError):
        ws.encode_ws_close(V4, 0)
    with pytest.raises(ProtocolError):
        ws.decode_ws(V5, b"\xff\x00\x01")


def test_websocket_negotiation_and_detection() -> None:
    allowed = ws.WS_REMOTECOMMAND_PROTOCOLS
    assert ws.negotiate_ws_protocol([], allowed) == ws.WS_PROTOCOLS[""]
    assert ws.negotiate_ws_protocol(["v5.channel.k8s.io, v4.channel.k8s.io"], allowed) == V5
    assert (
        ws.negotiate_ws_protocol(["v4.base64.channel.k8s.io"], allowed)
        == ws.WS_PROTOCOLS["v4.base64.channel.k8s.io"]
    )
    assert ws.negotiate_ws_protocol(["v5.channel.k8s.io"], ws.WS_PORTFORWARD_PROTOCOLS) is None
    assert ws.is_websocket_upgrade("keep-alive, Upgrade", "WebSocket")
    assert not ws.is_websocket_upgrade("keep-alive", "websocket")
    assert not ws.is_websocket_upgrade("Upgrade", "SPDY/3.1")
    assert ws.is_websocket_upgrade(" upgrade ,keep-alive", " websocket ")
    assert not ws.is_websocket_upgrade(None, "websocket")
    assert not ws.is_websocket_upgrade("upgraded", "websocket")
    assert ws.WS_PROTOCOLS["v4.base64.channel.k8s.io"].remotecommand_protocol == "v4.channel.k8s.io"
    assert V5.remotecommand_protocol == "v4.channel.k8s.io"
    assert ws.WS_PROTOCOLS[""].remotecommand_protocol == "channel.k8s.io"


def test_portforward_channels_and_port_prefix() -> None:
    assert ws.portforward_ws_channels(0) == (0, 1)
    assert ws.portforward_ws_channels(2) == (4, 5)
    assert ws.encode_port_prefix(8080) == b"\x90\x1f"
    assert ws.decode_port_prefix(b"\x90\x1frest") == 8080
    with pytest.raises(ProtocolError):
        ws.decode_port_prefix(b"\x90")
    with pytest.raises(ValueError):
        ws.encode_port_prefix(0)
    assert ws.parse_ports(["80,443", "8080"]) == [80, 443, 8080]
    for bad in (["0"], ["70000"], [""], ["80,x"], []):
        with pytest.raises(ProtocolError):
            ws.parse_ports(bad)
