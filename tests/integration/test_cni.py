"""CNI with Debian's real plugins (bridge, host-local, loopback, portmap) on pinned namespaces.

Each test gets its own conf dir, a bridge with a unique name, a /24 of
10.244.0.0/16 and host-local's store in tmp_path. The bridge is no gateway
and nothing masquerades or routes: pods reach only each other. Teardown DELs
what was added, unpins the namespaces and deletes the bridge even when the
test failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from daemon.cli import podnet
from daemon.errors import AlreadyExists, DeadlineExceeded, FailedPrecondition, InvalidArgument
from plugins.cri import netns
from plugins.cri.cni.invoke import CniPluginError, run_plugin
from plugins.cri.cni.network import CniNetwork, PodRef

CNI_BIN = Path("/usr/lib/cni")

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not (CNI_BIN / "bridge").exists() or shutil.which("unshare") is None,
    reason="needs root, util-linux unshare and Debian's containernetworking-plugins",
)


def ping_argv(netns_path: Path, ip: str) -> list[str]:
    ping = shutil.which("ping")
    tool = [ping] if ping else ["busybox", "ping"]
    return ["nsenter", f"--net={netns_path}", *tool, "-c1", "-W2", ip]


def ip_in_ns(netns_path: Path, *args: str) -> str:
    out = subprocess.run(
        ["nsenter", f"--net={netns_path}", "ip", *args], check=True, capture_output=True, text=True
    )
    return out.stdout


class Lab:
    """One test's network: conf dir, bin dirs, cache, bridge; tracks what to clean up."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.conf_dir = base / "net.d"
        self.conf_dir.mkdir()
        self.cache_dir = base / "cni-cache"
        self.ipam_dir = base / "ipam"
        self.fake_bin = base / "bin"
        self.fake_bin.mkdir()
        self.bridge = "bt" + secrets.token_hex(4)
        self.third = secrets.randbelow(254) + 1
        self.subnet = f"10.244.{self.third}.0/24"
        self.sandboxes: dict[str, Path] = {}
        self.network = self.make_network()

    def make_network(self) -> CniNetwork:
        return CniNetwork(self.conf_dir, self.cache_dir, bin_dirs=[self.fake_bin, CNI_BIN], timeout=20)

    def bridge_plugin(self) -> dict[str, Any]:
        return podnet.bridge_plugin(self.bridge, self.subnet, self.ipam_dir)

    def write_conflist(self, *extra: dict[str, Any], file: str = "10-test.conflist") -> Path:
        doc = {"cniVersion": "1.0.0", "name": "berth-test", "plugins": [self.bridge_plugin(), *extra]}
        path = self.conf_dir / file
        path.write_text(json.dumps(doc))
        return path

    def fake_plugin(self, name: str, script: str) -> None:
        path = self.fake_bin / name
        path.write_text("#!/bin/sh\n" + script)
        path.chmod(0o755)

    async def sandbox(self, sandbox_id: str | None = None) -> tuple[str, Path]:
        sid = sandbox_id or secrets.token_hex(16)
        paths = await netns.create(self.base / "sandboxes" / sid, hostname="pod-" + sid[:8])
        self.sandboxes[sid] = paths["net"]
        return sid, paths["net"]

    def allocated(self) -> list[str]:
        """The IPs host-local holds in this network's store."""
        store = self.ipam_dir / "berth-test"
        if not store.exists():
            return []
        return sorted(p.name for p in store.iterdir() if p.name.startswith("10.244."))

    def bridge_exists(self) -> bool:
        return subprocess.run(["ip", "link", "show", self.bridge], capture_output=True).returncode == 0

    def veths(self) -> list[str]:
        out = subprocess.run(
            ["ip", "-o", "link", "show", "master", self.bridge], capture_output=True, text=True
        )
        return [line for line in out.stdout.splitlines() if line.strip()]

    async def cleanup(self) -> None:
        for sid, path in self.sandboxes.items():
            with contextlib.suppress(Exception):
                await self.network.delete(sid, path)
            with contextlib.suppress(Exception):
                await netns.remove_all(path.parent)
        if self.bridge_exists():
            subprocess.run(["ip", "link", "del", self.bridge], check=False, capture_output=True)


@pytest.fixture
async def lab(tmp_path: Path) -> AsyncIterator[Lab]:
    lab = Lab(tmp_path)
    try:
        yield lab
    finally:
        await lab.cleanup()


async def test_two_pods_get_ips_and_ping_each_other(lab: Lab) -> None:
    lab.write_conflist()
    assert (await lab.network.status()).ready
    (a, a_ns), (b, b_ns) = await lab.sandbox(), await lab.sandbox()
    pod = PodRef("default", "web", "uid-1")
    ra = await lab.network.add(a, a_ns, pod=pod)
    # CHECK before the second veth joins: Debian's bridge plugin compares the bridge's MAC,
    # which Linux changes to the lowest port MAC as ports come and go (a plugin bug).
    await lab.network.check(a, a_ns)
    rb = await lab.network.add(b, b_ns, pod=PodRef("default", "client", "uid-2"))

    assert ra.pod_ip and rb.pod_ip and ra.pod_ip != rb.pod_ip
    for r, ns in ((ra, a_ns), (rb, b_ns)):
        assert r.pod_ip is not None and r.pod_ip.startswith(f"10.244.{lab.third}.")
        assert [i.sandbox for i in r.interfaces if i.name == "eth0"] == [str(ns)]
        assert r.pod_ip in ip_in_ns(ns, "-4", "addr", "show", "eth0")
        assert "state UP" in ip_in_ns(ns, "link", "show", "eth0")
        assert "LOOPBACK,UP" in ip_in_ns(ns, "link", "show", "lo")  # the loopback network ran
        # No route off the machine: only the pod subnet is reachable.
        routes = ip_in_ns(ns, "-4", "route", "show")
        assert "default" not in routes and lab.subnet in routes
    assert sorted([ra.pod_ip, rb.pod_ip]) == lab.allocated()

    for src, dst in ((a_ns, rb.pod_ip), (b_ns, ra.pod_ip)):
        ping = await asyncio.to_thread(subprocess.run, ping_argv(src, dst), capture_output=True, text=True)
        assert ping.returncode == 0, ping.stdout + ping.stderr

    await lab.network.delete(a, a_ns)
    await lab.network.delete(b, b_ns)
    assert lab.allocated() == []
    assert lab.veths() == []


async def test_delete_is_idempotent(lab: Lab) -> None:
    lab.write_conflist()
    sid, ns = await lab.sandbox()
    await lab.network.add(sid, ns)
    assert len(lab.allocated()) == 1
    await lab.network.delete(sid, ns)
    await lab.network.delete(sid, ns)  # twice
    await lab.network.delete("never-added-" + secrets.token_hex(4), ns)  # never added
    assert lab.allocated() == []
    assert lab.veths() == []


async def test_delete_after_netns_is_gone_releases_the_ip(lab: Lab) -> None:
    lab.write_conflist()
    sid, ns = await lab.sandbox()
    result = await lab.network.add(sid, ns)
    assert lab.allocated() == [result.pod_ip]
    await netns.remove_all(ns.parent)
    assert not ns.exists()
    await lab.network.delete(sid, ns)
    assert lab.allocated() == []
    # The veth dies with its namespace, which the kernel tears down asynchronously (slowly under load).
    deadline = time.monotonic() + 10
    while lab.veths() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert lab.veths() == []


async def test_delete_after_restart_uses_the_cached_config(lab: Lab) -> None:
    conf = lab.write_conflist()
    sid, ns = await lab.sandbox()
    result = await lab.network.add(sid, ns)
    assert list((lab.cache_dir / "results").iterdir())
    conf.unlink()  # the config is gone and a new daemon starts
    restarted = lab.make_network()
    assert not (await restarted.status()).ready
    await restarted.check(sid, ns)
    await restarted.delete(sid, ns)
    assert result.pod_ip not in lab.allocated()
    assert list((lab.cache_dir / "results").iterdir()) == []
    assert lab.veths() == []


async def test_no_config_is_not_ready_and_add_says_why(lab: Lab) -> None:
    status = await lab.network.status()
    assert not status.ready
    assert status.message == f"no network config found in {lab.conf_dir}"
    sid, ns = await lab.sandbox()
    with pytest.raises(FailedPrecondition, match="no network config found in"):
        await lab.network.add(sid, ns)


async def test_broken_config_is_named(lab: Lab) -> None:
    (lab.conf_dir / "05-broken.conflist").write_text('{"cniVersion": "1.0.0", "name": ')
    status = await lab.network.status()
    assert not status.ready
    assert "05-broken.conflist: invalid JSON" in status.message
    sid, ns = await lab.sandbox()
    with pytest.raises(FailedPrecondition, match=r"05-broken\.conflist: invalid JSON"):
        await lab.network.add(sid, ns)
    lab.write_conflist()  # a valid file later in lexical order wins
    assert (await lab.network.status()).network == "berth-test"
    assert (await lab.network.add(sid, ns)).pod_ip


async def test_missing_plugin_binary_is_named_and_nothing_is_left(lab: Lab) -> None:
    lab.write_conflist({"type": "no-such-plugin"})
    sid, ns = await lab.sandbox()
    with pytest.raises(FailedPrecondition) as err:
        await lab.network.add(sid, ns)
    assert '"no-such-plugin" not found in bin_dirs' in err.value.message
    assert str(CNI_BIN) in err.value.message and str(lab.fake_bin) in err.value.message
    # Every binary is looked up before the first runs: nothing was made.
    assert lab.allocated() == []
    assert lab.veths() == []
    assert "eth0" not in ip_in_ns(ns, "link", "show")


async def test_failing_plugin_error_is_parsed_and_add_is_undone(lab: Lab) -> None:
    lab.fake_plugin(
        "failer",
        'cat >/dev/null\nif [ "$CNI_COMMAND" = ADD ]; then\n'
        '  echo \'{"cniVersion": "1.0.0", "code": 7, "msg": "no room", "details": "pool empty"}\'\n'
        "  exit 1\nfi\n",
    )
    lab.write_conflist({"type": "failer"})
    sid, ns = await lab.sandbox()
    with pytest.raises(CniPluginError) as err:
        await lab.network.add(sid, ns, pod=PodRef("ns1", "p1", "u1"))
    assert err.value.code == 7
    assert err.value.message == "CNI plugin failer ADD failed (code 7): no room: pool empty"
    # The bridge plugin had run before the failure: its IP and veth were taken back.
    assert lab.allocated() == []
    assert lab.veths() == []
    assert "eth0" not in ip_in_ns(ns, "link", "show")
    assert not (lab.cache_dir / "results").exists() or not list((lab.cache_dir / "results").iterdir())


async def test_chained_plugin_gets_prev_result_args_and_runtime_config(lab: Lab) -> None:
    seen = lab.base / "seen"
    seen.mkdir()
    lab.fake_plugin(
        "recorder",
        f"cat > {seen}/$CNI_COMMAND.json\nenv | grep ^CNI_ > {seen}/$CNI_COMMAND.env\n"
        f'if [ "$CNI_COMMAND" = ADD ]; then python3 -c \'import json,sys; '
        f'print(json.dumps(json.load(open("{seen}/ADD.json"))["prevResult"]))\'; fi\n',
    )
    lab.write_conflist({"type": "recorder", "capabilities": {"portMappings": True}})
    sid, ns = await lab.sandbox()
    ports = [{"hostPort": 18080, "containerPort": 80, "protocol": "tcp", "hostIP": "127.0.0.1"}]
    result = await lab.network.add(
        sid, ns, pod=PodRef("team", "api", "u-9"), capability_args={"portMappings": ports, "bandwidth": {}}
    )
    add = json.loads((seen / "ADD.json").read_text())
    assert add["name"] == "berth-test" and add["cniVersion"] == "1.0.0"
    assert add["runtimeConfig"] == {"portMappings": ports}  # only the capability it declared
    assert add["prevResult"]["ips"][0]["address"].split("/")[0] == result.pod_ip
    env = dict(line.split("=", 1) for line in (seen / "ADD.env").read_text().splitlines())
    assert env["CNI_ARGS"] == (
        f"IgnoreUnknown=1;K8S_POD_NAMESPACE=team;K8S_POD_NAME=api;K8S_POD_INFRA_CONTAINER_ID={sid};K8S_POD_UID=u-9"
    )
    assert env["CNI_CONTAINERID"] == sid and env["CNI_NETNS"] == str(ns) and env["CNI_IFNAME"] == "eth0"
    assert env["CNI_PATH"] == f"{lab.fake_bin}:{CNI_BIN}"

    await lab.network.delete(sid, ns)
    dele = json.loads((seen / "DEL.json").read_text())
    assert dele["prevResult"] == add["prevResult"]  # DEL gets the cached ADD result
    assert dele["runtimeConfig"] == {"portMappings": ports}
    assert lab.allocated() == []


async def test_plugin_timeout_kills_it(tmp_path: Path) -> None:
    script = tmp_path / "sleeper"
    script.write_text("#!/bin/sh\necho $$ > " + str(tmp_path / "pid") + "\nexec sleep 30\n")
    script.chmod(0o755)
    with pytest.raises(DeadlineExceeded, match=r"sleeper ADD: no answer within 0\.5s"):
        await run_plugin(script, "ADD", {"CNI_COMMAND": "ADD"}, b"{}", timeout=0.5)
    pid = int((tmp_path / "pid").read_text())
    assert not Path(f"/proc/{pid}").exists()


def _nat_rules() -> str:
    return subprocess.run(["iptables-save", "-t", "nat"], capture_output=True, text=True).stdout


@pytest.fixture
def portmap_chains() -> Iterator[None]:
    """Remove portmap's shared chains afterwards if this test was the one that made them."""
    before = _nat_rules()
    if subprocess.run(["iptables", "-t", "nat", "-S"], capture_output=True).returncode != 0:
        pytest.skip("iptables does not work here")
    try:
        yield
    finally:
        after = _nat_rules()
        for chain, parents in (("CNI-HOSTPORT-DNAT", ("PREROUTING", "OUTPUT")),):
            if f":{chain} " in after and f":{chain} " not in before:
                for line in after.splitlines():
                    if line.startswith("-A ") and f"-j {chain}" in line and line.split()[1] in parents:
                        subprocess.run(["iptables", "-t", "nat", "-D", *line.split()[1:]], check=False)
                subprocess.run(["iptables", "-t", "nat", "-F", chain], check=False)
                subprocess.run(["iptables", "-t", "nat", "-X", chain], check=False)


@pytest.mark.usefixtures("portmap_chains")
async def test_portmap_rules_follow_add_and_del(lab: Lab) -> None:
    lab.write_conflist({"type": "portmap", "capabilities": {"portMappings": True}, "snat": False})
    sid, ns = await lab.sandbox()
    port = 20000 + secrets.randbelow(20000)
    ports = [{"hostPort": port, "containerPort": 80, "protocol": "tcp", "hostIP": "127.0.0.1"}]
    result = await lab.network.add(sid, ns, capability_args={"portMappings": ports})
    rules = _nat_rules()
    assert f"--dport {port}" in rules and f"{result.pod_ip}:80" in rules
    assert "MASQUERADE" not in "".join(line for line in rules.splitlines() if str(port) in line)
    await lab.network.delete(sid, ns)
    assert f"--dport {port}" not in _nat_rules()


async def test_pinned_namespaces_lifecycle(tmp_path: Path) -> None:
    directory = tmp_path / "sb"
    paths = await netns.create(directory, hostname="pod-a")
    try:
        assert set(paths) == {"net", "ipc", "uts"}
        for kind, path in paths.items():
            assert netns.is_pinned(path, kind)
            assert netns.is_pinned(path)
        assert not netns.is_pinned(paths["net"], "uts")
        assert os.stat(paths["net"]).st_ino != os.stat("/proc/self/ns/net").st_ino  # a new namespace
        uts = subprocess.run(["nsenter", f"--uts={paths['uts']}", "hostname"], capture_output=True, text=True)
        assert uts.stdout.strip() == "pod-a"
        with pytest.raises(AlreadyExists, match="already pinned"):
            await netns.create(directory)
    finally:
        await netns.remove_all(directory)
    for path in paths.values():
        assert not path.exists() and not netns.is_pinned(path)
    await netns.remove_all(directory)  # idempotent
    assert not netns.is_pinned(tmp_path / "nowhere")


async def test_pin_failure_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="hostname"):
        await netns.create(tmp_path / "sb", ["net"], hostname="x")
    with pytest.raises(InvalidArgument, match="namespace kind 'pid'"):
        await netns.create(tmp_path / "sb", ["net", "pid"])
    assert not (tmp_path / "sb" / "net").exists()
