"""The pod's shim starts at RunPodSandbox (``TaskManager.prepare_shim``) and never outlives its use.

RunPodSandbox starts the pod's shim in the background; the pod's first
StartContainer is served by that very process. A pod that never starts a
container gets it shut down at StopPodSandbox, and after a ``kill -9`` of
berthd the restarted daemon shuts down a prepared shim that serves no task
and removes its group directory. Host-network pods: no CNI is involved.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from protos.runtime import v1 as cri
from tests.integration.conftest import Berthd, ctr, ok
from tests.integration.test_cri_containers import K8S, Node, cleanup, start_node
from tests.support.oci import busybox_image, oci_archive

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (runc, mounts)")

PREPARED = ".prepared"


@pytest.fixture
async def node(make_berthd: Callable[..., Berthd], short_tmp: Path) -> AsyncIterator[Node]:
    d = await start_node(make_berthd, short_tmp)
    n = Node(d, d.channel(), short_tmp / "logs")
    try:
        yield n
    finally:
        await cleanup(n)


def import_busybox(node: Node, tmp: Path) -> None:
    archive = oci_archive(busybox_image(), tmp / "bb.tar", ref_name="1.0")
    ok(ctr(node.d, "images", "import", "--base-name", "docker.io/berth/bb", str(archive), ns=K8S))


def group_dir(node: Node, sandbox_id: str) -> Path:
    return node.runtime_state() / PREPARED / K8S / sandbox_id


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is gone for our purpose (the shim is nobody's child here but init's)
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    return False


async def until(predicate: Callable[[], object], what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)


async def prepared_shim(node: Node, sandbox_id: str) -> int:
    """The pid of the shim RunPodSandbox started for the pod (read from its group directory)."""
    pid_file = group_dir(node, sandbox_id) / "shim.pid"
    await until(pid_file.exists, f"{pid_file}")
    pid = int(pid_file.read_text())
    assert alive(pid)
    return pid


async def test_first_start_uses_the_shim_started_by_run_pod_sandbox(node: Node, short_tmp: Path) -> None:
    import_busybox(node, short_tmp)
    pod = await node.pod()
    shim = await prepared_shim(node, pod[0])

    first = await node.run(pod, "first", "sleep", "1000")
    second = await node.run(pod, "second", "sleep", "1000")
    for cid in (first, second):
        bundle = node.runtime_state() / K8S / cid
        assert (bundle / "address").read_text() == (group_dir(node, pod[0]) / "address").read_text()
        init = int((bundle / "init.pid").read_text())
        assert Path(f"/proc/{init}/stat").read_text().split(")")[-1].split()[1] == str(shim)  # its parent

    # Removing the containers releases the shim, which takes its group directory along.
    for cid in (first, second):
        await node.rt.stop_container(cri.StopContainerRequest(container_id=cid, timeout=0))
        await node.rt.remove_container(cri.RemoveContainerRequest(container_id=cid))
    await until(lambda: not alive(shim), f"shim {shim} to exit")
    await until(lambda: not group_dir(node, pod[0]).exists(), "the group directory to go")


async def test_a_pod_without_containers_has_its_shim_shut_down_at_stop(node: Node) -> None:
    pod = await node.pod()
    shim = await prepared_shim(node, pod[0])
    await node.rt.stop_pod_sandbox(cri.StopPodSandboxRequest(pod_sandbox_id=pod[0]))
    assert not alive(shim)  # StopPodSandbox waits for the shim's exit
    assert not group_dir(node, pod[0]).exists()
    await node.rt.remove_pod_sandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=pod[0]))
    node.pods.remove(pod[0])


async def test_an_unused_prepared_shim_is_shut_down_after_kill_9(node: Node, short_tmp: Path) -> None:
    import_busybox(node, short_tmp)
    idle = await node.pod()
    busy = await node.pod()
    idle_shim = await prepared_shim(node, idle[0])
    busy_shim = await prepared_shim(node, busy[0])
    running = await node.run(busy, "stay", "sleep", "1000")

    node.d.signal(signal.SIGKILL)
    node.d.wait_exit(10)
    node.channel.close()
    node.d.start()
    await node.d.wait_ready()
    node.channel = node.d.channel()

    # The restart's recovery shuts the idle pod's shim down; the busy pod's keeps serving its task.
    await until(lambda: not alive(idle_shim), f"idle shim {idle_shim} to exit")
    assert not group_dir(node, idle[0]).exists()
    assert alive(busy_shim)
    listed = {c.id: c.state for c in (await node.rt.list_containers(cri.ListContainersRequest())).containers}
    assert listed[running] == cri.ContainerState.CONTAINER_RUNNING
    ready = cri.PodSandboxStateValue(state=cri.PodSandboxState.SANDBOX_READY)
    pods = await node.rt.list_pod_sandbox(cri.ListPodSandboxRequest(filter=cri.PodSandboxFilter(state=ready)))
    assert {p.id for p in pods.items} == {idle[0], busy[0]}

    # The busy pod's shim still goes with its last task.
    await node.rt.stop_pod_sandbox(cri.StopPodSandboxRequest(pod_sandbox_id=busy[0]))
    await until(lambda: not alive(busy_shim), f"busy shim {busy_shim} to exit")
    await until(lambda: not group_dir(node, busy[0]).exists(), "the busy pod's group directory to go")
