"""Prometheus metrics over aiohttp, and Debian's ``ctr`` as a real containerd client."""

from __future__ import annotations

import re
from collections.abc import Callable

import aiohttp
import pytest
from grpclib.exceptions import GRPCError

from tests.integration.conftest import Berthd, ctr


def _value(text: str, name: str, **labels: str) -> float:
    """The value of one sample line in Prometheus text format."""
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no sample {name} {labels} in:\n{text}")


async def test_metrics_endpoint_on_unix_socket(make_berthd: Callable[..., Berthd]) -> None:
    d = make_berthd(name="m")
    metrics_sock = d.base / "metrics.sock"
    d.config_path = d.base / "config.toml"
    d.config_path.write_text(f'version = 1\n[metrics]\naddress = "{metrics_sock}"\n')
    d.start()
    await d.wait_ready()
    async with d.client() as c:
        await c.version()
        await c.version()
        await c.create_namespace("m1", {})
        with pytest.raises(GRPCError):
            await c.create_namespace("m1", {})  # counted as ALREADY_EXISTS
    async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(metrics_sock))) as s:
        resp = await s.get("http://berthd/v1/metrics")
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = await resp.text()
    version = "/containerd.services.version.v1.Version/Version"
    create = "/containerd.services.namespaces.v1.Namespaces/Create"
    assert _value(text, "berth_grpc_requests_total", method=version, code="OK") >= 2
    assert _value(text, "berth_grpc_requests_total", method=create, code="ALREADY_EXISTS") == 1
    assert _value(text, "berth_grpc_request_duration_seconds_count", method=version) >= 2
    assert _value(text, "berth_plugin_status", plugin="berth.metadata.v1.sqlite", status="ok") == 1
    assert _value(text, "berth_events_published_total") >= 1
    assert _value(text, "process_resident_memory_bytes") > 1_000_000
    assert re.search(r"^# TYPE berth_grpc_request_duration_seconds histogram$", text, re.M)


async def test_metrics_off_by_default(berthd: Berthd) -> None:
    assert not any(p.name.startswith("metrics") for p in berthd.base.rglob("*"))
    assert "metrics.serving" not in berthd.log()


async def test_ctr_version_namespaces_plugins(berthd: Berthd) -> None:
    v = ctr(berthd, "version")
    assert v.returncode == 0, v.stderr
    server = v.stdout.split("Server:", 1)[1]
    assert "Version:" in server and "0.1.0" in server
    created = ctr(berthd, "namespaces", "create", "from-ctr", "made=by-ctr")
    assert created.returncode == 0, created.stderr
    assert any(
        line.split() == ["from-ctr", "made=by-ctr"]
        for line in ctr(berthd, "namespaces", "ls").stdout.splitlines()
    )
    labelled = ctr(berthd, "namespaces", "label", "from-ctr", "made=")
    assert labelled.returncode == 0, labelled.stderr
    assert "from-ctr" in berthd.berth("namespaces", "ls", check=True).stdout
    plugins = ctr(berthd, "plugins", "ls")
    assert plugins.returncode == 0, plugins.stderr
    row = next(line.split() for line in plugins.stdout.splitlines() if "sqlite" in line)
    assert row[0] == "berth.metadata.v1" and row[1] == "sqlite" and row[-1] == "ok"
    removed = ctr(berthd, "namespaces", "rm", "from-ctr")
    assert removed.returncode == 0, removed.stderr


async def test_ctr_leases_and_nonempty_namespace(berthd: Berthd) -> None:
    made = ctr(berthd, "leases", "create", "--id", "hold-1", ns="ctrns")
    assert made.returncode == 0, made.stderr
    listed = ctr(berthd, "leases", "ls", ns="ctrns")
    assert "hold-1" in listed.stdout
    rm = ctr(berthd, "namespaces", "rm", "ctrns")
    assert rm.returncode != 0
    assert "must be empty" in rm.stderr + rm.stdout
    assert ctr(berthd, "leases", "rm", "hold-1", ns="ctrns").returncode == 0
    assert ctr(berthd, "namespaces", "rm", "ctrns").returncode == 0


async def test_ctr_sees_skipped_plugins_as_skip(make_berthd: Callable[..., Berthd]) -> None:
    d = make_berthd(config='version = 1\ndisabled_plugins = ["berth.grpc.v1.leases"]\n')
    d.start()
    await d.wait_ready()
    plugins = ctr(d, "plugins", "ls").stdout.splitlines()
    row = next(line.split() for line in plugins if " leases " in f" {line} ")
    assert row[-1] == "skip"
