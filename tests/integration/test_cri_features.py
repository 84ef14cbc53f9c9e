"""CRI features beyond the basics, end to end on a real berthd: the sandbox image, image volumes, logs.

* ``sandbox_image`` set: every pod runs the image's entrypoint as its infra
  task (containerd's pause container), holding the pod's pinned namespaces;
  RemovePodSandbox leaves no task, snapshot, lease or mount behind.
* Image volumes (``Mount.image``): the container sees the image's files
  read-only at the mount path (whole image, or ``image_sub_path``), writes
  fail, containerd's preconditions are InvalidArgument, a missing image is
  NotFound; nothing is left once the pod is gone.
* Logs across ``kill -9`` of berthd: the shim keeps writing the container's
  CRI log while berthd is down and after it is back, with no line lost, and
  ReopenContainerLog works after the restart.

Scaffolding (Node, cleanup, the berthd config) comes from test_cri_containers.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from grpclib.const import Status

from daemon.mount import mount_points_under
from protos.runtime import v1 as cri
from tests.integration.conftest import Berthd, ctr, grpc_error, ok
from tests.integration.test_cri_containers import K8S, Node, cleanup, config, log_lines
from tests.support.oci import (
    Image,
    Layer,
    Platform,
    busybox_image,
    make_config,
    make_manifest,
    oci_archive,
    single,
)

PAUSE = "docker.io/berth/pause:1.0"
DATA = "docker.io/berth/data:1.0"
BB = "docker.io/berth/bb"
COUNTER = "i=0; while true; do echo $i; i=$((i+1)); sleep 0.05; done"

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (runc, mounts)")


def import_image(d: Berthd, archive: Path, base_name: str) -> None:
    ok(ctr(d, "images", "import", "--base-name", base_name, str(archive), ns=K8S))


async def start(make_berthd: Callable[..., Berthd], tmp: Path, extra: str = "") -> Node:
    d = make_berthd(config=config(tmp) + extra)
    d.start()
    await d.wait_ready()
    node = Node(d, d.channel(), tmp / "logs")
    import_image(d, oci_archive(busybox_image(), tmp / "bb.tar", ref_name="1.0"), BB)
    return node


@pytest.fixture
async def node(make_berthd: Callable[..., Berthd], short_tmp: Path) -> AsyncIterator[Node]:
    n = await start(make_berthd, short_tmp)
    try:
        yield n
    finally:
        await cleanup(n)


@pytest.fixture
async def pause_node(make_berthd: Callable[..., Berthd], short_tmp: Path) -> AsyncIterator[Node]:
    n = await start(make_berthd, short_tmp, f'sandbox_image = "{PAUSE}"\n')
    try:
        pause = busybox_image(entrypoint=["/bin/sleep"], cmd=["1000000"])
        import_image(
            n.d, oci_archive(pause, short_tmp / "pause.tar", ref_name="1.0"), "docker.io/berth/pause"
        )
        yield n
    finally:
        await cleanup(n)


def ctr_lines(d: Berthd, *args: str) -> list[str]:
    return ok(ctr(d, *args, ns=K8S)).splitlines()


# -- sandbox image ------------------------------------------------------------------------------


async def test_sandbox_image_runs_every_pods_infra_from_the_image(pause_node: Node) -> None:
    node = pause_node
    pod = await node.pod()  # host network, PID per container: without sandbox_image, no infra at all
    resp = await node.rt.pod_sandbox_status(cri.PodSandboxStatusRequest(pod_sandbox_id=pod[0], verbose=True))
    info = json.loads(resp.info["info"])
    pid = info["pid"]
    assert pid > 0 and info["processStatus"] == "running"
    # the image's Entrypoint + Cmd, not the host's sleep infinity
    assert Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:2] == [b"/bin/sleep", b"1000000"]
    root = Path(f"/proc/{pid}/root")
    assert (root / "bin" / "busybox").exists()  # its root is the image's snapshot
    # it holds the pod's pinned IPC namespace and has a PID namespace of its own
    ipc = Path(info["sandboxDir"]) / "ipc"
    assert os.stat(f"/proc/{pid}/ns/ipc").st_ino == os.stat(ipc).st_ino
    assert os.readlink(f"/proc/{pid}/ns/pid") != os.readlink("/proc/self/ns/pid")
    # the record names the image and its snapshot, as containerd's sandbox container does
    assert pod[0] in ctr_lines(node.d, "containers", "ls", "-q")
    assert any(line.startswith(pod[0]) for line in ctr_lines(node.d, "snapshots", "ls"))

    await node.rt.stop_pod_sandbox(cri.StopPodSandboxRequest(pod_sandbox_id=pod[0]))
    assert not Path(f"/proc/{pid}").exists() or b"sleep" not in Path(f"/proc/{pid}/cmdline").read_bytes()
    await node.rt.remove_pod_sandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=pod[0]))
    assert not any(pod[0] in line for line in ctr_lines(node.d, "tasks", "ls"))
    assert not any(line.startswith(pod[0]) for line in ctr_lines(node.d, "snapshots", "ls"))
    assert not any(pod[0] in line for line in ctr_lines(node.d, "leases", "ls"))
    assert not [p for p in mount_points_under(node.d.base) if pod[0] in p]


async def test_sandbox_image_shared_pid_namespace_for_pod_mode_containers(pause_node: Node) -> None:
    node = pause_node
    pod = await node.pod()
    cid = await node.run(pod, "app", "sleep", "1000")
    # a container asking for the pod's PID namespace sees the pause process as its PID 1
    cfg = node.container_config("shared", "sleep", "1000")
    cfg.linux.security_context.namespace_options.pid = cri.NamespaceMode.POD
    shared = (
        await node.rt.create_container(
            cri.CreateContainerRequest(pod_sandbox_id=pod[0], config=cfg, sandbox_config=pod[1])
        )
    ).container_id
    await node.rt.start_container(cri.StartContainerRequest(container_id=shared))
    out = await node.rt.exec_sync(cri.ExecSyncRequest(container_id=shared, cmd=["cat", "/proc/1/cmdline"]))
    assert out.stdout.split(b"\0")[:2] == [b"/bin/sleep", b"1000000"]
    out = await node.rt.exec_sync(cri.ExecSyncRequest(container_id=cid, cmd=["cat", "/proc/1/cmdline"]))
    assert out.stdout.split(b"\0")[:2] == [b"sleep", b"1000"]


# -- image volumes ------------------------------------------------------------------------------


def data_image() -> Image:
    layer = Layer().file("data/hello.txt", "hello from the image\n").file("data/sub/inner.txt", "inner\n")
    layer.symlink("escape", "/../../etc")
    blob = layer.build()
    platform = Platform()
    return single(make_manifest([blob], make_config([blob.diff_id], platform), platform))


def image_mount(path: str, sub_path: str = "") -> cri.Mount:
    return cri.Mount(
        container_path=path, image=cri.ImageSpec(image=DATA), readonly=True, image_sub_path=sub_path
    )


async def create_with(
    node: Node, pod: tuple[str, cri.PodSandboxConfig], name: str, *mounts: cri.Mount
) -> str:
    cfg = node.container_config(name, "sleep", "1000")
    cfg.mounts = list(mounts)
    resp = await node.rt.create_container(
        cri.CreateContainerRequest(pod_sandbox_id=pod[0], config=cfg, sandbox_config=pod[1])
    )
    return str(resp.container_id)


async def test_image_volume_is_read_only_and_gone_with_the_pod(node: Node, short_tmp: Path) -> None:
    pod = await node.pod()
    # kubelet pulls first: an absent image is NotFound, never pulled here
    err = await grpc_error(create_with(node, pod, "early", image_mount("/vol")))
    assert err.status == Status.NOT_FOUND and DATA in (err.message or "")
    assert "failed to resolve image" in (err.message or "")
    import_image(
        node.d, oci_archive(data_image(), short_tmp / "data.tar", ref_name="1.0"), "docker.io/berth/data"
    )

    bad = image_mount("/vol")
    bad.readonly = False
    err = await grpc_error(create_with(node, pod, "rw", bad))
    assert err.status == Status.INVALID_ARGUMENT and "config.mounts[0].readonly" in (err.message or "")
    bad = image_mount("/vol")
    bad.host_path = "/etc"
    err = await grpc_error(create_with(node, pod, "hp", bad))
    assert err.status == Status.INVALID_ARGUMENT and "config.mounts[0].host_path" in (err.message or "")
    err = await grpc_error(create_with(node, pod, "file", image_mount("/f", "data/hello.txt")))
    assert "directory" in (err.message or "")

    cid = await create_with(node, pod, "reader", image_mount("/vol"), image_mount("/sub", "data/sub"))
    other = await create_with(node, pod, "second", image_mount("/again"))
    for c in (cid, other):
        await node.rt.start_container(cri.StartContainerRequest(container_id=c))

    async def sh(c: str, script: str) -> cri.ExecSyncResponse:
        return await node.rt.exec_sync(cri.ExecSyncRequest(container_id=c, cmd=["sh", "-c", script]))

    assert (await sh(cid, "cat /vol/data/hello.txt")).stdout == b"hello from the image\n"
    assert (await sh(cid, "cat /sub/inner.txt; ls /sub")).stdout == b"inner\ninner.txt\n"
    assert (await sh(other, "cat /again/data/sub/inner.txt")).stdout == b"inner\n"
    for path in ("/vol/new", "/vol/data/hello.txt", "/sub/x"):
        out = await sh(cid, f"echo x > {path}")
        assert out.exit_code != 0 and b"Read-only" in out.stderr, path
    status = (await node.status(cid)).status
    assert [m.image.image for m in status.mounts] == [DATA, DATA] and status.mounts[0].host_path
    # one mount of the image for the whole pod
    volumes = [p for p in mount_points_under(node.d.base) if "image-volumes" in p]
    assert len(set(volumes)) == 1, volumes

    await node.rt.stop_pod_sandbox(cri.StopPodSandboxRequest(pod_sandbox_id=pod[0]))
    await node.rt.remove_pod_sandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=pod[0]))
    assert not [p for p in mount_points_under(node.d.base) if "image-volumes" in p]
    assert not any("cri-image-volume" in line for line in ctr_lines(node.d, "snapshots", "ls"))
    assert not any("cri-image-volumes" in line for line in ctr_lines(node.d, "leases", "ls"))


# -- logs across a restart ----------------------------------------------------------------------


def counters(*paths: Path) -> list[int]:
    out = []
    for path in paths:
        if path.exists():
            out += [int(text) for stream, tag, text in log_lines(path) if stream == "stdout" and tag == "F"]
    return out


async def grown(paths: tuple[Path, ...], more_than: int, timeout: float = 15) -> list[int]:
    """The counters once more than ``more_than`` are logged (polled: the log file has no event to wait on)."""
    deadline = time.monotonic() + timeout
    while True:
        values = counters(*paths)
        if len(values) > more_than:
            return values
        if time.monotonic() > deadline:
            raise AssertionError(f"log {paths} stuck at {len(values)} lines")
        await asyncio.sleep(0.05)


async def test_logs_continue_in_the_same_file_across_kill_9(node: Node) -> None:
    pod = await node.pod()
    cid = await node.run(pod, "counter", "sh", "-c", COUNTER)
    log = Path((await node.status(cid)).status.log_path)
    before = len(await grown((log,), 5))
    inode = log.stat().st_ino

    node.d.signal(signal.SIGKILL)
    node.d.wait_exit(10)
    node.channel.close()
    down = len(await grown((log,), before + 10))  # the shim writes on while berthd is down

    node.d.start()
    await node.d.wait_ready()
    node.channel = node.d.channel()
    await grown((log,), down + 5)
    assert log.stat().st_ino == inode  # the same file all along

    rotated = log.with_name(log.name + ".1")
    log.rename(rotated)
    await node.rt.reopen_container_log(cri.ReopenContainerLogRequest(container_id=cid))
    await grown((log,), 5)
    await node.rt.stop_container(cri.StopContainerRequest(container_id=cid, timeout=0))
    values = counters(rotated, log)
    assert values == list(range(values[0], values[0] + len(values))), "a gap or a repeat in the counter"
    assert values[0] == 0
