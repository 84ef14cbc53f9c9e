"""``berth cri attach`` and ``berth cri port-forward`` as an operator types them, against a real berthd.

Containers come from test_cri_containers' node (host-network pods, busybox
in ``k8s.io``); the CLI runs as a subprocess on berthd's socket. The
port-forward process is stopped by PID (SIGINT, as Ctrl-C) even when a check fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from protos.runtime import v1 as cri
from tests.integration.test_cri_containers import Node, node  # noqa: F401 - the fixture

BIN = Path(sys.executable).parent


def _argv(n: Node, *args: str) -> list[str]:
    return [str(BIN / "berth"), "--address", n.d.address, "cri", *args]


async def _cli(n: Node, *args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return await asyncio.to_thread(
        subprocess.run, _argv(n, *args), input=stdin, capture_output=True, timeout=60, check=False
    )


async def _running(n: Node, *command: str, **kw: object) -> tuple[str, str]:
    pod = await n.pod()
    cid = await n.run(pod, "app", *command, **kw)
    await n.wait_state(cid, cri.ContainerState.CONTAINER_RUNNING)
    return pod[0], cid


async def test_attach_passes_stdin_prints_output_and_exits_with_the_container(node: Node) -> None:  # noqa: F811
    _, cid = await _running(
        node, "sh", "-c", "read x; echo got $x; echo oops >&2; exit 4", stdin=True, stdin_once=True
    )
    r = await _cli(node, "attach", "-i", cid[:13], stdin=b"yo\n")
    assert r.returncode == 4, r.stderr
    assert b"got yo" in r.stdout and b"oops" in r.stderr
    st = await node.wait_state(cid, cri.ContainerState.CONTAINER_EXITED)
    assert st.exit_code == 4


async def test_attach_refusals_are_one_line(node: Node) -> None:  # noqa: F811
    r = await _cli(node, "attach", "nosuchcontainer")
    assert r.returncode == 1
    lines = r.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("berth: ") and "not found" in lines[0], r.stderr


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _get(port: int, deadline: float) -> bytes:
    """GET / through the forwarded port, retried until httpd in the pod answers."""
    while True:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"GET /index.html HTTP/1.0\r\n\r\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        if data or time.monotonic() > deadline:
            return data


async def test_port_forward_listens_on_loopback_and_carries_concurrent_connections(node: Node) -> None:  # noqa: F811
    remote = _free_port()
    serve = (
        f"mkdir -p /tmp/w && echo pong > /tmp/w/index.html && exec httpd -f -p 127.0.0.1:{remote} -h /tmp/w"
    )
    pod_id, _ = await _running(node, "sh", "-c", serve)
    proc = subprocess.Popen(
        _argv(node, "port-forward", pod_id, f"0:{remote}"), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 30)).decode()
        m = re.fullmatch(rf"Forwarding from 127\.0\.0\.1:(\d+) -> {remote}\n", line)
        assert m, line
        local = int(m.group(1))
        deadline = time.monotonic() + 20
        first = await asyncio.to_thread(_get, local, deadline)
        assert first.startswith(b"HTTP/1.") and first.endswith(b"\r\n\r\npong\n"), first
        replies = await asyncio.gather(*(asyncio.to_thread(_get, local, deadline) for _ in range(4)))
        assert all(r.endswith(b"\r\n\r\npong\n") for r in replies), replies
        # loopback only: the listener is bound to 127.0.0.1, not to every address
        tcp = Path("/proc/net/tcp").read_text()
        assert f"0100007F:{local:04X} 00000000:0000 0A" in tcp
        assert f"00000000:{local:04X} 00000000:0000 0A" not in tcp
        assert proc.poll() is None
        proc.send_signal(signal.SIGINT)
        rc = await asyncio.to_thread(proc.wait, 20)
        assert proc.stderr is not None
        assert rc == 130, proc.stderr.read()
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait()


async def test_port_forward_bad_port_spec_is_refused(node: Node) -> None:  # noqa: F811
    r = await _cli(node, "port-forward", "somepod", "80:http")
    assert r.returncode == 1
    assert (
        r.stderr.decode().strip()
        == "berth: port-forward: '80:http': expected [LOCAL:]REMOTE, ports as numbers"
    )
    r = await _cli(node, "port-forward", "somepod", "70000")
    assert r.returncode == 1 and "remote port 70000" in r.stderr.decode()
