"""CRI ``runtime.v1.RuntimeService`` node calls end to end: Version, Status, (Update)RuntimeConfig.

A real berthd serves them on its main socket beside the native API; its CRI
table points ``conf_dir`` into a temporary directory, so the test decides
when a CNI network configuration appears (and NetworkReady flips).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import betterproto.lib.google.protobuf as pb
import pytest
from grpclib.client import Channel
from grpclib.const import Status

from daemon import __version__
from protos.containerd.services.version.v1 import VersionStub
from protos.runtime import v1 as cri
from tests.integration.conftest import Berthd, grpc_error

CONFLIST = {
    "cniVersion": "1.0.0",
    "name": "berth-test",
    "plugins": [
        {"type": "bridge", "bridge": "berth-t0", "ipam": {"type": "host-local", "subnet": "10.99.0.0/24"}}
    ],
}


def config(tmp: Path, cgroup_driver: str = "cgroupfs") -> str:
    return f"""version = 1
[plugins."berth.cri.v1.cri"]
conf_dir = "{tmp}/net.d"
bin_dirs = ["/usr/lib/cni"]
cgroup_driver = "{cgroup_driver}"
"""


async def start(make_berthd: Callable[..., Berthd], tmp: Path, **kw: str) -> Berthd:
    d = make_berthd(config=config(tmp, **kw))
    d.start()
    await d.wait_ready()
    return d


@pytest.fixture
async def node(make_berthd: Callable[..., Berthd], short_tmp: Path) -> AsyncIterator[Channel]:
    """A channel to a berthd whose CRI conf_dir is ``short_tmp/net.d`` (absent at first)."""
    d = await start(make_berthd, short_tmp)
    ch = d.channel()
    try:
        yield ch
    finally:
        ch.close()


@pytest.fixture
def runtime(node: Channel) -> cri.RuntimeServiceStub:
    return cri.RuntimeServiceStub(node, timeout=10)


def condition(resp: cri.StatusResponse, kind: str) -> cri.RuntimeCondition:
    found = [c for c in resp.status.conditions if c.type == kind]
    assert len(found) == 1, resp.status.conditions
    return found[0]


async def test_version_beside_the_native_api(runtime: cri.RuntimeServiceStub, node: Channel) -> None:
    v = await runtime.version(cri.VersionRequest(version="v1"))
    assert (v.version, v.runtime_name, v.runtime_version, v.runtime_api_version) == (
        "0.1.0",
        "berth",
        __version__,
        "v1",
    )
    native = await VersionStub(node).version(pb.Empty())
    assert native.version == __version__


async def test_status_network_ready_follows_conf_dir(
    runtime: cri.RuntimeServiceStub, short_tmp: Path
) -> None:
    resp = await runtime.status(cri.StatusRequest())
    assert condition(resp, "RuntimeReady").status is True
    net = condition(resp, "NetworkReady")
    assert net.status is False
    assert net.reason == "NetworkPluginNotReady"
    assert str(short_tmp / "net.d") in net.message
    assert resp.info == {}

    verbose = await runtime.status(cri.StatusRequest(verbose=True))
    cfg = json.loads(verbose.info["config"])
    assert cfg["conf_dir"] == str(short_tmp / "net.d")
    assert cfg["bin_dirs"] == ["/usr/lib/cni"]
    assert verbose.info["lastCNILoadStatus"] == net.message.removeprefix("Network plugin returns error: ")

    conf_dir = short_tmp / "net.d"
    conf_dir.mkdir(parents=True, exist_ok=True)
    (conf_dir / "10-berth.conflist").write_text(json.dumps(CONFLIST))
    deadline = time.monotonic() + 10
    while True:  # read on every call: no restart needed
        resp = await runtime.status(cri.StatusRequest(verbose=True))
        if condition(resp, "NetworkReady").status:
            break
        assert time.monotonic() < deadline, resp
        await asyncio.sleep(0.05)
    net = condition(resp, "NetworkReady")
    assert (net.reason, net.message) == ("", "")
    assert resp.info["cniNetwork"] == "berth-test"
    assert resp.info["lastCNILoadStatus"] == "OK"


async def test_runtime_config_and_pod_cidr(runtime: cri.RuntimeServiceStub) -> None:
    rc = await runtime.runtime_config(cri.RuntimeConfigRequest())
    assert rc.linux.cgroup_driver == cri.CgroupDriver.CGROUPFS

    async def pod_cidrs() -> list[str]:
        info = (await runtime.status(cri.StatusRequest(verbose=True))).info
        return list(json.loads(info["config"])["podCIDRs"])

    def update(cidr: str) -> cri.UpdateRuntimeConfigRequest:
        return cri.UpdateRuntimeConfigRequest(
            runtime_config=cri.RuntimeConfig(network_config=cri.NetworkConfig(pod_cidr=cidr))
        )

    await runtime.update_runtime_config(cri.UpdateRuntimeConfigRequest())  # empty is fine
    assert await pod_cidrs() == []
    await runtime.update_runtime_config(update("10.88.0.0/16,fd00:88::/64"))
    assert await pod_cidrs() == ["10.88.0.0/16", "fd00:88::/64"]
    await runtime.update_runtime_config(update(""))  # keeps the last value, as containerd
    assert await pod_cidrs() == ["10.88.0.0/16", "fd00:88::/64"]
    err = await grpc_error(runtime.update_runtime_config(update("10.88.0.0/99")))
    assert err.status is Status.INVALID_ARGUMENT
    assert "runtime_config.network_config.pod_cidr" in (err.message or "")
    assert await pod_cidrs() == ["10.88.0.0/16", "fd00:88::/64"]


async def test_systemd_cgroup_driver_and_unimplemented_rpcs(
    make_berthd: Callable[..., Berthd], short_tmp: Path
) -> None:
    d = await start(make_berthd, short_tmp, cgroup_driver="systemd")
    ch = d.channel()
    try:
        stub = cri.RuntimeServiceStub(ch, timeout=10)
        rc = await stub.runtime_config(cri.RuntimeConfigRequest())
        assert rc.linux.cgroup_driver == cri.CgroupDriver.SYSTEMD
        # checkpointing is not offered: UNIMPLEMENTED with a message, not a crash
        err = await grpc_error(stub.checkpoint_container(cri.CheckpointContainerRequest(container_id="x")))
        assert err.status is Status.UNIMPLEMENTED
    finally:
        ch.close()


async def test_bad_cri_config_names_the_key(make_berthd: Callable[..., Berthd], short_tmp: Path) -> None:
    d = make_berthd(config='version = 1\n[plugins."berth.cri.v1.cri"]\nconf_dir = "relative/net.d"\n')
    d.start()
    assert d.wait_exit(timeout=30) != 0
    assert "conf_dir" in d.log() and "absolute" in d.log()
