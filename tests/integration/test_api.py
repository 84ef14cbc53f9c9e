"""The native API over the socket: version, namespaces, introspection, events, leases."""

from __future__ import annotations

import asyncio
import json
import subprocess
from datetime import UTC, datetime
from typing import Any

import betterproto.lib.google.protobuf as pb
import pytest
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from daemon import __version__
from protos.containerd.events import NamespaceCreate
from protos.containerd.services.events.v1 import EventsStub, ForwardRequest
from protos.containerd.services.introspection.v1 import IntrospectionStub, PluginInfoRequest
from protos.containerd.services.leases.v1 import (
    AddResourceRequest,
    CreateRequest,
    LeasesStub,
    ListRequest,
    ListResourcesRequest,
    Resource,
)
from protos.containerd.services.namespaces.v1 import GetNamespaceRequest, NamespacesStub
from protos.containerd.types import Envelope as PbEnvelope
from tests.integration.conftest import BIN, Berthd, CliEvents

BUILTINS = {
    "berth.metadata.v1.sqlite",
    "berth.events.v1.exchange",
    "berth.grpc.v1.version",
    "berth.grpc.v1.namespaces",
    "berth.grpc.v1.introspection",
    "berth.grpc.v1.events",
    "berth.grpc.v1.leases",
    "berth.content.v1.local",
    "berth.snapshotter.v1.overlayfs",
    "berth.snapshotter.v1.native",
    "berth.diff.v1.tar",
    "berth.grpc.v1.content",
    "berth.grpc.v1.containers",
    "berth.grpc.v1.snapshots",
    "berth.grpc.v1.images",
    "berth.grpc.v1.diff",
}


async def test_version_and_server_info(berthd: Berthd) -> None:
    async with berthd.client() as c:
        v = await c.version()
        info = await c.server_info()
    assert v.version == __version__
    assert info.pid == berthd.pid
    assert len(info.uuid) == 36
    out = berthd.berth("--format", "json", "version", check=True)
    data = json.loads(out.stdout)
    assert data["server"]["version"] == __version__ and data["server"]["uuid"] == info.uuid


async def test_server_uuid_survives_restart(berthd: Berthd) -> None:
    async with berthd.client() as c:
        before = (await c.server_info()).uuid
    berthd.stop()
    berthd.start()
    await berthd.wait_ready()
    async with berthd.client() as c:
        assert (await c.server_info()).uuid == before


async def test_plugins_listed_with_status(berthd: Berthd) -> None:
    async with berthd.client() as c:
        plugins = await c.plugins()
        only_grpc = await c.plugins(["type==berth.grpc.v1"])
    names = {f"{p.type}.{p.id}" for p in plugins}
    assert names >= BUILTINS
    assert all(not (p.init_err and p.init_err.message) for p in plugins)
    assert {p.type for p in only_grpc} == {"berth.grpc.v1"}
    table = berthd.berth("plugins", "ls", check=True).stdout.splitlines()
    assert table[0].split()[:3] == ["TYPE", "ID", "STATUS"]
    row = next(line.split() for line in table if line.startswith("berth.metadata.v1"))
    assert row == ["berth.metadata.v1", "sqlite", "ok"]
    rows = json.loads(berthd.berth("--format", "json", "plugins", "ls", check=True).stdout)
    meta = next(r for r in rows if r["id"] == "sqlite")
    assert meta["status"] == "ok" and meta["exports"]["path"].endswith("meta.db")


async def test_plugin_filter_syntax_error_is_invalid_argument(berthd: Berthd) -> None:
    async with berthd.client() as c:
        with pytest.raises(GRPCError) as err:
            await c.plugins(["type=="])
    assert err.value.status == Status.INVALID_ARGUMENT
    async with berthd.client() as c:
        stub = IntrospectionStub(berthd.channel())
        with pytest.raises(GRPCError) as err2:
            await stub.plugin_info(PluginInfoRequest(type="berth.nope.v1", id="x"))
        stub.channel.close()
    assert err2.value.status == Status.NOT_FOUND


async def test_namespaces_crud_through_cli(berthd: Berthd) -> None:
    assert berthd.berth("namespaces", "create", "team-a", "owner=ops", "tier=1").returncode == 0
    listed = berthd.berth("namespaces", "ls", check=True).stdout.splitlines()
    assert listed[0].split() == ["NAME", "LABELS"]
    assert any(line.split() == ["team-a", "owner=ops,tier=1"] for line in listed)
    assert berthd.berth("namespaces", "label", "team-a", "tier=", "zone=b").returncode == 0
    data = json.loads(berthd.berth("--format", "json", "namespaces", "ls", check=True).stdout)
    assert {"name": "team-a", "labels": {"owner": "ops", "zone": "b"}} in data
    assert berthd.berth("namespaces", "rm", "team-a", check=True).stdout.strip() == "team-a"
    assert "team-a" not in berthd.berth("namespaces", "ls", "-q", check=True).stdout.split()


async def test_namespace_errors_have_codes_and_name_the_field(berthd: Berthd) -> None:
    dup = berthd.berth("namespaces", "create", "dup")
    assert dup.returncode == 0
    again = berthd.berth("namespaces", "create", "dup")
    assert again.returncode == 1 and "already exists" in again.stderr and "dup" in again.stderr
    bad = berthd.berth("namespaces", "create", "Bad Name")
    assert bad.returncode == 1 and "invalid argument" in bad.stderr and "Bad Name" in bad.stderr
    missing = berthd.berth("namespaces", "rm", "ghost")
    assert missing.returncode == 1 and "not found" in missing.stderr and "ghost" in missing.stderr
    stub = NamespacesStub(berthd.channel())
    try:
        with pytest.raises(GRPCError) as err:
            await stub.get(GetNamespaceRequest(name=""))
        assert err.value.status == Status.INVALID_ARGUMENT and "name" in (err.value.message or "")
        with pytest.raises(GRPCError) as err:
            await stub.get(GetNamespaceRequest(name="ghost"))
        assert err.value.status == Status.NOT_FOUND
    finally:
        stub.channel.close()


async def test_namespace_with_objects_cannot_be_deleted(berthd: Berthd) -> None:
    channel = berthd.channel()
    leases = LeasesStub(channel, metadata={"containerd-namespace": "busy"})
    try:
        await leases.create(CreateRequest(id="pull-1", labels={"why": "test"}))
        await leases.add_resource(
            AddResourceRequest(id="pull-1", resource=Resource(id="sha256:" + "ab" * 32, type="content"))
        )
        got = await leases.list_resources(ListResourcesRequest(id="pull-1"))
        assert [(r.id, r.type) for r in got.resources] == [("sha256:" + "ab" * 32, "content")]
        listed = await leases.list(ListRequest(filters=["labels.why==test"]))
        assert [x.id for x in listed.leases] == ["pull-1"]
        rm = berthd.berth("namespaces", "rm", "busy")
        assert rm.returncode == 1
        assert "failed precondition" in rm.stderr and "must be empty" in rm.stderr and "leases" in rm.stderr
        assert "busy" in berthd.berth("namespaces", "ls", "-q", check=True).stdout.split()
        with pytest.raises(GRPCError) as err:
            await leases.create(CreateRequest(id="pull-1"))
        assert err.value.status == Status.ALREADY_EXISTS
        no_ns = LeasesStub(channel)
        with pytest.raises(GRPCError) as err:
            await no_ns.create(CreateRequest(id="x"))
        assert err.value.status == Status.FAILED_PRECONDITION and "namespace" in (err.value.message or "")
    finally:
        channel.close()


async def _collect(it: Any, into: list[Any], until_topic: str) -> None:
    async for env in it:
        into.append(env)
        if env.topic == until_topic:
            return


async def test_events_subscribe_filters_and_publish(berthd: Berthd) -> None:
    got: list[Any] = []
    async with berthd.client(timeout=None) as sub_client, berthd.client(namespace="ops") as c:
        stream = sub_client.subscribe(['topic~="^/namespaces/"'])
        task = asyncio.create_task(_collect(stream, got, "/namespaces/delete"))
        # The subscription is live once a probe event comes through.
        for i in range(200):
            await c.create_namespace(f"probe-{i}", {})
            await asyncio.sleep(0.02)
            if got:
                break
        assert got, "subscription never delivered"
        custom = pb.Any(type_url="example.com/Ping", value=b"\x08\x01")
        await c.publish("/custom/ping", custom)  # filtered out by the subscription
        await c.delete_namespace(got[0].namespace)
        await asyncio.wait_for(task, 10)
    first, last = got[0], got[-1]
    assert first.topic == "/namespaces/create"
    assert first.event.type_url == "containerd.events.NamespaceCreate"
    assert NamespaceCreate().parse(first.event.value).name == first.namespace
    assert last.topic == "/namespaces/delete" and last.namespace == first.namespace
    assert all(env.topic.startswith("/namespaces/") for env in got)


async def test_events_forward_keeps_namespace_and_timestamp(berthd: Berthd) -> None:
    when = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    got: list[Any] = []
    probe = pb.Any(type_url="x/y", value=b"")
    async with berthd.client(timeout=None) as sub_client:
        task = asyncio.create_task(_collect(sub_client.subscribe(["namespace==fwd"]), got, "/fwd/done"))
        stub = EventsStub(berthd.channel())
        try:
            for _ in range(200):  # until the subscription is live
                env = PbEnvelope(timestamp=when, namespace="fwd", topic="/fwd/probe", event=probe)
                await stub.forward(ForwardRequest(envelope=env))
                await asyncio.sleep(0.02)
                if got:
                    break
            env.topic = "/fwd/done"
            await stub.forward(ForwardRequest(envelope=env))
            await asyncio.wait_for(task, 10)
            with pytest.raises(GRPCError) as err:
                await stub.forward(ForwardRequest())
            assert err.value.status == Status.INVALID_ARGUMENT and "envelope" in (err.value.message or "")
        finally:
            stub.channel.close()
    assert got[0].namespace == "fwd" and got[0].timestamp == when and got[0].event.type_url == "x/y"
    assert got[-1].topic == "/fwd/done"


async def test_events_publish_validation(berthd: Berthd) -> None:
    async with berthd.client(namespace="ops") as c:
        with pytest.raises(GRPCError) as err:
            await c.publish("no-slash", pb.Any(type_url="x/y", value=b""))
        assert err.value.status == Status.INVALID_ARGUMENT and "topic" in (err.value.message or "")
        with pytest.raises(GRPCError) as err:
            await c.publish("/ok/topic", pb.Any())
        assert err.value.status == Status.INVALID_ARGUMENT and "event" in (err.value.message or "")
    async with berthd.client(timeout=5) as c:
        with pytest.raises(GRPCError) as err:
            async for _ in c.subscribe(["topic=="]):
                pass
        assert err.value.status == Status.INVALID_ARGUMENT


async def test_berth_events_cli_prints_one_line_per_event(berthd: Berthd) -> None:
    watcher = CliEvents(berthd, "namespace==watched")
    try:
        async with berthd.client() as c:

            async def churn() -> None:
                await c.create_namespace("watched", {"a": "b"})
                await c.delete_namespace("watched")

            line = await watcher.first_line(churn)
        parts = line.split(" ", 3)
        assert parts[1] == "watched" and parts[2] in ("/namespaces/create", "/namespaces/delete")
        payload = json.loads(parts[3])
        assert payload["name"] == "watched"
        assert payload["type"].startswith("containerd.events.Namespace")
    finally:
        watcher.close()


def test_cli_when_daemon_is_not_running(short_tmp: Any) -> None:
    sock = str(short_tmp / "nothing.sock")
    out = subprocess.run([str(BIN / "berth"), "--address", sock, "version"], capture_output=True, text=True)
    assert out.returncode == 3
    assert (
        out.stderr.strip() == f"berth: cannot connect to berthd at {sock}: no such file; is berthd running?"
    )
