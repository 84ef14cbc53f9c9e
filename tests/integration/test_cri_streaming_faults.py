"""CRI streaming faults against real containers in a real berthd (issue 6, "Bad input and faults").

Attach to a tty container; a client that leaves mid-exec (the exec'd process
is killed and the shim forgets the exec); a container that exits while
attached (the stream ends with its exit status), also with several attaches
at once over both transports; a malformed SPDY frame (the connection closes,
the next exec works); an expired token (404, nothing started: berthd runs
with ``BERTH_CRI_STREAM_TOKEN_TTL`` of a second). The node scaffolding and
its teardown are test_cri_containers'.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from grpclib.exceptions import GRPCError

from daemon import typeurl
from daemon.errors import NotFound
from daemon.streaming.channel import SPDY_REMOTECOMMAND_PROTOCOLS, spdy_upgrade_request
from daemon.streaming.client import RemoteCommand, Transport, connect_command, run_command
from plugins.cri.streaming.tokens import TTL_ENV
from protos.containerd.services.tasks.v1 import GetRequest, ListPidsRequest, TasksStub
from protos.runtime import v1 as cri
from tests.integration.conftest import Berthd, ctr, headers, ok
from tests.integration.test_cri_containers import K8S, Node, cleanup, config, node  # noqa: F401
from tests.support.oci import busybox_image, oci_archive

TOKEN_TTL = 1.0


async def _running(node: Node, *command: str, **kw: object) -> str:  # noqa: F811
    pod = await node.pod()
    cid = await node.run(pod, "app", *command, **kw)
    await node.wait_state(cid, cri.ContainerState.CONTAINER_RUNNING)
    return cid


async def _read_until(read: Callable[[], object], marker: bytes, timeout: float = 20) -> bytes:
    """Read chunks until ``marker`` was seen (or the stream ended); all that was read."""
    out = bytearray()

    async def loop() -> None:
        while marker not in out:
            chunk = await read()  # type: ignore[misc]
            if not chunk:
                return
            out.extend(chunk)

    await asyncio.wait_for(loop(), timeout)
    return bytes(out)


def _procs_with(marker: str) -> list[int]:
    """Host PIDs whose command line holds ``marker`` as one argument."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if marker.encode() in (entry / "cmdline").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
    return found


async def _poll(predicate: Callable[[], bool], what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def _tasks(node: Node) -> TasksStub:  # noqa: F811
    return TasksStub(node.channel, metadata=headers(K8S), timeout=10)


async def _exec_ids(node: Node, cid: str) -> dict[int, str]:  # noqa: F811
    """pid -> exec id of the container's exec processes, as the shim lists them."""
    listed = await _tasks(node).list_pids(ListPidsRequest(container_id=cid))
    out = {}
    for p in listed.processes:
        if p.info is not None and p.info.type_url:
            decoded = typeurl.decode_any(p.info)
            exec_id = getattr(decoded, "exec_id", "")
            if exec_id:
                out[p.pid] = exec_id
    return out


async def test_attach_to_a_tty_container(node: Node) -> None:  # noqa: F811
    cid = await _running(node, "sh", tty=True, stdin=True)
    resp = await node.rt.attach(cri.AttachRequest(container_id=cid, stdin=True, tty=True, stdout=True))
    cmd = await connect_command(resp.url, stdin=True, stdout=True, stderr=False, tty=True)
    async with cmd:
        await cmd.resize(120, 40)
        # the shell computes it: the terminal's echo of the input cannot pass for the answer
        await cmd.write_stdin(b"echo tty-$((6*7)); stty size\n")
        out = await _read_until(cmd.read_stdout, b"40 120")
        assert b"tty-42" in out
        await cmd.write_stdin(b"exit 7\n")
        status = await asyncio.wait_for(cmd.wait(), 20)
    assert status.exit_code == 7
    st = await node.wait_state(cid, cri.ContainerState.CONTAINER_EXITED)
    assert st.exit_code == 7


@pytest.mark.parametrize("transport", ["spdy", "websocket"])
async def test_client_gone_mid_exec_kills_the_exec_and_the_shim_forgets_it(
    node: Node,  # noqa: F811
    transport: Transport,
) -> None:
    cid = await _running(node, "sleep", "1000")
    marker = str(400000 + secrets.randbelow(99999))  # `sleep <marker>`: findable in /proc
    resp = await node.rt.exec(
        cri.ExecRequest(
            container_id=cid, cmd=["sh", "-c", f"echo started; exec sleep {marker}"], stdout=True, stderr=True
        )
    )
    cmd = await connect_command(resp.url, stdout=True, stderr=True, transport=transport)
    try:
        assert b"started" in await _read_until(cmd.read_stdout, b"started")
        await _poll(lambda: bool(_procs_with(marker)), "the exec'd sleep to run")
        execs = await _exec_ids(node, cid)
        (pid,) = _procs_with(marker)
        assert pid in execs, (pid, execs)
        exec_id = execs[pid]
    finally:
        await cmd.close()  # the client leaves; the process would otherwise sleep on
    await _poll(lambda: not _procs_with(marker), "the exec'd process to be killed")
    # the server deletes the exec once it has seen its exit: that follows the process's death closely
    deadline = time.monotonic() + 20
    while True:
        try:
            found = await _tasks(node).get(GetRequest(container_id=cid, exec_id=exec_id))
        except GRPCError as err:
            assert err.status.name == "NOT_FOUND", err
            break
        assert time.monotonic() < deadline, f"exec {exec_id} still known to the shim: {found}"
        await asyncio.sleep(0.05)
    assert exec_id not in (await _exec_ids(node, cid)).values()
    # the container itself is untouched
    assert (await node.status(cid)).status.state == cri.ContainerState.CONTAINER_RUNNING


async def _attached(node: Node, cid: str, transport: Transport) -> RemoteCommand:  # noqa: F811
    resp = await node.rt.attach(cri.AttachRequest(container_id=cid, stdout=True, stderr=True))
    return await connect_command(resp.url, stdout=True, stderr=True, transport=transport)


# ticks until /tmp/go exists (so an attach can tell it follows the output), then says bye and exits 9
TICKER = "while [ ! -e /tmp/go ]; do echo tick; sleep 0.1; done; echo bye; exit 9"


async def _exits_while_attached(node: Node, transports: list[Transport]) -> None:  # noqa: F811
    cid = await _running(node, "sh", "-c", TICKER)
    cmds = [await _attached(node, cid, t) for t in transports]
    try:
        # every attach follows the log before the container is let go
        await asyncio.gather(*(_read_until(c.read_stdout, b"tick") for c in cmds))
        go = await node.rt.exec_sync(cri.ExecSyncRequest(container_id=cid, cmd=["touch", "/tmp/go"]))
        assert go.exit_code == 0
        outs = await asyncio.gather(*(_read_until(c.read_stdout, b"\x00never") for c in cmds))
        statuses = await asyncio.gather(*(asyncio.wait_for(c.wait(), 20) for c in cmds))
    finally:
        for c in cmds:
            await c.close()
    for out, status in zip(outs, statuses, strict=True):
        assert out.rstrip().endswith(b"bye"), out[-200:]
        assert status.exit_code == 9, status
    st = await node.wait_state(cid, cri.ContainerState.CONTAINER_EXITED)
    assert st.exit_code == 9


async def test_container_exit_ends_the_attach_with_its_status(node: Node) -> None:  # noqa: F811
    await _exits_while_attached(node, ["spdy"])


async def test_several_attaches_at_once_all_see_the_end(node: Node) -> None:  # noqa: F811
    await _exits_while_attached(node, ["spdy", "spdy", "websocket"])


async def test_malformed_spdy_frame_closes_the_connection_and_the_server_lives_on(
    node: Node,  # noqa: F811
) -> None:
    cid = await _running(node, "sleep", "1000")
    resp = await node.rt.exec(cri.ExecRequest(container_id=cid, cmd=["echo", "x"], stdout=True))
    parts = urlsplit(resp.url)
    assert parts.hostname is not None
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    try:
        writer.write(spdy_upgrade_request("POST", parts.path, parts.netloc, SPDY_REMOTECOMMAND_PROTOCOLS))
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 101"), head
        # a SYN_STREAM whose header block is not zlib at all
        writer.write(
            b"\x80\x03\x00\x01\x00\x00\x00\x12" + b"\x00\x00\x00\x01\x00\x00\x00\x00\x00\x00" + b"\xff" * 8
        )
        await writer.drain()

        async def until_eof() -> None:
            while await reader.read(65536):
                pass

        await asyncio.wait_for(until_eof(), 10)  # the server hung up
    finally:
        writer.close()
    assert not await _exec_ids(node, cid)  # nothing was started
    again = await node.rt.exec(cri.ExecRequest(container_id=cid, cmd=["echo", "fine"], stdout=True))
    result = await run_command(again.url, stderr=False)
    assert (result.stdout, result.exit_code) == (b"fine\n", 0)


@pytest.fixture
async def short_ttl_node(make_berthd: Callable[..., Berthd], short_tmp: Path) -> AsyncIterator[Node]:
    """test_cri_containers' node, but berthd's streaming tokens live :data:`TOKEN_TTL` seconds."""
    d = make_berthd(config=config(short_tmp), env={TTL_ENV: str(TOKEN_TTL)})
    d.start()
    n = Node(d, d.channel(), short_tmp / "logs")
    try:
        await d.wait_ready()
        archive = oci_archive(busybox_image(), short_tmp / "bb.tar", ref_name="1.0")
        ok(ctr(d, "images", "import", "--base-name", "docker.io/berth/bb", str(archive), ns=K8S))
        yield n
    finally:
        await cleanup(n)


async def test_expired_token_is_404_and_starts_nothing(short_ttl_node: Node) -> None:
    n = short_ttl_node
    cid = await _running(n, "sleep", "1000")
    late = await n.rt.exec(cri.ExecRequest(container_id=cid, cmd=["touch", "/tmp/late"], stdout=True))
    fresh = await n.rt.exec(cri.ExecRequest(container_id=cid, cmd=["echo", "in time"], stdout=True))
    assert (
        await run_command(fresh.url, stderr=False)
    ).stdout == b"in time\n"  # the TTL leaves time to use a URL
    await asyncio.sleep(TOKEN_TTL + 0.3)  # what is under test is the passing of time itself
    with pytest.raises(NotFound):
        await run_command(late.url, stderr=False)
    check = await n.rt.exec_sync(cri.ExecSyncRequest(container_id=cid, cmd=["test", "-e", "/tmp/late"]))
    assert check.exit_code == 1  # the exec never ran
    assert not await _exec_ids(n, cid)
