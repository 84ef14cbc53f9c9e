"""CRI containers end to end: a real berthd, busybox imported into ``k8s.io``, host-network pods.

kubelet's calls go through the generated RuntimeService stub on the main
socket: create/start/stop/remove, status and list (every filter), exec_sync
(output, exit codes, timeout), exits with their codes and reasons, CRI
events, update of resources, stats, and a ``kill -9`` of berthd with a
restart in between. Teardown removes every pod and container through CRI,
stops berthd, then kills any shim left (by PID) and unmounts what remains.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from grpclib.client import Channel
from grpclib.const import Status

from daemon.mount import mount_points_under
from protos.runtime import v1 as cri
from tests.integration.conftest import Berthd, ctr, grpc_error, ok
from tests.support.oci import busybox_image, oci_archive

K8S = "k8s.io"
IMAGE = "docker.io/berth/bb:1.0"
RUNTIME_STATE = "berth.runtime.v2.task"

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (runc, mounts)")


def config(tmp: Path) -> str:
    return f"""version = 1
[plugins."berth.cri.v1.cri"]
conf_dir = "{tmp}/net.d"
bin_dirs = ["/usr/lib/cni"]
"""


def node_namespaces() -> cri.NamespaceOption:
    return cri.NamespaceOption(network=cri.NamespaceMode.NODE, pid=cri.NamespaceMode.CONTAINER)


@dataclass
class Node:
    d: Berthd
    channel: Channel
    logs: Path
    pods: list[str] = field(default_factory=list)

    @property
    def rt(self) -> cri.RuntimeServiceStub:
        return cri.RuntimeServiceStub(self.channel, timeout=60)

    def pod_config(self, name: str = "") -> cri.PodSandboxConfig:
        name = name or f"p{uuid.uuid4().hex[:8]}"
        return cri.PodSandboxConfig(
            metadata=cri.PodSandboxMetadata(name=name, namespace="default", uid=uuid.uuid4().hex, attempt=0),
            log_directory=str(self.logs / name),
            linux=cri.LinuxPodSandboxConfig(
                security_context=cri.LinuxSandboxSecurityContext(namespace_options=node_namespaces())
            ),
        )

    async def pod(self) -> tuple[str, cri.PodSandboxConfig]:
        pc = self.pod_config()
        Path(pc.log_directory).mkdir(parents=True, exist_ok=True)
        resp = await self.rt.run_pod_sandbox(cri.RunPodSandboxRequest(config=pc))
        self.pods.append(resp.pod_sandbox_id)
        return resp.pod_sandbox_id, pc

    def container_config(self, name: str, *command: str, **kw: Any) -> cri.ContainerConfig:
        return cri.ContainerConfig(
            metadata=cri.ContainerMetadata(name=name),
            image=cri.ImageSpec(image=IMAGE),
            command=list(command),
            log_path=f"{name}/0.log",
            linux=cri.LinuxContainerConfig(
                security_context=cri.LinuxContainerSecurityContext(namespace_options=node_namespaces())
            ),
            **kw,
        )

    async def create(self, pod: tuple[str, cri.PodSandboxConfig], name: str, *command: str, **kw: Any) -> str:
        resp = await self.rt.create_container(
            cri.CreateContainerRequest(
                pod_sandbox_id=pod[0],
                config=self.container_config(name, *command, **kw),
                sandbox_config=pod[1],
            )
        )
        return str(resp.container_id)

    async def run(self, pod: tuple[str, cri.PodSandboxConfig], name: str, *command: str, **kw: Any) -> str:
        cid = await self.create(pod, name, *command, **kw)
        await self.rt.start_container(cri.StartContainerRequest(container_id=cid))
        return cid

    async def status(self, cid: str, verbose: bool = False) -> cri.ContainerStatusResponse:
        return await self.rt.container_status(cri.ContainerStatusRequest(container_id=cid, verbose=verbose))

    async def wait_state(
        self, cid: str, state: cri.ContainerState, timeout: float = 20
    ) -> cri.ContainerStatus:
        deadline = time.monotonic() + timeout
        while True:
            st = (await self.status(cid)).status
            if st.state == state:
                return st
            if time.monotonic() > deadline:
                raise AssertionError(f"container {cid} still {st.state!r}, not {state!r}: {st}")
            await asyncio.sleep(0.05)

    def runtime_state(self) -> Path:
        return self.d.state / RUNTIME_STATE


def shim_pids(d: Berthd) -> list[int]:
    """Shims of this daemon: processes whose command line names its state directory, not berthd's children."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == d.pid:
            continue
        with contextlib.suppress(OSError):
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
            environ = (entry / "environ").read_bytes().decode(errors="replace")
            if str(d.state) in cmdline or str(d.state) in environ:
                out.append(int(entry.name))
    return out


async def cleanup(node: Node) -> None:
    with contextlib.suppress(Exception):
        listed = await node.rt.list_containers(cri.ListContainersRequest())
        for c in listed.containers:
            with contextlib.suppress(Exception):
                await node.rt.remove_container(cri.RemoveContainerRequest(container_id=c.id))
    for sandbox_id in node.pods:
        with contextlib.suppress(Exception):
            await node.rt.stop_pod_sandbox(cri.StopPodSandboxRequest(pod_sandbox_id=sandbox_id))
            await node.rt.remove_pod_sandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=sandbox_id))
    node.channel.close()
    node.d.stop()
    for pid in shim_pids(node.d):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for point in reversed(mount_points_under(node.d.base)):
        subprocess.run(["umount", "-l", point], capture_output=True, timeout=30)
    runc_root = node.runtime_state() / ".runc"
    for root in (runc_root, runc_root / K8S):
        if root.is_dir():
            listed = subprocess.run(
                ["runc", "--root", str(root), "list", "-q"], capture_output=True, text=True
            )
            for cid in listed.stdout.split():
                subprocess.run(["runc", "--root", str(root), "delete", "--force", cid], capture_output=True)


async def start_node(make_berthd: Callable[..., Berthd], tmp: Path) -> Berthd:
    d = make_berthd(config=config(tmp))
    d.start()
    await d.wait_ready()
    return d


@pytest.fixture
async def node(make_berthd: Callable[..., Berthd], short_tmp: Path) -> AsyncIterator[Node]:
    d = await start_node(make_berthd, short_tmp)
    n = Node(d, d.channel(), short_tmp / "logs")
    try:
        archive = oci_archive(busybox_image(), short_tmp / "bb.tar", ref_name="1.0")
        ok(ctr(d, "images", "import", "--base-name", "docker.io/berth/bb", str(archive), ns=K8S))
        yield n
    finally:
        await cleanup(n)


def log_lines(path: Path) -> list[tuple[str, str, str]]:
    """(stream, tag, text) of each CRI log line."""
    out = []
    for line in path.read_text().splitlines():
        _ts, stream, tag, text = line.split(" ", 3) if line.count(" ") >= 3 else (*line.split(" "), "")
        out.append((stream, tag, text))
    return out


async def test_lifecycle_status_list_exec_stop_remove(node: Node) -> None:
    pod = await node.pod()
    cid = await node.create(
        pod, "app", "sh", "-c", "echo hello; echo oops >&2; exec sleep 1000", labels={"a": "1"}
    )
    st = (await node.status(cid)).status
    assert st.state == cri.ContainerState.CONTAINER_CREATED
    assert st.created_at > 0 and st.started_at == 0
    assert st.labels == {"a": "1"} and st.metadata.name == "app"
    assert st.image.image == IMAGE and st.image_id.startswith("sha256:")
    assert st.image_ref == st.image_id  # ctr import records no repo digest: the id, as containerd
    assert st.log_path == str(Path(pod[1].log_directory) / "app/0.log")

    await node.rt.start_container(cri.StartContainerRequest(container_id=cid))
    st = (await node.status(cid)).status
    assert st.state == cri.ContainerState.CONTAINER_RUNNING and st.started_at >= st.created_at
    verbose = json.loads((await node.status(cid, verbose=True)).info["info"])
    assert verbose["sandboxID"] == pod[0] and verbose["pid"] > 0
    assert verbose["runtimeSpec"]["annotations"]["io.kubernetes.cri.sandbox-id"] == pod[0]

    # the native API sees it in k8s.io, as containerd's CRI objects
    assert cid in ok(ctr(node.d, "containers", "ls", "-q", ns=K8S)).split()

    # filters: id prefix, pod prefix, state, labels
    async def ids(**f: Any) -> list[str]:
        resp = await node.rt.list_containers(cri.ListContainersRequest(filter=cri.ContainerFilter(**f)))
        return [c.id for c in resp.containers]

    other = await node.create(pod, "other", "true")
    assert set(await ids()) == {cid, other}
    assert await ids(id=cid[:12]) == [cid]
    assert set(await ids(pod_sandbox_id=pod[0][:10])) == {cid, other}
    assert await ids(pod_sandbox_id="ffff") == []
    assert await ids(state=cri.ContainerStateValue(cri.ContainerState.CONTAINER_RUNNING)) == [cid]
    assert await ids(state=cri.ContainerStateValue(cri.ContainerState.CONTAINER_CREATED)) == [other]
    assert await ids(label_selector={"a": "1"}) == [cid]
    chunks = [r async for r in node.rt.stream_containers(cri.StreamContainersRequest())]
    assert {c.id for r in chunks for c in r.containers} == {cid, other}

    # exec_sync: output, exit code, timeout
    out = await node.rt.exec_sync(
        cri.ExecSyncRequest(container_id=cid, cmd=["sh", "-c", "echo hi; echo e >&2"])
    )
    assert (out.stdout, out.stderr, out.exit_code) == (b"hi\n", b"e\n", 0)
    out = await node.rt.exec_sync(cri.ExecSyncRequest(container_id=cid, cmd=["sh", "-c", "exit 3"]))
    assert out.exit_code == 3
    started = time.monotonic()
    err = await grpc_error(
        node.rt.exec_sync(cri.ExecSyncRequest(container_id=cid, cmd=["sleep", "30"], timeout=1))
    )
    assert err.status == Status.DEADLINE_EXCEEDED and "timeout" in (err.message or "")
    assert time.monotonic() - started < 10
    err = await grpc_error(node.rt.exec_sync(cri.ExecSyncRequest(container_id=other, cmd=["true"])))
    assert err.status == Status.FAILED_PRECONDITION and other in (err.message or "")

    # stats of a running container: cpu, memory, writable layer
    stats = (await node.rt.container_stats(cri.ContainerStatsRequest(container_id=cid))).stats
    assert stats.attributes.id == cid and stats.memory.working_set_bytes.value > 0
    assert stats.cpu.usage_core_nano_seconds.value > 0 and stats.writable_layer.fs_id.mountpoint
    listed = await node.rt.list_container_stats(cri.ListContainerStatsRequest())
    assert {s.attributes.id for s in listed.stats} == {cid, other}

    # update resources while running
    await node.rt.update_container_resources(
        cri.UpdateContainerResourcesRequest(
            container_id=cid,
            linux=cri.LinuxContainerResources(memory_limit_in_bytes=128 << 20, cpu_shares=256),
        )
    )
    st = (await node.status(cid)).status
    assert st.resources.linux.memory_limit_in_bytes == 128 << 20 and st.resources.linux.cpu_shares == 256

    # stop: sleep as pid 1 ignores SIGTERM, so SIGKILL after the grace period
    await node.rt.stop_container(cri.StopContainerRequest(container_id=cid, timeout=1))
    st = (await node.status(cid)).status
    assert st.state == cri.ContainerState.CONTAINER_EXITED
    assert (st.exit_code, st.reason) == (137, "Error") and st.finished_at >= st.started_at
    await node.rt.stop_container(cri.StopContainerRequest(container_id=cid, timeout=1))  # again: OK

    # the CRI log, written by the shim
    log = Path(st.log_path)
    assert ("stdout", "F", "hello") in log_lines(log) and ("stderr", "F", "oops") in log_lines(log)

    for c in (cid, other):
        await node.rt.remove_container(cri.RemoveContainerRequest(container_id=c))
        err = await grpc_error(node.status(c))
        assert err.status == Status.NOT_FOUND
    await node.rt.remove_container(cri.RemoveContainerRequest(container_id=cid))  # again: OK
    await node.rt.stop_container(cri.StopContainerRequest(container_id="nope", timeout=1))
    assert log.exists()  # kubelet owns the log
    assert cid not in ok(ctr(node.d, "containers", "ls", "-q", ns=K8S)).split()
    assert not (node.runtime_state() / K8S / cid).exists()


async def test_exits_codes_reasons_and_start_errors(node: Node) -> None:
    pod = await node.pod()
    done = await node.run(pod, "done", "true")
    failed = await node.run(pod, "failed", "sh", "-c", "exit 7")
    st = await node.wait_state(done, cri.ContainerState.CONTAINER_EXITED)
    assert (st.exit_code, st.reason) == (0, "Completed")
    st = await node.wait_state(failed, cri.ContainerState.CONTAINER_EXITED)
    assert (st.exit_code, st.reason) == (7, "Error")

    missing = await node.create(pod, "missing", "/no/such/binary")
    err = await grpc_error(node.rt.start_container(cri.StartContainerRequest(container_id=missing)))
    assert missing in (err.message or "")
    st = (await node.status(missing)).status
    assert st.state == cri.ContainerState.CONTAINER_EXITED and st.reason == "StartError"
    assert "/no/such/binary" in st.message
    err = await grpc_error(node.rt.start_container(cri.StartContainerRequest(container_id=done)))
    assert err.status == Status.FAILED_PRECONDITION


async def test_bad_requests_name_their_field(node: Node) -> None:
    pod = await node.pod()
    cfg = node.container_config("x", "true")
    err = await grpc_error(
        node.rt.create_container(
            cri.CreateContainerRequest(pod_sandbox_id="f" * 64, config=cfg, sandbox_config=pod[1])
        )
    )
    assert err.status == Status.NOT_FOUND
    first = await node.create(pod, "dup", "true")
    err = await grpc_error(node.create(pod, "dup", "true"))
    assert err.status == Status.ALREADY_EXISTS and first in (err.message or "")
    cfg = node.container_config("esc", "true")
    cfg.log_path = "../../escape.log"
    err = await grpc_error(
        node.rt.create_container(
            cri.CreateContainerRequest(pod_sandbox_id=pod[0], config=cfg, sandbox_config=pod[1])
        )
    )
    assert err.status == Status.INVALID_ARGUMENT and "log_path" in (err.message or "")
    cfg = node.container_config("img", "true")
    cfg.image = cri.ImageSpec(image="docker.io/library/nothere:1")
    err = await grpc_error(
        node.rt.create_container(
            cri.CreateContainerRequest(pod_sandbox_id=pod[0], config=cfg, sandbox_config=pod[1])
        )
    )
    assert err.status == Status.NOT_FOUND and "failed to resolve image" in (err.message or "")
    cfg = node.container_config("neg", "true")
    cfg.linux.resources = cri.LinuxContainerResources(memory_limit_in_bytes=-5)
    err = await grpc_error(
        node.rt.create_container(
            cri.CreateContainerRequest(pod_sandbox_id=pod[0], config=cfg, sandbox_config=pod[1])
        )
    )
    assert err.status == Status.INVALID_ARGUMENT and "memory_limit_in_bytes" in (err.message or "")
    err = await grpc_error(node.status("f" * 64))
    assert err.status == Status.NOT_FOUND
    err = await grpc_error(node.rt.checkpoint_container(cri.CheckpointContainerRequest(container_id=first)))
    assert err.status == Status.UNIMPLEMENTED
    # a failed create leaves no name behind
    again = await node.create(pod, "esc", "true")
    assert again


async def test_container_events(node: Node) -> None:
    got: list[cri.ContainerEventResponse] = []
    arrived = asyncio.Event()

    async def listen() -> None:
        async for ev in node.rt.get_container_events(cri.GetEventsRequest()):
            got.append(ev)
            arrived.set()

    listener = asyncio.create_task(listen())
    try:
        pod = await node.pod()
        # the subscription is set up asynchronously: wait for the pod's own events to arrive
        cid = ""
        deadline = time.monotonic() + 10
        while not got and time.monotonic() < deadline:
            cid = await node.run(pod, f"c{len(node.pods)}{uuid.uuid4().hex[:4]}", "true")
            await asyncio.sleep(0.1)
        await node.wait_state(cid, cri.ContainerState.CONTAINER_EXITED)
        await node.rt.remove_container(cri.RemoveContainerRequest(container_id=cid))

        def kinds() -> list[cri.ContainerEventType]:
            return [e.container_event_type for e in got if e.container_id == cid]

        async with asyncio.timeout(10):
            while cri.ContainerEventType.CONTAINER_DELETED_EVENT not in kinds():
                arrived.clear()
                await arrived.wait()
        assert (
            kinds()
            == [
                cri.ContainerEventType.CONTAINER_CREATED_EVENT,
                cri.ContainerEventType.CONTAINER_STARTED_EVENT,
                cri.ContainerEventType.CONTAINER_STOPPED_EVENT,
                cri.ContainerEventType.CONTAINER_DELETED_EVENT,
            ][-len(kinds()) :]
        )
        stopped = next(
            e
            for e in got
            if e.container_id == cid
            and e.container_event_type == cri.ContainerEventType.CONTAINER_STOPPED_EVENT
        )
        assert stopped.pod_sandbox_status.id == pod[0]
        mine = [s for s in stopped.containers_statuses if s.id == cid]
        assert mine and mine[0].state == cri.ContainerState.CONTAINER_EXITED
    finally:
        listener.cancel()
        await asyncio.gather(listener, return_exceptions=True)


async def test_restart_keeps_running_and_records_exits_while_down(
    node: Node, make_berthd: Callable[..., Berthd]
) -> None:
    pod = await node.pod()
    running = await node.run(pod, "stay", "sleep", "1000")
    waiting = await node.run(pod, "waiter", "sh", "-c", "while [ ! -e /tmp/go ]; do sleep 0.05; done; exit 5")
    created = await node.create(pod, "idle", "true")
    pid = (await node.status(running, verbose=True)).info["info"]
    pid_before = json.loads(pid)["pid"]

    node.d.signal(signal.SIGKILL)
    node.d.wait_exit(10)
    node.channel.close()
    (node.runtime_state() / K8S / waiting / "rootfs" / "tmp" / "go").write_text("")
    await asyncio.sleep(0.5)  # the waiter polls every 50 ms; nothing else to wait on while berthd is down

    node.d.start()
    await node.d.wait_ready()
    node.channel = node.d.channel()
    listed = {c.id: c.state for c in (await node.rt.list_containers(cri.ListContainersRequest())).containers}
    assert listed[running] == cri.ContainerState.CONTAINER_RUNNING
    assert listed[created] == cri.ContainerState.CONTAINER_CREATED
    assert json.loads((await node.status(running, verbose=True)).info["info"])["pid"] == pid_before
    st = await node.wait_state(waiting, cri.ContainerState.CONTAINER_EXITED)
    assert (st.exit_code, st.reason) == (5, "Error")
    out = await node.rt.exec_sync(cri.ExecSyncRequest(container_id=running, cmd=["echo", "still"]))
    assert out.stdout == b"still\n"
    await node.rt.stop_container(cri.StopContainerRequest(container_id=running, timeout=0))
    st = (await node.status(running)).status
    assert st.state == cri.ContainerState.CONTAINER_EXITED and st.exit_code == 137
