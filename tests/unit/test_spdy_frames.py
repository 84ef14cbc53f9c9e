"""SPDY/3 frames and header blocks: round trips, the dictionary, compression state, malformed input."""

from __future__ import annotations

import asyncio
import struct
import zlib

import pytest

from daemon.streaming.errors import ProtocolError
from daemon.streaming.spdy.frames import (
    FLAG_FIN,
    FLAG_UNIDIRECTIONAL,
    DataFrame,
    Frame,
    FrameReader,
    GoAway,
    GoAwayStatus,
    HeadersFrame,
    Ping,
    RstStatus,
    RstStream,
    Setting,
    SettingId,
    Settings,
    SynReply,
    SynStream,
    UnknownFrame,
    WindowUpdate,
    encode_frame,
)
from daemon.streaming.spdy.headers import (
    DICTIONARY,
    DICTIONARY_ADLER32,
    DICTIONARY_LENGTH,
    HeaderDeflater,
    HeaderInflater,
    Headers,
    decode_block,
    encode_block,
)

# Frames produced by another implementation (node-spdy's parser tests): a
# SYN_STREAM and then, on a fresh connection, a SYN_REPLY with no headers.
NODE_SYN_STREAM = bytes.fromhex(
    "800300010000002c0000000100000000000078f9e3c6a7c202e50e507ab442a45a77d7105006b32a4804974d8cfa00000000ffff"
)
NODE_SYN_REPLY = bytes.fromhex("80030002000000140000000178f9e3c6a7c202a6230600000000ffff")


def reader_of(data: bytes, *, eof: bool = True) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    if eof:
        reader.feed_eof()
    return reader


async def read_all(data: bytes, **limits: int) -> list[Frame]:
    frames = FrameReader(reader_of(data), **limits)
    out = []
    while (frame := await frames.read()) is not None:
        out.append(frame)
    return out


def test_dictionary_is_the_spdy3_dictionary() -> None:
    assert len(DICTIONARY) == DICTIONARY_LENGTH == 1423
    assert zlib.adler32(DICTIONARY) == DICTIONARY_ADLER32 == 0xE3C6A7C2
    assert DICTIONARY.startswith(b"\x00\x00\x00\x07options\x00\x00\x00\x04head")
    assert DICTIONARY.endswith(b"utf-,*,enq=0.")


def test_first_block_names_the_dictionary_in_its_zlib_header() -> None:
    block = HeaderDeflater().compress(Headers({"streamtype": "stdout"}))
    assert block[1] & 0x20  # FDICT
    assert struct.unpack(">I", block[2:6])[0] == DICTIONARY_ADLER32


async def test_decodes_frames_compressed_by_another_implementation() -> None:
    (syn,) = await read_all(NODE_SYN_STREAM)
    assert isinstance(syn, SynStream)
    assert (syn.stream_id, syn.flags, syn.associated_to) == (1, 0, 0)
    assert syn.headers == Headers({":method": "GET", ":path": "/"})
    (reply,) = await read_all(NODE_SYN_REPLY)
    assert reply == SynReply(1, Headers(), 0)


ALL_FRAMES: list[Frame] = [
    DataFrame(1, b"hello", 0),
    DataFrame(3, b"", FLAG_FIN),
    SynStream(5, Headers({"streamtype": "stdin", "port": "80"}), FLAG_FIN | FLAG_UNIDIRECTIONAL, 3, 7, 1),
    SynReply(5, Headers([("x-multi", "a"), ("x-multi", "b")]), FLAG_FIN),
    RstStream(7, RstStatus.CANCEL),
    Settings(
        (Setting(SettingId.INITIAL_WINDOW_SIZE, 1 << 20, 1), Setting(SettingId.MAX_CONCURRENT_STREAMS, 9))
    ),
    Settings(),
    Ping(0xFFFFFFFF),
    GoAway(11, GoAwayStatus.PROTOCOL_ERROR),
    HeadersFrame(9, Headers({"trailer": "yes"}), FLAG_FIN),
    WindowUpdate(0, 1),
    WindowUpdate(13, 0x7FFFFFFF),
]


async def test_every_frame_type_round_trips_through_one_connection() -> None:
    deflater = HeaderDeflater()
    wire = b"".join(encode_frame(f, deflater) for f in ALL_FRAMES)
    assert await read_all(wire) == ALL_FRAMES


def test_control_header_carries_control_bit_version_type_flags_and_length() -> None:
    raw = encode_frame(RstStream(7, RstStatus.CANCEL), HeaderDeflater())
    assert raw == bytes.fromhex("80030003" + "00000008" + "00000007" + "00000005")
    data = encode_frame(DataFrame(0x7FFFFFFF, b"ab", FLAG_FIN), HeaderDeflater())
    assert data == bytes.fromhex("7fffffff" + "01000002") + b"ab"


def test_header_compression_continues_across_frames() -> None:
    deflater = HeaderDeflater()
    headers = Headers({"streamtype": "stdout", "x-long-header-name": "some fairly long value" * 3})
    first = deflater.compress(headers)
    second = deflater.compress(headers)
    assert len(second) < len(first) // 2  # the second block refers back into the first
    inflater = HeaderInflater()
    assert inflater.decompress(first) == headers
    assert inflater.decompress(second) == headers
    with pytest.raises(ProtocolError):
        HeaderInflater().decompress(second)  # a fresh context cannot read a later block


def test_header_block_values_names_and_validation() -> None:
    headers = Headers([("StreamType", "error"), ("x", "1"), ("X", "2")])
    assert headers["streamtype"] == headers["STREAMTYPE"] == "error"
    assert headers.get_all("x") == ["1", "2"]
    block = encode_block(headers)
    assert b"streamtype" in block and b"1\x002" in block
    assert decode_block(block) == headers
    duplicate = struct.pack(">I", 2) + (struct.pack(">I", 1) + b"a" + struct.pack(">I", 1) + b"v") * 2
    with pytest.raises(ProtocolError, match="duplicate"):
        decode_block(duplicate)
    with pytest.raises(ProtocolError, match="truncated"):
        decode_block(block[:-1])
    with pytest.raises(ProtocolError, match="cannot fit"):
        decode_block(struct.pack(">I", 1 << 30))
    with pytest.raises(ProtocolError, match="trailing"):
        decode_block(block + b"x")


def test_header_block_bomb_is_refused() -> None:
    huge = Headers({"x": "a" * (1 << 20)})
    with pytest.raises(ProtocolError, match="larger than"):
        HeaderInflater(max_block=64 << 10).decompress(HeaderDeflater().compress(huge))


async def test_clean_eof_is_none_and_unknown_control_types_are_skipped() -> None:
    unknown = struct.pack(">II", 0x80030000 | 0x0A, 3) + b"xyz"  # type 10 (CREDENTIAL): not ours
    wire = unknown + encode_frame(Ping(2), HeaderDeflater())
    assert await read_all(wire) == [UnknownFrame(3, 10, 0, 3), Ping(2)]
    assert await read_all(b"") == []


@pytest.mark.parametrize(
    ("wire", "match"),
    [
        (struct.pack(">II", 0x80020006, 4) + b"\0\0\0\1", "unsupported version 2"),
        (b"\x80\x03\x00", "truncated frame header"),
        (struct.pack(">II", 0x80030006, 4) + b"\0\0", "truncated frame body"),
        (struct.pack(">II", 1, 10) + b"short", "truncated frame body"),
        (struct.pack(">II", 0, 1) + b"x", "stream id 0"),
        (struct.pack(">IIII", 0x80030003, 8, 1, 0), "status 0"),
        (struct.pack(">III", 0x80030003, 4, 1), "expected 8"),
        (struct.pack(">III", 0x80030006, 8, 1) + b"\0\0\0\0", "expected 4"),
        (struct.pack(">III", 0x80030004, 4, 2), "expected 20"),
        (struct.pack(">IIII", 0x80030009, 8, 1, 0), "delta 0"),
        (struct.pack(">IIII", 0x80030001, 8, 1, 0), "minimum 10"),
        (struct.pack(">IIIIH", 0x80030001, 10, 0, 0, 0), "stream id 0"),
        (struct.pack(">III", 0x80030002, 12, 1) + b"notzlib!", "bad compressed header block"),
    ],
)
async def test_malformed_frames_are_protocol_errors(wire: bytes, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        await read_all(wire)


@pytest.mark.parametrize(
    ("first_word", "limit_kw", "match"),
    [(0x80030001, "max_control_length", "control frame length"), (1, "max_data_length", "DATA frame length")],
)
async def test_oversized_length_is_refused_before_reading_the_body(
    first_word: int, limit_kw: str, match: str
) -> None:
    # Only the 8-byte header is there and the stream stays open: a reader that
    # trusted the length would wait for 1 MiB that never comes.
    reader = reader_of(struct.pack(">II", first_word, 1 << 20), eof=False)
    frames = FrameReader(reader, **{limit_kw: 64 << 10})
    with pytest.raises(ProtocolError, match=match):
        await asyncio.wait_for(frames.read(), 5)


def test_encoder_refuses_out_of_range_values() -> None:
    with pytest.raises(ProtocolError):
        encode_frame(DataFrame(0, b"x"), HeaderDeflater())
    with pytest.raises(ProtocolError):
        encode_frame(WindowUpdate(1, 0), HeaderDeflater())
    with pytest.raises(ProtocolError):
        encode_frame(SynStream(1 << 31, Headers()), HeaderDeflater())
