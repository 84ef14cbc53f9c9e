"""The CRI log writer of the shim: URI parsing, the line splitter (containerd's rules), the file, and
the runtime manager refusing crilog:// for a shim that does not write it."""

from __future__ import annotations

import asyncio
import os
import re
import stat
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import pytest

from daemon.errors import FailedPrecondition, InvalidArgument, NotFound, Unimplemented
from daemon.protocols import TaskIO
from plugins.runtime.runc_v2.manager import TaskManager, writes_crilog
from plugins.runtime.runc_v2.settings import Settings
from plugins.runtime.runc_v2.shim.crilog import (
    DEFAULT_MAX_LINE,
    Clock,
    LineSplitter,
    LogFile,
    Target,
    parse,
    uri,
)
from plugins.runtime.runc_v2.shim.stdio import LogCopy, ProcessIO, open_target

TS = b"2026-11-21T07:40:01.123456789Z"
ENTRY = re.compile(rb"^(\S+) (stdout|stderr) ([PF]) (.*)$", re.DOTALL)


def entries(data: bytes) -> list[tuple[bytes, bytes]]:
    """(tag, text) of each entry, checking every line's shape."""
    assert data == b"" or data.endswith(b"\n"), data
    found = []
    for line in data.split(b"\n")[:-1]:
        match = ENTRY.match(line)
        assert match is not None, line
        found.append((match.group(3), match.group(4)))
    return found


def split(
    data: bytes | list[bytes], max_line: int = DEFAULT_MAX_LINE, *, eof: bool = True
) -> list[tuple[bytes, bytes]]:
    splitter = LineSplitter("stdout", max_line)
    chunks = [data] if isinstance(data, bytes) else data
    out = b"".join(splitter.feed(chunk, TS) for chunk in chunks)
    if eof:
        out += splitter.finish(TS)
    return entries(out)


# -- URIs -----------------------------------------------------------------------


def test_parse_uri_defaults_and_max_line() -> None:
    assert parse("crilog:///var/log/pods/ns_p_uid/c/0.log") == Target("/var/log/pods/ns_p_uid/c/0.log")
    assert parse("crilog:///x/0.log?max_line=100") == Target("/x/0.log", 100)
    assert parse("crilog:///x/0.log?max_line=-1").max_line == -1
    assert parse(uri("/a dir/we?ird%.log", 7)) == Target("/a dir/we?ird%.log", 7)
    assert uri("/x/0.log") == "crilog:///x/0.log"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("crilog://host/x.log", "no host"),
        ("crilog://x.log", "no host"),
        ("crilog:///", "absolute file path"),
        ("crilog:///x/0.log?max_line=big", "max_line must be an integer"),
        ("crilog:///x/0.log?size=3", "unknown query parameter 'size'"),
        ("file:///x", "not a crilog"),
    ],
)
def test_parse_uri_rejects(value: str, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        parse(value)


def test_crilog_is_refused_for_stdin_and_other_schemes_stay_unimplemented() -> None:
    with pytest.raises(InvalidArgument, match="not stdin"):
        open_target("crilog:///x/0.log", read=True)
    with pytest.raises(Unimplemented, match="crilog://"):
        open_target("binary:///bin/logger", read=False)


# -- the splitter ---------------------------------------------------------------


def test_lines_become_full_entries_with_timestamp_and_stream() -> None:
    splitter = LineSplitter("stderr")
    out = splitter.feed(b"hello\nworld\n", TS)
    assert out == TS + b" stderr F hello\n" + TS + b" stderr F world\n"


def test_empty_lines_are_empty_full_entries() -> None:
    assert split(b"\n\na\n\n") == [(b"F", b""), (b"F", b""), (b"F", b"a"), (b"F", b"")]


def test_crlf_ends_a_line_like_containerd_and_a_lone_cr_is_kept() -> None:
    # containerd's readLine drops "\r\n" (a terminal writes it for every "\n"), keeps other "\r".
    assert split(b"dos\r\nmid\rcr\n\r\n") == [(b"F", b"dos"), (b"F", b"mid\rcr"), (b"F", b"")]
    # the \r and \n arriving in separate reads make no difference
    assert split([b"dos\r", b"\nnext\n"]) == [(b"F", b"dos"), (b"F", b"next")]


def test_lines_in_pieces_are_joined_until_their_newline() -> None:
    splitter = LineSplitter("stdout")
    assert splitter.feed(b"hel", TS) == b""
    assert splitter.pending == 3
    assert entries(splitter.feed(b"lo\nwor", TS)) == [(b"F", b"hello")]
    assert entries(splitter.feed(b"ld\n", TS)) == [(b"F", b"world")]
    assert splitter.finish(TS) == b""


def test_unterminated_last_line_is_partial_at_eof_like_containerd() -> None:
    assert split(b"a\nlast") == [(b"F", b"a"), (b"P", b"last")]
    assert split(b"") == []
    assert split(b"cr at the end\r") == [(b"P", b"cr at the end\r")]


@pytest.mark.parametrize(
    ("length", "expected"),
    [
        (DEFAULT_MAX_LINE - 1, [(b"F", DEFAULT_MAX_LINE - 1)]),
        (DEFAULT_MAX_LINE, [(b"F", DEFAULT_MAX_LINE)]),
        (DEFAULT_MAX_LINE + 1, [(b"P", DEFAULT_MAX_LINE), (b"F", 1)]),
        (2 * DEFAULT_MAX_LINE, [(b"P", DEFAULT_MAX_LINE), (b"F", DEFAULT_MAX_LINE)]),
        (40 * 1024, [(b"P", 16384), (b"P", 16384), (b"F", 40 * 1024 - 32768)]),
    ],
)
@pytest.mark.parametrize("chunk", [1000, 4096, 65536])
def test_long_lines_split_at_16_kib(length: int, expected: list[tuple[bytes, int]], chunk: int) -> None:
    line = bytes(ord("a") + i % 26 for i in range(length))
    data = line + b"\n" + b"after\n"
    got = split([data[i : i + chunk] for i in range(0, len(data), chunk)])
    assert [(tag, len(text)) for tag, text in got] == [*expected, (b"F", 5)]
    assert b"".join(text for _, text in got[:-1]) == line
    assert got[-1] == (b"F", b"after")


def test_a_line_of_max_line_with_crlf_is_one_full_entry_even_when_the_cr_comes_alone() -> None:
    line = b"x" * 10
    assert split([line + b"\r", b"\n"], max_line=10) == [(b"F", line)]
    assert split([line + b"\r", b"y\n"], max_line=10) == [(b"P", line), (b"F", b"\ry")]


def test_long_unterminated_line_at_eof_is_all_partial() -> None:
    assert split(b"x" * 25, max_line=10) == [(b"P", b"x" * 10), (b"P", b"x" * 10), (b"P", b"x" * 5)]


def test_max_line_zero_or_negative_never_splits() -> None:
    assert split(b"y" * 50000 + b"\n", max_line=-1) == [(b"F", b"y" * 50000)]
    assert split(b"y" * 50000, max_line=0) == [(b"P", b"y" * 50000)]


def test_bytes_pass_through_undecoded() -> None:
    blob = bytes(range(256)).replace(b"\n", b"")
    assert split(blob + b"\n") == [(b"F", blob)]


def test_clock_is_rfc3339_nano_utc() -> None:
    clock = Clock()
    ns = 1_795_000_000_000_000_001
    stamp = clock.stamp(ns).decode()
    assert stamp == "2026-11-18T11:06:40.000000001Z"
    parsed = datetime.strptime(stamp[:26] + "Z", "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    assert int(parsed.timestamp()) == ns // 1_000_000_000
    assert clock.stamp(ns + 999_999_998).decode() == "2026-11-18T11:06:40.999999999Z"
    assert clock.stamp(ns + 1_000_000_000).decode() == "2026-11-18T11:06:41.000000001Z"


# -- the file -------------------------------------------------------------------


def test_file_is_created_0640_append_and_needs_its_directory(tmp_path: Path) -> None:
    path = tmp_path / "0.log"
    path.write_bytes(b"kept\n")
    old_umask = os.umask(0o022)
    try:
        logfile = LogFile.open(uri(str(path)))
        fresh = LogFile.open(uri(str(tmp_path / "1.log")))
    finally:
        os.umask(old_umask)
    logfile.close()
    fresh.close()
    assert path.read_bytes() == b"kept\n"
    assert stat.S_IMODE((tmp_path / "1.log").stat().st_mode) == 0o640
    with pytest.raises(InvalidArgument, match=r"log directory '.*/missing' does not exist"):
        LogFile.open(uri(str(tmp_path / "missing" / "0.log")))
    with pytest.raises(InvalidArgument, match="is a directory"):
        LogFile.open(f"crilog://{tmp_path}/.")


async def test_write_reopen_and_close(tmp_path: Path) -> None:
    path = tmp_path / "0.log"
    logfile = LogFile.open(uri(str(path)))
    logfile.acquire()
    await logfile.write(b"one\n")
    path.rename(tmp_path / "0.log.1")
    await logfile.write(b"two\n")  # still the renamed file until reopen
    await logfile.reopen()
    await logfile.write(b"three\n")
    assert (tmp_path / "0.log.1").read_bytes() == b"one\ntwo\n"
    assert path.read_bytes() == b"three\n"
    (tmp_path / "0.log.1").unlink()
    os.rename(tmp_path, tmp_path.with_name(tmp_path.name + "-gone"))
    try:
        with pytest.raises(FailedPrecondition, match="does not exist"):
            await logfile.reopen()
        await logfile.write(b"four\n")  # the old file goes on
    finally:
        os.rename(tmp_path.with_name(tmp_path.name + "-gone"), tmp_path)
    assert path.read_bytes() == b"three\nfour\n"
    logfile.release()
    assert logfile.closed
    await logfile.reopen()  # nothing to do once every stream ended
    await logfile.write(b"late\n")
    assert logfile.dropped == 5
    assert path.read_bytes() == b"three\nfour\n"


async def test_log_copy_drains_a_pipe_into_the_file_until_eof(tmp_path: Path) -> None:
    path = tmp_path / "0.log"
    logfile = LogFile.open(uri(str(path), 8))
    read_end, write_end = os.pipe()
    copy = LogCopy("log-stdout", read_end, logfile, "stdout")
    os.write(write_end, b"0123456789abc\nshort\r\nno newline")
    os.close(write_end)
    await asyncio.wait_for(copy.task, 5)
    assert logfile.closed  # its only user ended
    got = entries(path.read_bytes())
    assert got == [
        (b"P", b"01234567"),
        (b"F", b"89abc"),
        (b"F", b"short"),
        (b"P", b"no newli"),
        (b"P", b"ne"),
    ]


async def test_process_io_shares_one_file_for_stdout_and_stderr(tmp_path: Path) -> None:
    target = uri(str(tmp_path / "0.log"))
    io = await asyncio.to_thread(ProcessIO.open, "", target, target, False)
    try:
        assert io.has_logs
        stdio = io.for_runc()
        assert stdio.stdout is not None and stdio.stderr is not None
        out_w, err_w = os.dup(stdio.stdout), os.dup(stdio.stderr)
        io.started()  # the shim's copies of the write ends are closed; only ours remain
        os.write(out_w, b"to out\n")
        os.write(err_w, b"to err\n")
        os.close(out_w)
        os.close(err_w)
        await asyncio.wait_for(asyncio.gather(*(c.task for c in io.copies)), 5)
    finally:
        await io.close()
    got = sorted(entries((tmp_path / "0.log").read_bytes()))
    assert got == [(b"F", b"to err"), (b"F", b"to out")]
    lines = (tmp_path / "0.log").read_bytes().splitlines()
    assert sorted(line.split(b" ")[1] for line in lines) == [b"stderr", b"stdout"]


# -- the runtime manager ----------------------------------------------------------


def _manager(tmp_path: Path, runtime_binary: str, shim_binary: str) -> TaskManager:
    settings = Settings(
        state=tmp_path / "state",
        runc_root=tmp_path / "runc",
        shim_state=tmp_path / "shim",
        runtime_binary=runtime_binary,
        shim_binary=shim_binary,
        runc_binary="runc",
        systemd_cgroup=False,
        shim_debug=False,
        address="/test/berth.sock",
        ttrpc_address="/test/berth.sock.ttrpc",
        publish_binary="",
    )
    return TaskManager(settings, cast(Any, None), cast(Any, None), cast(Any, None))


async def test_manager_refuses_crilog_for_containerds_shim_up_front(tmp_path: Path) -> None:
    manager = _manager(tmp_path, "containerd-shim-runc-v2", "/usr/bin/containerd-shim-runc-v2")
    log = uri("/var/log/pods/x/c/0.log")
    with pytest.raises(FailedPrecondition, match=r"task 'c1'.*runtime_binary 'containerd-shim-runc-v2'"):
        await manager.create("k8s.io", "c1", io=TaskIO(stdout=log, stderr=log))
    with pytest.raises(NotFound, match="c1"):
        await manager.reopen_log("k8s.io", "c1")
    assert writes_crilog("/work/.venv/bin/berth-shim-runc-v2")
    assert not writes_crilog("/usr/bin/containerd-shim-runc-v2")
