"""The metrics endpoint: addresses, TCP and unix-socket scrapes, socket-file safety."""

from __future__ import annotations

import socket
from pathlib import Path

import aiohttp
import pytest

from daemon.errors import FailedPrecondition, InvalidArgument
from daemon.metrics import CONTENT_TYPE, MetricsRegistry
from daemon.metricsserver import MetricsServer, parse_address
from tests.unit.test_metrics import parse_exposition


@pytest.mark.parametrize(
    ("address", "unix", "host", "port"),
    [
        ("127.0.0.1:9102", None, "127.0.0.1", 9102),
        ("[::1]:0", None, "::1", 0),
        ("localhost:0", None, "localhost", 0),
        (":9102", None, None, 9102),
        ("/run/x.sock", "/run/x.sock", None, 0),
        ("unix:///run/x.sock", "/run/x.sock", None, 0),
    ],
)
def test_parse_address(address: str, unix: str | None, host: str | None, port: int) -> None:
    a = parse_address(address)
    assert (str(a.unix) if a.unix else None, a.host, a.port) == (unix, host, port)


@pytest.mark.parametrize("address", ["", "localhost", "host:http", "host:70000", "::1:9102", "unix://"])
def test_parse_address_rejects(address: str) -> None:
    with pytest.raises(InvalidArgument, match="metrics address"):
        parse_address(address)


def _registry() -> MetricsRegistry:
    reg = MetricsRegistry()
    reg.counter("berth_scrape_test_total", "Test.", ["k"]).inc(k="v")
    return reg


async def test_scrape_over_tcp_port_zero() -> None:
    server = await MetricsServer.start(_registry(), "127.0.0.1:0")
    try:
        assert server.port and server.port > 0
        assert server.url == f"http://127.0.0.1:{server.port}/v1/metrics"
        async with aiohttp.ClientSession() as session, session.get(server.url) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"] == CONTENT_TYPE
            fams = parse_exposition(await resp.text())
        assert fams["berth_scrape_test_total"].value("berth_scrape_test_total", k="v") == 1
        async with (
            aiohttp.ClientSession() as session,
            session.get(server.url.replace("/v1/metrics", "/x")) as r,
        ):
            assert r.status == 404
    finally:
        await server.stop()
    await server.stop()  # idempotent
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", server.port), timeout=5).close()


async def test_scrape_over_ipv6_loopback() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        server = await MetricsServer.start(_registry(), "[::1]:0")
    except FailedPrecondition:
        pytest.skip("::1 not configured")
    try:
        assert server.url == f"http://[::1]:{server.port}/v1/metrics"
        async with aiohttp.ClientSession() as session, session.get(server.url) as resp:
            assert resp.status == 200
    finally:
        await server.stop()


async def _scrape_unix(path: Path) -> str:
    async with (
        aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(path))) as session,
        session.get("http://localhost/v1/metrics") as resp,
    ):
        assert resp.status == 200
        assert resp.headers["Content-Type"] == CONTENT_TYPE
        return await resp.text()


async def test_scrape_over_unix_socket(tmp_path: Path) -> None:
    path = tmp_path / "run" / "m.sock"  # parent created on demand
    server = await MetricsServer.start(_registry(), f"unix://{path}")
    try:
        assert server.path == path and server.url == f"unix://{path}" and server.port is None
        fams = parse_exposition(await _scrape_unix(path))
        assert fams["berth_scrape_test_total"].value("berth_scrape_test_total", k="v") == 1
    finally:
        await server.stop()
    assert not path.exists()


async def test_unix_socket_replaces_a_stale_socket_file(tmp_path: Path) -> None:
    path = tmp_path / "m.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))  # bound, never listening, then closed: the file stays
    stale.close()
    assert path.exists()
    server = await MetricsServer.start(_registry(), str(path))
    try:
        assert "berth_scrape_test_total" in await _scrape_unix(path)
    finally:
        await server.stop()


async def test_unix_socket_refuses_a_live_socket_or_another_file(tmp_path: Path) -> None:
    path = tmp_path / "m.sock"
    first = await MetricsServer.start(_registry(), str(path))
    try:
        with pytest.raises(FailedPrecondition, match="listening"):
            await MetricsServer.start(_registry(), str(path))
        assert "berth_scrape_test_total" in await _scrape_unix(path)  # the first one is untouched
    finally:
        await first.stop()
    regular = tmp_path / "file"
    regular.write_text("keep me")
    with pytest.raises(FailedPrecondition, match="not a socket"):
        await MetricsServer.start(_registry(), str(regular))
    assert regular.read_text() == "keep me"


async def test_tcp_address_in_use_is_reported() -> None:
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    try:
        with pytest.raises(FailedPrecondition, match="metrics address"):
            await MetricsServer.start(_registry(), f"127.0.0.1:{busy.getsockname()[1]}")
    finally:
        busy.close()
