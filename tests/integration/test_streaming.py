"""The CRI streaming server end to end: berth's client <-> server <-> TaskBackend <-> real processes.

The backend is the production :class:`TaskBackend`; below it, :class:`HostTasks`
runs host processes with the shim's own stdio code (FIFOs, CloseIO, pty), so
EOF, exit codes, resize, kill-on-disconnect are real. Port-forward dials into a
network namespace pinned with :mod:`plugins.cri.netns`, where a server listens
on its loopback only (unreachable from the host).
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from daemon.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from daemon.streaming import client
from daemon.streaming.channel import (
    BASE64_PROTOCOL,
    PROTOCOL_V1,
    PROTOCOL_V2,
    PROTOCOL_V3,
    PROTOCOL_V4,
    PROTOCOL_V5,
    V4_BASE64_PROTOCOL,
)
from plugins.cri import netns
from plugins.cri.config import CriConfig
from plugins.cri.streaming.backend import TaskBackend
from plugins.cri.streaming.server import StreamingServer
from plugins.cri.streaming.tokens import TokenCache
from protos.runtime import v1 as cri
from tests.support.streambackend import FakeRecords, HostTasks, add_container, add_sandbox, make_store

CID = "c0ffee"


@dataclass
class Env:
    server: StreamingServer
    tasks: HostTasks
    root: Path

    def exec_url(self, cmd: list[str], *, stdin: bool = False, tty: bool = False, stderr: bool = True) -> str:
        req = cri.ExecRequest(
            container_id=CID, cmd=cmd, stdin=stdin, stdout=True, stderr=stderr and not tty, tty=tty
        )
        return self.server.url("exec", req)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def env(tmp_path: Path, clock: Clock) -> AsyncIterator[Env]:
    tasks = HostTasks()
    records = FakeRecords()
    store = make_store(tmp_path / "cri", records)
    add_container(store, records, CID)
    add_container(store, records, "stopped", state="exited")
    backend = TaskBackend(
        tasks.as_task_manager(), store, records.as_store(), tmp_path / "fifo", kill_grace=0.3
    )
    server = StreamingServer(CriConfig(), backend, tokens=TokenCache(max_outstanding=8, clock=clock))
    await server.start()
    try:
        yield Env(server, tasks, tmp_path)
    finally:
        await server.stop()
        await tasks.shutdown()


async def eventually(check: object, deadline: float = 5.0) -> None:
    end = time.monotonic() + deadline
    while not check():  # type: ignore[operator]
        if time.monotonic() > end:
            raise AssertionError(f"condition not met within {deadline}s")
        await asyncio.sleep(0.02)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


# -- exec ------------------------------------------------------------------------------------


async def test_exec_spdy_stdin_eof_stdout_stderr_and_exit_code(env: Env) -> None:
    url = env.exec_url(["sh", "-c", "cat; echo oops >&2; exit 3"], stdin=True)
    result = await client.run_command(url, b"hello\nworld\n")
    assert result.stdout == b"hello\nworld\n"
    assert result.stderr == b"oops\n"
    assert result.exit_code == 3
    assert "non-zero exit code" in result.status.message
    assert env.tasks.live_execs() == []
    assert list((env.root / "fifo").iterdir()) == []


async def test_exec_spdy_success_and_no_stdin(env: Env) -> None:
    result = await client.run_command(env.exec_url(["echo", "hi"]))
    assert (result.stdout, result.stderr, result.exit_code) == (b"hi\n", b"", 0)


@pytest.mark.parametrize("protocol", [PROTOCOL_V4, PROTOCOL_V3, PROTOCOL_V2, PROTOCOL_V1])
async def test_exec_spdy_subprotocols(env: Env, protocol: str) -> None:
    url = env.exec_url(["sh", "-c", "cat; exit 5"], stdin=True)
    result = await client.run_command(url, b"data", protocols=[protocol])
    assert result.stdout == b"data"
    if protocol == PROTOCOL_V4:
        assert result.exit_code == 5
    else:  # before v4 the error stream carries only a text
        assert result.exit_code is None and "exit code 5" in result.status.message


async def test_exec_spdy_tty_with_resize(env: Env) -> None:
    url = env.exec_url(["sh", "-c", "while read x; do stty size; done"], stdin=True, tty=True)
    cmd = await client.connect_command(url, stdin=True, stdout=True, stderr=False, tty=True)
    async with cmd:
        assert cmd.protocol == PROTOCOL_V4
        await cmd.resize(123, 45)
        out = b""
        end = time.monotonic() + 5
        while b"45 123" not in out:  # resize and input travel on different streams: poll
            assert time.monotonic() < end, out
            await cmd.write_stdin(b"x\n")
            out += await asyncio.wait_for(cmd.read_stdout(), 5)
        await cmd.write_stdin(b"\x04")  # ^D on the terminal: read fails, the loop ends
        while await cmd.read_stdout():
            pass
        status = await asyncio.wait_for(cmd.wait(), 5)
    assert status.exit_code == 0
    assert env.tasks.live_execs() == []


async def test_exec_tty_output_is_one_stream(env: Env) -> None:
    result = await client.run_command(
        env.exec_url(["sh", "-c", "echo out; echo err >&2"], tty=True), tty=True
    )
    assert result.stdout.replace(b"\r\n", b"\n") == b"out\nerr\n"
    assert result.exit_code == 0


@pytest.mark.parametrize(
    "protocol", [PROTOCOL_V5, PROTOCOL_V4, V4_BASE64_PROTOCOL, PROTOCOL_V1, BASE64_PROTOCOL]
)
async def test_exec_websocket_subprotocols(env: Env, protocol: str) -> None:
    url = env.exec_url(["sh", "-c", "echo out; echo err >&2; exit 7"])
    result = await client.run_command(url, transport="websocket", protocols=[protocol])
    assert (result.stdout, result.stderr) == (b"out\n", b"err\n")
    if protocol in (PROTOCOL_V5, PROTOCOL_V4, V4_BASE64_PROTOCOL):
        assert result.exit_code == 7
    else:
        assert result.exit_code is None and "exit code 7" in result.status.message


async def test_exec_websocket_v5_stdin_close(env: Env) -> None:
    url = env.exec_url(["sh", "-c", "cat; echo done"], stdin=True)
    result = await client.run_command(url, b"abc\n", transport="websocket", protocols=[PROTOCOL_V5])
    assert result.stdout == b"abc\ndone\n"
    assert result.exit_code == 0


async def test_exec_missing_binary_reports_failure(env: Env) -> None:
    result = await client.run_command(env.exec_url(["/nonexistent/binary"]))
    assert result.exit_code is None
    assert "nonexistent" in result.status.message
    assert env.tasks.live_execs() == []


# -- tokens and validation -------------------------------------------------------------------


async def test_unknown_reused_expired_tokens_are_404_and_start_nothing(env: Env, clock: Clock) -> None:
    base = env.server.base_url
    with pytest.raises(NotFound):
        await client.run_command(f"{base}/exec/not-a-token")
    url = env.exec_url(["echo", "once"])
    assert (await client.run_command(url)).stdout == b"once\n"
    started = len(env.tasks.started_pids)
    with pytest.raises(NotFound):
        await client.run_command(url)
    with pytest.raises(NotFound):  # WebSocket too
        await client.run_command(url, transport="websocket")
    expired = env.exec_url(["echo", "late"])
    clock.now += 61
    with pytest.raises(NotFound):
        await client.run_command(expired)
    wrong_kind = env.exec_url(["echo", "x"]).replace("/exec/", "/attach/")
    with pytest.raises(NotFound):
        await client.run_command(wrong_kind)
    assert len(env.tasks.started_pids) == started
    async with aiohttp.ClientSession() as http, http.get(f"{base}/exec/whatever") as resp:
        assert resp.status == 404


async def test_url_validation(env: Env, clock: Clock) -> None:
    with pytest.raises(InvalidArgument, match="tty and stderr"):
        env.server.url("exec", cri.ExecRequest(container_id=CID, cmd=["x"], tty=True, stderr=True))
    with pytest.raises(InvalidArgument, match="one of stdin"):
        env.server.url("exec", cri.ExecRequest(container_id=CID, cmd=["x"]))
    with pytest.raises(InvalidArgument, match="cmd"):
        env.server.url("exec", cri.ExecRequest(container_id=CID, stdout=True))
    with pytest.raises(NotFound):
        env.server.url("attach", cri.AttachRequest(container_id="nope", stdout=True))
    with pytest.raises(FailedPrecondition, match="not running"):
        env.server.url("exec", cri.ExecRequest(container_id="stopped", cmd=["x"], stdout=True))
    with pytest.raises(InvalidArgument, match="port"):
        env.server.url("portforward", cri.PortForwardRequest(pod_sandbox_id="sb", port=[70000]))
    url = env.server.url("exec", cri.ExecRequest(container_id=CID[:3], cmd=["x"], stdout=True))
    assert url.startswith(f"{env.server.base_url}/exec/")
    for _ in range(7):
        env.exec_url(["x"])
    with pytest.raises(ResourceExhausted):
        env.exec_url(["x"])
    clock.now += 61  # expired tokens free their places
    env.exec_url(["x"])


async def test_not_an_upgrade_is_400(env: Env) -> None:
    url = env.exec_url(["echo"])
    async with aiohttp.ClientSession() as http, http.post(url) as resp:
        assert resp.status == 400


async def test_spdy_without_common_protocol_is_403(env: Env) -> None:
    with pytest.raises(Exception, match="403"):
        await client.run_command(env.exec_url(["echo"]), protocols=["v9.channel.k8s.io"])


# -- faults: client disconnect, malformed frames ------------------------------------------------


async def _started_exec(env: Env) -> int:
    await eventually(lambda: any(p.pid for p in env.tasks.live_execs()))
    return env.tasks.live_execs()[0].pid


@pytest.mark.parametrize("cmd", [["cat"], ["sleep", "1000"]], ids=["exits-on-eof", "needs-kill"])
async def test_spdy_client_disconnect_leaves_no_process(env: Env, cmd: list[str]) -> None:
    remote = await client.connect_command(env.exec_url(cmd, stdin=True), stdin=True)
    assert isinstance(remote, client.SpdyCommand)
    pid = await _started_exec(env)
    transport = remote.session._writer.transport
    transport.abort()  # no GOAWAY, no FIN: the client just vanishes
    await eventually(lambda: not env.tasks.live_execs() and not pid_alive(pid))
    assert list((env.root / "fifo").iterdir()) == []


async def test_websocket_client_disconnect_leaves_no_process(env: Env) -> None:
    remote = await client.connect_command(
        env.exec_url(["sleep", "1000"], stdin=True), stdin=True, transport="websocket"
    )
    assert isinstance(remote, client.WsCommand)
    pid = await _started_exec(env)
    await remote.close()
    await eventually(lambda: not env.tasks.live_execs() and not pid_alive(pid))


async def test_malformed_spdy_frame_closes_connection_server_fine(env: Env) -> None:
    remote = await client.connect_command(env.exec_url(["sleep", "1000"], stdin=True), stdin=True)
    assert isinstance(remote, client.SpdyCommand)
    pid = await _started_exec(env)
    remote.session._writer.write(b"\x80\x02\x00\x01\x00\x00\x00\x00")  # a SPDY/2 control frame
    await asyncio.wait_for(remote.session.wait_closed(), 5)  # the server hung up
    await eventually(lambda: not env.tasks.live_execs() and not pid_alive(pid))
    result = await client.run_command(env.exec_url(["echo", "still", "here"]))
    assert result.stdout == b"still here\n" and result.exit_code == 0


async def test_malformed_websocket_frame_closes_connection_server_fine(env: Env) -> None:
    remote = await client.connect_command(
        env.exec_url(["sleep", "1000"], stdin=True), stdin=True, transport="websocket"
    )
    assert isinstance(remote, client.WsCommand)
    pid = await _started_exec(env)
    transport = remote._ws._writer.transport  # type: ignore[attr-defined]
    transport.write(b"\x8f\x80\x00\x00\x00\x00")  # reserved opcode 0xF
    await asyncio.wait_for(remote._done.wait(), 5)
    await eventually(lambda: not env.tasks.live_execs() and not pid_alive(pid))
    await remote.close()
    result = await client.run_command(env.exec_url(["echo", "ok"]), transport="websocket")
    assert result.stdout == b"ok\n"


async def test_server_stop_cancels_live_streams(env: Env) -> None:
    remote = await client.connect_command(env.exec_url(["sleep", "1000"], stdin=True), stdin=True)
    pid = await _started_exec(env)
    await asyncio.wait_for(env.server.stop(), 10)
    assert not env.tasks.live_execs() and not pid_alive(pid)
    status = await asyncio.wait_for(remote.wait(), 5)
    assert status.exit_code is None and "shutting down" in status.message
    await remote.close()


# -- attach ------------------------------------------------------------------------------------

CONTAINER_SCRIPT = r"""
import sys
log = open(sys.argv[1], "ab", buffering=0)
def entry(stream, tag, data):
    log.write(b"2024-01-01T00:00:00.000000000Z " + stream + b" " + tag + b" " + data + b"\n")
for line in sys.stdin.buffer:
    line = line.rstrip(b"\n")
    if line.startswith(b"exit "):
        sys.exit(int(line[5:]))
    entry(b"stdout", b"P", b"part-")
    entry(b"stdout", b"F", line)
    entry(b"stderr", b"F", b"err:" + line)
"""


class Collector:
    def __init__(self, cmd: client.RemoteCommand, stderr: bool = True) -> None:
        self.cmd = cmd
        self.out = b""
        self.err = b""
        self.tasks = [asyncio.create_task(self._pump("out", cmd.read_stdout))]
        if stderr:
            self.tasks.append(asyncio.create_task(self._pump("err", cmd.read_stderr)))

    async def _pump(self, name: str, read: object) -> None:
        while data := await read():  # type: ignore[operator]
            setattr(self, name, getattr(self, name) + data)


async def test_attach_two_clients_stdin_and_exit(env: Env, tmp_path: Path) -> None:
    log_path = tmp_path / "ctr.log"
    log_path.touch()
    fifo = tmp_path / "ctr.stdin"
    os.mkfifo(fifo)
    from daemon.protocols import TaskIO
    from tests.support.streambackend import add_container as add

    store = env.server._backend._store  # type: ignore[attr-defined]
    records = store._records
    add(store, records, "attached", log_path=str(log_path))
    script = tmp_path / "ctr.py"
    script.write_text(CONTAINER_SCRIPT)
    await env.tasks.add("attached", "", [sys.executable, str(script), str(log_path)], TaskIO(stdin=str(fifo)))
    await env.tasks.start("k8s.io", "attached")

    def url(stdin: bool) -> str:
        req = cri.AttachRequest(container_id="attached", stdin=stdin, stdout=True, stderr=True)
        return env.server.url("attach", req)

    watcher = await client.connect_command(url(False), transport="websocket", protocols=[PROTOCOL_V4])
    typist = await client.connect_command(url(True), stdin=True)
    w, t = Collector(watcher), Collector(typist)
    n = 0
    end = time.monotonic() + 5
    while b"part-line%d\n" % n not in w.out:  # until the watcher's follower is surely running
        assert time.monotonic() < end
        n += 1
        await typist.write_stdin(b"line%d\n" % n)
        await asyncio.sleep(0.05)
    await eventually(lambda: b"err:line%d\n" % n in t.err and b"part-line%d\n" % n in t.out)
    assert b"err:line%d\n" % n in w.err
    await typist.write_stdin(b"exit 4\n")
    statuses = await asyncio.wait_for(asyncio.gather(watcher.wait(), typist.wait()), 5)
    assert [s.exit_code for s in statuses] == [4, 4]
    for c in (w, t):
        await asyncio.wait_for(asyncio.gather(*c.tasks), 5)
    await watcher.close()
    await typist.close()


# -- port-forward ------------------------------------------------------------------------------

POD_SERVER = r"""
import asyncio, sys
async def serve(reader, writer, port):
    while line := await reader.readline():
        writer.write(b"%d:" % port + line)
        await writer.drain()
    writer.close()
async def main():
    for port in map(int, sys.argv[1:]):
        await asyncio.start_server(lambda r, w, p=port: serve(r, w, p), "127.0.0.1", port)
    print("ready", flush=True)
    await asyncio.Event().wait()
asyncio.run(main())
"""
PORTS = (8080, 9090)


@pytest.fixture
async def pod(tmp_path: Path) -> AsyncIterator[str]:
    """A pinned netns with lo up and a line-echo server on 127.0.0.1:8080 and :9090 inside."""
    nsdir = tmp_path / "ns"
    paths = await netns.create(nsdir, ["net"])
    path = str(paths["net"])
    proc = None
    try:
        subprocess.run(["nsenter", f"--net={path}", "ip", "link", "set", "lo", "up"], check=True)
        script = tmp_path / "pod.py"
        script.write_text(POD_SERVER)
        proc = subprocess.Popen(
            ["nsenter", f"--net={path}", sys.executable, str(script), *map(str, PORTS)],
            stdout=subprocess.PIPE,
        )
        assert proc.stdout is not None
        assert await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 10) == b"ready\n"
        yield path
    finally:
        if proc is not None:
            proc.kill()
            proc.wait()
        await netns.remove_all(nsdir, ["net"])


def pf_url(env: Env, netns_path: str, ports: list[int]) -> str:
    store = env.server._backend._store  # type: ignore[attr-defined]
    add_sandbox(store, "sb", netns_path)
    return env.server.url("portforward", cri.PortForwardRequest(pod_sandbox_id="sb", port=ports))


async def test_portforward_spdy_two_ports_concurrent_connections(env: Env, pod: str) -> None:
    with socket.socket() as s, pytest.raises(ConnectionRefusedError):
        s.connect(("127.0.0.1", PORTS[0]))  # nothing on the host: only inside the pod's netns
    async with await client.connect_portforward(pf_url(env, pod, list(PORTS))) as pf:

        async def one(port: int, i: int) -> bytes:
            conn = await pf.open(port)
            await conn.write(b"hello %d\nbye %d\n" % (i, i))
            await conn.close_write()
            data = await conn.read_all()
            assert await conn.error() == ""
            return data

        jobs = [(port, i) for port in PORTS for i in range(4)]
        replies = await asyncio.wait_for(asyncio.gather(*(one(p, i) for p, i in jobs)), 10)
        for (port, i), reply in zip(jobs, replies, strict=True):
            assert reply == b"%d:hello %d\n%d:bye %d\n" % (port, i, port, i)
        bad = await pf.open(1234)
        assert "error forwarding port 1234" in await asyncio.wait_for(bad.error(), 5)
        assert await bad.read_all() == b""
        again = await pf.open(PORTS[1])  # the session survived the failed one
        await again.write(b"x\n")
        await again.close_write()
        assert await again.read_all() == b"9090:x\n"


async def test_portforward_websocket_two_ports(env: Env, pod: str) -> None:
    pf = await client.connect_portforward_ws(pf_url(env, pod, []), list(PORTS))
    try:
        for index in range(len(PORTS)):
            await pf.write(index, b"ws%d\n" % index)
        for index, port in enumerate(PORTS):
            got = b""
            while not got.endswith(b"\n"):
                got += await asyncio.wait_for(pf.read(index), 5)
            assert got == b"%d:ws%d\n" % (port, index)
            assert pf.error(index) == ""
    finally:
        await pf.close()
