"""CRI Exec, Attach and PortForward end to end: the RPC's URL, then SPDY or WebSocket to berthd's server.

Real runc containers in host-network pods (busybox imported into ``k8s.io``);
the client is the project's own (daemon/streaming/client.py), as ``berth cri``
uses it. The node fixture and its teardown come from test_cri_containers.
"""

from __future__ import annotations

import asyncio
import socket
import time

import pytest
from grpclib.const import Status

from daemon.streaming.client import RemoteCommand, connect_command, connect_portforward, run_command
from protos.runtime import v1 as cri
from tests.integration.conftest import grpc_error
from tests.integration.test_cri_containers import Node, node  # noqa: F401 - the fixture

pytestmark = pytest.mark.usefixtures("node")


async def _stdout(cmd: RemoteCommand) -> bytes:
    out = bytearray()
    while chunk := await cmd.read_stdout():
        out += chunk
    return bytes(out)


async def _running(node: Node, *command: str, **kw: object) -> str:  # noqa: F811
    pod = await node.pod()
    cid = await node.run(pod, "app", *command, **kw)
    await node.wait_state(cid, cri.ContainerState.CONTAINER_RUNNING)
    return cid


@pytest.mark.parametrize("transport", ["spdy", "websocket"])
async def test_exec_stdin_stdout_stderr_and_exit_code(node: Node, transport: str) -> None:  # noqa: F811
    cid = await _running(node, "sleep", "1000")
    resp = await node.rt.exec(
        cri.ExecRequest(
            container_id=cid,
            cmd=["sh", "-c", "cat; echo err >&2; exit 3"],
            stdin=True,
            stdout=True,
            stderr=True,
        )
    )
    assert resp.url.startswith("http://127.0.0.1:") and "/exec/" in resp.url
    result = await run_command(resp.url, b"abc\n", transport=transport)  # type: ignore[arg-type]
    assert (result.stdout, result.stderr, result.exit_code) == (b"abc\n", b"err\n", 3)
    # the token was single-use
    with pytest.raises(Exception, match=r"404|not found|NotFound"):
        await run_command(resp.url, b"", transport=transport)  # type: ignore[arg-type]


async def test_exec_with_a_tty_sees_the_resize(node: Node) -> None:  # noqa: F811
    cid = await _running(node, "sleep", "1000")
    resp = await node.rt.exec(
        cri.ExecRequest(container_id=cid, cmd=["sh"], tty=True, stdin=True, stdout=True)
    )
    cmd = await connect_command(resp.url, stdin=True, stdout=True, stderr=False, tty=True)
    reading = asyncio.create_task(_stdout(cmd))
    await cmd.resize(100, 33)
    await cmd.write_stdin(b"stty size; exit 5\n")
    status = await asyncio.wait_for(cmd.wait(), 20)
    out = await asyncio.wait_for(reading, 10)
    assert b"33 100" in out
    assert status.exit_code == 5


async def test_attach_gets_output_sends_stdin_and_ends_with_the_exit(node: Node) -> None:  # noqa: F811
    cid = await _running(node, "sh", "-c", "read x; echo got $x; exit 4", stdin=True, stdin_once=True)
    resp = await node.rt.attach(cri.AttachRequest(container_id=cid, stdin=True, stdout=True, stderr=True))
    cmd = await connect_command(resp.url, stdin=True, stdout=True, stderr=True)
    reading = asyncio.create_task(_stdout(cmd))
    await cmd.write_stdin(b"yo\n")
    await cmd.close_stdin()
    status = await asyncio.wait_for(cmd.wait(), 20)
    assert b"got yo" in await asyncio.wait_for(reading, 10)
    assert status.exit_code == 4
    st = await node.wait_state(cid, cri.ContainerState.CONTAINER_EXITED)
    assert st.exit_code == 4


async def test_port_forward_reaches_a_server_in_the_pod(node: Node) -> None:  # noqa: F811
    with socket.socket() as probe:  # a free loopback port for the pod (host network) to listen on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    pod = await node.pod()
    serve = f"mkdir -p /tmp/w && echo pong > /tmp/w/index.html && exec httpd -f -p 127.0.0.1:{port} -h /tmp/w"
    cid = await node.run(pod, "srv", "sh", "-c", serve)
    await node.wait_state(cid, cri.ContainerState.CONTAINER_RUNNING)
    resp = await node.rt.port_forward(cri.PortForwardRequest(pod_sandbox_id=pod[0], port=[port]))
    deadline = time.monotonic() + 20
    async with await connect_portforward(resp.url) as pf:
        while True:  # httpd may not listen yet: each attempt is a new stream pair on the same connection
            conn = await pf.open(port)
            await conn.write(b"GET /index.html HTTP/1.0\r\n\r\n")
            data = await conn.read_all()
            if data or time.monotonic() > deadline:
                break
        assert data.startswith(b"HTTP/1.") and data.endswith(b"\r\n\r\npong\n")


async def test_bad_requests_name_the_field(node: Node) -> None:  # noqa: F811
    cid = await _running(node, "sleep", "1000")
    err = await grpc_error(node.rt.exec(cri.ExecRequest(container_id=cid, cmd=[], stdout=True)))
    assert err.status == Status.INVALID_ARGUMENT and "cmd" in (err.message or "")
    err = await grpc_error(
        node.rt.exec(cri.ExecRequest(container_id=cid, cmd=["true"], tty=True, stdout=True, stderr=True))
    )
    assert err.status == Status.INVALID_ARGUMENT and "stderr" in (err.message or "")
    err = await grpc_error(node.rt.exec(cri.ExecRequest(container_id="nope", cmd=["true"], stdout=True)))
    assert err.status == Status.NOT_FOUND
    err = await grpc_error(node.rt.attach(cri.AttachRequest(container_id=cid)))
    assert err.status == Status.INVALID_ARGUMENT
