"""berthd as a process: start, signals, locks, sockets, restart after kill -9."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import time
from collections.abc import Callable
from pathlib import Path

from tests.integration.conftest import Berthd, CliEvents, wait_for


async def test_sigterm_stops_cleanly_and_removes_socket(berthd: Berthd) -> None:
    assert stat.S_IMODE(os.stat(berthd.address).st_mode) == 0o660
    started = time.monotonic()
    berthd.signal(signal.SIGTERM)
    assert berthd.wait_exit(timeout=10) == 0
    assert time.monotonic() - started < 10
    assert not os.path.exists(berthd.address)
    assert "daemon.stopped" in berthd.log()


async def test_sigint_stops_while_a_subscriber_is_streaming(berthd: Berthd) -> None:
    # An open Events.Subscribe stream must not hold shutdown hostage.
    watcher = CliEvents(berthd, 'topic=="/namespaces/create"')
    try:
        async with berthd.client() as c:
            n = 0

            async def create() -> None:
                nonlocal n
                n += 1
                await c.create_namespace(f"before-stop-{n}", {})

            line = await watcher.first_line(create)
        assert "/namespaces/create" in line
        started = time.monotonic()
        berthd.signal(signal.SIGINT)
        assert berthd.wait_exit(timeout=10) == 0
        assert time.monotonic() - started < 10
        # The client sees its stream end: it does not hang on a stopped daemon.
        watcher.proc.wait(timeout=10)
    finally:
        watcher.close()


async def test_sighup_is_logged_and_daemon_keeps_running(berthd: Berthd) -> None:
    berthd.signal(signal.SIGHUP)
    wait_for(lambda: "daemon.sighup" in berthd.log(), what="sighup log line")
    async with berthd.client() as c:
        assert (await c.version()).version
    assert berthd.proc is not None and berthd.proc.poll() is None


async def test_second_daemon_on_same_root_refuses(berthd: Berthd, make_berthd: Callable[..., Berthd]) -> None:
    other = make_berthd(name="other")
    other.root = berthd.root  # same root, different socket
    other.start()
    assert other.wait_exit(timeout=30) == 1
    log = other.log()
    assert "another berthd" in log and f"pid {berthd.pid}" in log
    # The first daemon is untouched and still serving.
    async with berthd.client() as c:
        await c.version()
    assert os.path.exists(berthd.address)


async def test_socket_in_use_by_another_process_refuses(
    berthd: Berthd, make_berthd: Callable[..., Berthd]
) -> None:
    other = make_berthd(name="other")
    other.address = berthd.address  # different root, same socket
    other.start()
    assert other.wait_exit(timeout=30) == 1
    assert "already in use" in other.log()
    async with berthd.client() as c:
        await c.version()


async def test_stale_socket_is_replaced(make_berthd: Callable[..., Berthd]) -> None:
    d = make_berthd()
    d.state.mkdir(parents=True)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(d.address)
    stale.close()  # the file stays, nobody listens: a killed daemon's leftover
    assert os.path.exists(d.address)
    d.start()
    await d.wait_ready()
    assert "grpc.stale_socket_removed" in d.log()


async def test_non_socket_file_at_address_is_not_clobbered(make_berthd: Callable[..., Berthd]) -> None:
    d = make_berthd()
    d.state.mkdir(parents=True)
    Path(d.address).write_text("precious")
    d.start()
    assert d.wait_exit(timeout=30) == 1
    assert "exists and is not a socket" in d.log()
    assert Path(d.address).read_text() == "precious"


async def test_unwritable_root_is_a_clear_error(make_berthd: Callable[..., Berthd], short_tmp: Path) -> None:
    blocker = short_tmp / "a-file"
    blocker.write_text("")
    d = make_berthd()
    d.root = blocker / "root"
    d.start()
    assert d.wait_exit(timeout=30) == 1
    assert f"root {blocker / 'root'}: not a writable directory" in d.log()
    assert not os.path.exists(d.address)


async def test_socket_dir_under_a_file_is_one_line_not_a_traceback(
    make_berthd: Callable[..., Berthd], short_tmp: Path
) -> None:
    blocker = short_tmp / "a-file"
    blocker.write_text("")
    d = make_berthd()
    d.address = str(blocker / "berth.sock")
    d.start()
    assert d.wait_exit(timeout=30) == 1
    assert f"berthd: {blocker}: " in d.log()
    assert "Traceback" not in d.log()


async def test_kill_9_then_restart_keeps_data(berthd: Berthd) -> None:
    async with berthd.client() as c:
        await c.create_namespace("survivor", {"keep": "me"})
    berthd.signal(signal.SIGKILL)
    berthd.wait_exit(timeout=10)
    assert os.path.exists(berthd.address)  # stale socket left behind by the kill
    berthd.start()
    await berthd.wait_ready()
    async with berthd.client() as c:
        names = {n.name: dict(n.labels) for n in await c.list_namespaces()}
    assert names["survivor"] == {"keep": "me"}


async def test_json_logs_carry_plugin_and_grpc_calls_at_debug(make_berthd: Callable[..., Berthd]) -> None:
    d = make_berthd().start("--log-level", "debug", "--log-format", "json")
    await d.wait_ready()
    async with d.client() as c:
        await c.version()
        await c.list_namespaces()
    d.stop()
    lines = [json.loads(line) for line in d.log().splitlines() if line.startswith("{")]
    assert lines, d.log()
    assert all("plugin" in line for line in lines), [x for x in lines if "plugin" not in x][:3]
    calls = [x for x in lines if x["event"] == "grpc.call"]
    methods = {x["method"] for x in calls}
    assert "/containerd.services.version.v1.Version/Version" in methods
    ns_call = next(x for x in calls if x["method"].endswith("Namespaces/List"))
    assert ns_call["code"] == "OK" and ns_call["plugin"] == "berth.grpc.v1.namespaces"
    assert isinstance(ns_call["ms"], float)
    loaded = {x["plugin"] for x in lines if x["event"] == "plugin.loaded"}
    assert "berth.metadata.v1.sqlite" in loaded
    # Lines of library modules are attributed to the plugin whose work they do.
    opened = next(x for x in lines if x["event"] == "metadata.open")
    assert opened["plugin"] == "berth.metadata.v1.sqlite"
