"""CRI pod sandboxes end to end: a real berthd, Debian's CNI plugins, kubelet's RPCs over the socket.

Each test's daemon gets its own CNI conf dir with a bridge of a unique name
(no gateway, no masquerade, no routes: pods reach only each other) and
host-local's store in the test's directory. Teardown stops and removes every
pod through CRI, deletes the bridge, and lazily unmounts anything left under
the test directory, even when the test failed.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from grpclib.client import Channel
from grpclib.const import Status

from daemon.cli import podnet
from daemon.mount import mount_points_under
from plugins.cri import netns
from protos.runtime import v1 as cri
from tests.integration.conftest import Berthd, grpc_error

CNI_BIN = Path("/usr/lib/cni")

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not (CNI_BIN / "bridge").exists() or shutil.which("unshare") is None,
    reason="needs root, util-linux unshare and Debian's containernetworking-plugins",
)

NS = cri.NamespaceMode
#: the pods' cgroup parent: unique per run, removed from every hierarchy at teardown
CGROUP_PARENT = f"/berth-test-{secrets.token_hex(3)}"


def conflist(tmp: Path, bridge: str, subnet: str) -> dict[str, Any]:
    return podnet.conflist("berth-pods", bridge, subnet, tmp / "ipam", portmap=True)


@dataclass
class Node:
    daemon: Berthd
    channel: Channel
    rt: cri.RuntimeServiceStub
    tmp: Path
    bridge: str
    subnet_prefix: str

    def reconnect(self) -> None:
        self.channel.close()
        self.channel = self.daemon.channel()
        self.rt = cri.RuntimeServiceStub(self.channel, timeout=60)

    async def run(self, name: str, **kw: Any) -> str:
        resp = await self.rt.run_pod_sandbox(cri.RunPodSandboxRequest(config=pod_config(name, **kw)))
        return str(resp.pod_sandbox_id)

    async def status(self, sandbox_id: str, verbose: bool = False) -> cri.PodSandboxStatusResponse:
        return await self.rt.pod_sandbox_status(
            cri.PodSandboxStatusRequest(pod_sandbox_id=sandbox_id, verbose=verbose)
        )

    async def info(self, sandbox_id: str) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads((await self.status(sandbox_id, verbose=True)).info["info"])
        return doc

    async def ids(self, flt: cri.PodSandboxFilter | None = None) -> set[str]:
        resp = await self.rt.list_pod_sandbox(
            cri.ListPodSandboxRequest(filter=flt if flt is not None else cri.PodSandboxFilter())
        )
        return {p.id for p in resp.items}

    def allocated(self) -> list[str]:
        store = self.tmp / "ipam" / "berth-pods"
        return sorted(p.name for p in store.iterdir() if p.name.startswith("10.")) if store.exists() else []


def pod_config(
    name: str,
    *,
    uid: str | None = None,
    attempt: int = 0,
    pid: cri.NamespaceMode = NS.CONTAINER,
    network: cri.NamespaceMode = NS.POD,
    ipc: cri.NamespaceMode = NS.POD,
    hostname: str = "",
    dns: cri.DnsConfig | None = None,
    labels: dict[str, str] | None = None,
    log_directory: str = "",
) -> cri.PodSandboxConfig:
    return cri.PodSandboxConfig(
        metadata=cri.PodSandboxMetadata(
            name=name, namespace="default", uid=f"uid-{name}" if uid is None else uid, attempt=attempt
        ),
        hostname=hostname,
        log_directory=log_directory,
        dns_config=dns or cri.DnsConfig(),
        labels=labels or {"app": name},
        annotations={"note": f"pod {name}"},
        linux=cri.LinuxPodSandboxConfig(
            cgroup_parent=CGROUP_PARENT,
            security_context=cri.LinuxSandboxSecurityContext(
                namespace_options=cri.NamespaceOption(network=network, pid=pid, ipc=ipc)
            ),
        ),
    )


def ping(netns_path: str, ip: str) -> subprocess.CompletedProcess[str]:
    tool = [shutil.which("ping") or "ping"] if shutil.which("ping") else ["busybox", "ping"]
    return subprocess.run(
        ["nsenter", f"--net={netns_path}", *tool, "-c1", "-W2", ip],
        capture_output=True,
        text=True,
        timeout=10,
    )


def berthd_config(tmp: Path) -> str:
    return f"""version = 1
[plugins."berth.cri.v1.cri"]
conf_dir = "{tmp}/net.d"
bin_dirs = ["/usr/lib/cni"]
"""


async def cleanup(node: Node) -> None:
    try:
        node.reconnect()
        resp = await node.rt.list_pod_sandbox(cri.ListPodSandboxRequest())
        for pod in resp.items:
            with contextlib.suppress(Exception):
                await node.rt.remove_pod_sandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=pod.id))
    except Exception:  # noqa: BLE001 - the daemon may be dead: the mounts are cleaned below
        pass
    subprocess.run(["ip", "link", "del", node.bridge], capture_output=True)
    for point in sorted(mount_points_under(node.tmp), key=len, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True)
    for hierarchy in Path("/sys/fs/cgroup").iterdir():
        with contextlib.suppress(OSError):
            (hierarchy / CGROUP_PARENT.lstrip("/")).rmdir()


@pytest.fixture
async def node(make_berthd: Callable[..., Berthd], short_tmp: Path) -> AsyncIterator[Node]:
    bridge = "bs" + secrets.token_hex(4)
    third = secrets.randbelow(254) + 1
    (short_tmp / "net.d").mkdir()
    (short_tmp / "net.d" / "10-pods.conflist").write_text(
        json.dumps(conflist(short_tmp, bridge, f"10.245.{third}.0/24"))
    )
    d = make_berthd(config=berthd_config(short_tmp))
    d.start()
    await d.wait_ready()
    ch = d.channel()
    n = Node(d, ch, cri.RuntimeServiceStub(ch, timeout=60), short_tmp, bridge, f"10.245.{third}.")
    try:
        yield n
    finally:
        await cleanup(n)
        n.channel.close()


async def test_run_status_list_stop_remove(node: Node) -> None:
    dns = cri.DnsConfig(
        servers=["10.96.0.10", "10.96.0.11"], searches=["svc.local", "local"], options=["ndots:5"]
    )
    sid = await node.run("web", hostname="web-0", dns=dns, labels={"app": "web", "tier": "front"})
    assert len(sid) == 64

    st = (await node.status(sid)).status
    assert st.state == cri.PodSandboxState.SANDBOX_READY
    assert st.metadata.name == "web" and st.metadata.uid == "uid-web"
    assert st.labels == {"app": "web", "tier": "front"}
    assert st.annotations == {"note": "pod web"}
    assert st.network.ip.startswith(node.subnet_prefix)
    assert st.linux.namespaces.options.pid == NS.CONTAINER
    assert st.created_at > 1_600_000_000 * 10**9
    assert node.allocated() == [st.network.ip]

    info = await node.info(sid)
    assert info["pid"] == 0  # no infra process without a shared PID namespace
    assert info["netNamespaceClosed"] is False
    assert info["config"]["metadata"]["name"] == "web"
    netns_path = info["netnsPath"]
    assert netns.is_pinned(netns_path, "net")
    sandbox_dir = Path(info["sandboxDir"])
    assert (sandbox_dir / "hostname").read_text() == "web-0\n"
    assert (sandbox_dir / "resolv.conf").read_text() == (
        "search svc.local local\nnameserver 10.96.0.10\nnameserver 10.96.0.11\noptions ndots:5\n"
    )
    assert (sandbox_dir / "hosts").read_bytes() == Path("/etc/hosts").read_bytes()
    assert os.path.ismount(sandbox_dir / "shm")
    uts = subprocess.run(
        ["nsenter", f"--uts={sandbox_dir / 'uts'}", "hostname"], capture_output=True, text=True, check=True
    )
    assert uts.stdout.strip() == "web-0"

    # filters: id prefix, state, labels (AND)
    other = await node.run("db", labels={"app": "db"})
    assert await node.ids() == {sid, other}
    assert await node.ids(cri.PodSandboxFilter(id=sid[:12])) == {sid}
    assert await node.ids(cri.PodSandboxFilter(label_selector={"tier": "front"})) == {sid}
    assert await node.ids(cri.PodSandboxFilter(label_selector={"app": "db", "tier": "front"})) == set()
    streamed = [r async for r in node.rt.stream_pod_sandboxes(cri.StreamPodSandboxesRequest())]
    assert {p.id for r in streamed for p in r.pod_sandboxes} == {sid, other}

    await node.rt.stop_pod_sandbox(cri.StopPodSandboxRequest(pod_sandbox_id=sid))
    await node.rt.stop_pod_sandbox(cri.StopPodSandboxRequest(pod_sandbox_id=sid))  # idempotent
    st = (await node.status(sid)).status
    assert st.state == cri.PodSandboxState.SANDBOX_NOTREADY
    assert st.network.ip == ""
    assert not netns.is_pinned(netns_path)
    assert not os.path.ismount(sandbox_dir / "shm")
    assert node.allocated() == [(await node.status(other)).status.network.ip]
    ready = cri.PodSandboxFilter(state=cri.PodSandboxStateValue(state=cri.PodSandboxState.SANDBOX_READY))
    notready = cri.PodSandboxFilter(
        state=cri.PodSandboxStateValue(state=cri.PodSandboxState.SANDBOX_NOTREADY)
    )
    assert await node.ids(ready) == {other}
    assert await node.ids(notready) == {sid}

    await node.rt.remove_pod_sandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=sid))
    await node.rt.remove_pod_sandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=sid))  # idempotent
    await node.rt.stop_pod_sandbox(cri.StopPodSandboxRequest(pod_sandbox_id=sid))  # unknown id: OK
    err = await grpc_error(node.status(sid))
    assert err.status == Status.NOT_FOUND and sid in str(err.message)
    assert not sandbox_dir.exists()
    assert await node.ids() == {other}
    # the name is free again
    again = await node.run("web")
    assert again != sid


async def test_name_is_reserved_by_its_holder(node: Node) -> None:
    sid = await node.run("dup")
    err = await grpc_error(node.run("dup"))
    assert err.status == Status.ALREADY_EXISTS
    assert sid in str(err.message)
    # another attempt is another name
    assert await node.run("dup", attempt=1) != sid


async def test_host_network_pod_has_no_netns_and_no_ip(node: Node) -> None:
    sid = await node.run("hostnet", network=NS.NODE, ipc=NS.NODE)
    st = (await node.status(sid)).status
    assert st.state == cri.PodSandboxState.SANDBOX_READY
    assert st.network.ip == ""
    assert st.linux.namespaces.options.network == NS.NODE
    info = await node.info(sid)
    assert info["netnsPath"] == ""
    sandbox_dir = Path(info["sandboxDir"])
    assert (sandbox_dir / "hostname").read_text() == socket.gethostname() + "\n"
    assert not (sandbox_dir / "net").exists() and not (sandbox_dir / "ipc").exists()
    assert not os.path.ismount(sandbox_dir / "shm")  # IPC NODE: the host's /dev/shm
    assert (sandbox_dir / "resolv.conf").read_bytes() == Path("/etc/resolv.conf").read_bytes()
    assert node.allocated() == []
    await node.rt.stop_pod_sandbox(cri.StopPodSandboxRequest(pod_sandbox_id=sid))
    await node.rt.remove_pod_sandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=sid))
    assert await node.ids() == set()


async def test_shared_pid_pod_runs_an_infra_process_in_its_namespaces(node: Node) -> None:
    sid = await node.run("shared", pid=NS.POD)
    info = await node.info(sid)
    pid = info["pid"]
    assert pid > 0 and info["processStatus"] == "running"
    net_file = os.stat(info["netnsPath"])
    in_proc = os.stat(f"/proc/{pid}/ns/net")
    assert (in_proc.st_dev, in_proc.st_ino) == (net_file.st_dev, net_file.st_ino)
    assert os.stat(f"/proc/{pid}/ns/pid").st_ino != os.stat("/proc/self/ns/pid").st_ino
    assert Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[1] == b"infinity"
    tasks = node.daemon.berth("-n", "k8s.io", "tasks", "ls")
    assert sid in tasks.stdout, tasks.stdout + tasks.stderr

    stats = (await node.rt.pod_sandbox_stats(cri.PodSandboxStatsRequest(pod_sandbox_id=sid))).stats
    assert stats.attributes.id == sid and stats.attributes.metadata.name == "shared"
    assert stats.linux.containers == []
    assert stats.linux.cpu.timestamp > 0
    assert stats.linux.memory.working_set_bytes.value > 0  # the infra's own cgroup
    assert stats.linux.process.process_count.value >= 1  # the infra process itself
    assert "eth0" in [i.name for i in stats.linux.network.interfaces]
    assert stats.linux.network.default_interface.name == "eth0"

    await node.rt.stop_pod_sandbox(cri.StopPodSandboxRequest(pod_sandbox_id=sid))
    assert (
        not os.path.exists(f"/proc/{pid}/cmdline")
        or b"infinity" not in Path(f"/proc/{pid}/cmdline").read_bytes()
    )
    assert (await node.info(sid))["pid"] == 0


async def test_two_pods_reach_each_other_and_survive_kill_9(node: Node) -> None:
    a = await node.run("a", pid=NS.POD)
    b = await node.run("b")
    ip_a = (await node.status(a)).status.network.ip
    ip_b = (await node.status(b)).status.network.ip
    ns_a = (await node.info(a))["netnsPath"]
    ns_b = (await node.info(b))["netnsPath"]
    infra_pid = (await node.info(a))["pid"]
    r = ping(ns_a, ip_b)
    assert r.returncode == 0, r.stdout + r.stderr

    node.daemon.signal(signal.SIGKILL)
    node.daemon.wait_exit(10)
    node.daemon.start()
    await node.daemon.wait_ready()
    node.reconnect()

    assert await node.ids(
        cri.PodSandboxFilter(state=cri.PodSandboxStateValue(state=cri.PodSandboxState.SANDBOX_READY))
    ) == {a, b}
    assert (await node.status(a)).status.network.ip == ip_a
    assert (await node.status(b)).status.network.ip == ip_b
    assert (await node.info(a))["pid"] == infra_pid
    r = ping(ns_b, ip_a)
    assert r.returncode == 0, r.stdout + r.stderr
    # and still fully removable after the restart
    for sid in (a, b):
        await node.rt.remove_pod_sandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=sid))
    assert node.allocated() == []
    assert not netns.is_pinned(ns_a)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"name": ""}, "config.metadata.name"),
        ({"name": "a/b"}, "config.metadata.name"),
        ({"uid": ""}, "config.metadata.uid"),
        ({"log_directory": "relative/logs"}, "config.log_directory"),
        ({"hostname": "bad host"}, "config.hostname"),
        ({"handler": "kata"}, "runtime_handler"),
        ({"labels": {"big": "x" * (300 * 1024)}}, "config.labels"),
        ({"memory": -1}, "config.linux.resources.memory_limit_in_bytes"),
        ({"dns": cri.DnsConfig(servers=["1.1.1.1\nnameserver 6.6.6.6"])}, "config.dns_config.servers[0]"),
    ],
)
async def test_invalid_input_names_the_field(node: Node, change: dict[str, Any], field: str) -> None:
    config = pod_config(
        change.get("name", "bad"),
        uid=change.get("uid", "uid-bad"),
        hostname=change.get("hostname", ""),
        log_directory=change.get("log_directory", ""),
        labels=change.get("labels"),
        dns=change.get("dns"),
    )
    if "memory" in change:
        config.linux.resources = cri.LinuxContainerResources(memory_limit_in_bytes=change["memory"])
    req = cri.RunPodSandboxRequest(config=config, runtime_handler=change.get("handler", ""))
    err = await grpc_error(node.rt.run_pod_sandbox(req))
    assert err.status == Status.INVALID_ARGUMENT, err.message
    assert field in str(err.message)
    assert await node.ids() == set()


async def test_failed_cni_add_leaves_nothing(node: Node) -> None:
    (node.tmp / "net.d" / "10-pods.conflist").write_text(
        json.dumps({"cniVersion": "1.0.0", "name": "broken", "plugins": [{"type": "no-such-plugin"}]})
    )
    err = await grpc_error(node.run("nonet"))
    assert err.status != Status.OK
    assert await node.ids() == set()
    state_dir = node.daemon.state / "berth.cri.v1.cri" / "sandboxes"
    assert not state_dir.exists() or list(state_dir.iterdir()) == []
    assert [p for p in mount_points_under(node.tmp) if "sandboxes" in p] == []
    # the name was given back
    (node.tmp / "net.d" / "10-pods.conflist").write_text(
        json.dumps(conflist(node.tmp, node.bridge, node.subnet_prefix + "0/24"))
    )
    assert await node.run("nonet")
