"""berth-shim-runc-v2 against real runc: bootstrap, task lifecycle over ttrpc, shutdown.

Each test starts its own shim on a fresh state directory (short, under /tmp:
unix socket paths are limited to 108 bytes) and a busybox bundle. Teardown,
even after a failure, force-deletes every container the test named, kills the
shim by PID and checks that neither the shim nor any container init survived.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, TypeVar

import betterproto.lib.google.protobuf as pb
import pytest

from daemon.errors import FailedPrecondition, NotFound
from daemon.ttrpc import TtrpcClient
from daemon.ttrpc.services import TASK_METHODS, TASK_SERVICE
from protos.containerd.task.v2 import (
    ConnectRequest,
    ConnectResponse,
    CreateTaskRequest,
    CreateTaskResponse,
    DeleteRequest,
    DeleteResponse,
    KillRequest,
    PidsRequest,
    PidsResponse,
    ShutdownRequest,
    StartRequest,
    StartResponse,
    StateRequest,
    StateResponse,
    WaitRequest,
    WaitResponse,
)
from protos.containerd.v1.types import Status

SHIM = str(Path(sys.executable).parent / "berth-shim-runc-v2")
BUSYBOX = Path("/bin/busybox")
CALL_TIMEOUT = 15.0
GONE_TIMEOUT = 10.0

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="runc containers need root"),
    pytest.mark.skipif(shutil.which("runc") is None, reason="runc is not installed"),
    pytest.mark.skipif(not BUSYBOX.is_file(), reason="no /bin/busybox for the rootfs"),
]

M = TypeVar("M")


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie counts as gone: our PID 1 may not reap it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


async def poll(predicate: Callable[[], bool], timeout: float = GONE_TIMEOUT) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.02)
    return predicate()


async def close_client(client: TtrpcClient) -> None:
    """Close ``client``, tolerating the peer having closed first.

    TtrpcClient.close() cancels a receiver that may be awaiting wait_closed()
    after EOF, which cancels the transport's shared close waiter, so close()
    itself then raises CancelledError. Only a cancellation of this task is real.
    """
    try:
        await client.close()
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise


class Shim:
    """One shim started through ``start`` on its own state dir, plus what to clean up."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.state = base / "state"
        self.bundles = base / "bundles"
        self.namespace = "test"
        # Container ids name cgroups, which are host-wide: keep them unique per run.
        self.suffix = base.name.removeprefix("berth-shim-").lower()
        self.shim_id = self.cid("shim")
        self.env = {**os.environ, "BERTH_SHIM_STATE": str(self.state)}
        self.container_ids: list[str] = []
        self.task_pids: list[int] = []
        self.pid: int | None = None
        self.client: TtrpcClient | None = None

    def cid(self, name: str) -> str:
        return f"{name}-{self.suffix}"

    def argv(self, action: str) -> list[str]:
        return [
            SHIM,
            "-namespace",
            self.namespace,
            "-id",
            self.shim_id,
            "-address",
            "/test/berth.sock",
            action,
        ]

    def start(self) -> str:
        done = subprocess.run(self.argv("start"), env=self.env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        address = done.stdout.strip()
        pid_file = self.state / self.namespace / self.shim_id / "shim.pid"
        self.pid = int(pid_file.read_text())
        return address

    async def connect(self, address: str) -> TtrpcClient:
        assert address.startswith("unix://"), address
        self.client = await TtrpcClient.connect(address.removeprefix("unix://"))
        return self.client

    async def call(self, method: str, request: Any, response_cls: type[M]) -> M:
        assert self.client is not None
        assert TASK_METHODS[method][1] is response_cls
        return await self.client.call(TASK_SERVICE, method, request, response_cls, timeout=CALL_TIMEOUT)

    def bundle(self, container_id: str, *args: str) -> Path:
        """A busybox bundle running ``args``; the id is remembered for teardown."""
        self.container_ids.append(container_id)
        bundle = self.bundles / container_id
        bindir = bundle / "rootfs" / "bin"
        bindir.mkdir(parents=True)
        shutil.copy2(BUSYBOX, bindir / "busybox")
        for applet in ("sh", "echo", "sleep"):
            (bindir / applet).symlink_to("busybox")
        subprocess.run(["runc", "spec"], cwd=bundle, check=True, timeout=30)
        config_path = bundle / "config.json"
        config = json.loads(config_path.read_text())
        config["process"]["args"] = list(args)
        config["process"]["terminal"] = False
        config["process"].pop("oomScoreAdj", None)
        config["root"] = {"path": "rootfs", "readonly": True}
        config_path.write_text(json.dumps(config))
        return bundle

    async def create(self, container_id: str, *args: str) -> tuple[int, Path]:
        bundle = self.bundle(container_id, *args)
        stdout = self.base / f"{container_id}.out"
        created = await self.call(
            "Create",
            CreateTaskRequest(
                id=container_id,
                bundle=str(bundle),
                stdout=str(stdout),
                stderr=str(self.base / f"{container_id}.err"),
            ),
            CreateTaskResponse,
        )
        assert created.pid > 0
        self.task_pids.append(created.pid)
        return created.pid, stdout

    async def teardown(self) -> None:
        """Remove every trace of the test; processes first, so a failing close cannot leak them."""
        leftovers = [*self.task_pids, *([self.pid] if self.pid else [])]
        try:
            runc_root = self.state / "runc" / self.namespace
            for container_id in self.container_ids:
                subprocess.run(
                    ["runc", "--root", str(runc_root), "delete", "--force", container_id],
                    capture_output=True,
                    timeout=30,
                    check=False,
                )
            if self.pid is not None and alive(self.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)
            gone = await poll(lambda: not any(alive(pid) for pid in leftovers))
        finally:
            try:
                if self.client is not None:
                    await close_client(self.client)
            finally:
                shutil.rmtree(self.base, ignore_errors=True)
        assert gone, f"processes left behind: {[pid for pid in leftovers if alive(pid)]}"


@pytest.fixture
async def shim() -> AsyncIterator[Shim]:
    base = Path(tempfile.mkdtemp(prefix="berth-shim-", dir="/tmp"))
    started = Shim(base)
    try:
        yield started
    finally:
        await started.teardown()


async def test_start_prints_address_and_reuses_a_live_shim(shim: Shim) -> None:
    address = shim.start()
    assert address.startswith(f"unix://{shim.state}/s/")
    client = await shim.connect(address)
    connected = await shim.call("Connect", ConnectRequest(id="none"), ConnectResponse)
    assert connected.shim_pid == shim.pid
    assert connected.task_pid == 0
    assert not client.closed
    first_pid = shim.pid
    assert shim.start() == address  # a second start finds the shim answering
    assert shim.pid == first_pid


async def test_task_exit_status_and_output(shim: Shim) -> None:
    cid = shim.cid("exit3")
    await shim.connect(shim.start())
    pid, stdout = await shim.create(cid, "sh", "-c", "echo hello; exit 3")
    state = await shim.call("State", StateRequest(id=cid), StateResponse)
    assert (state.status, state.pid) == (Status.CREATED, pid)
    started = await shim.call("Start", StartRequest(id=cid), StartResponse)
    assert started.pid == pid
    waited = await shim.call("Wait", WaitRequest(id=cid), WaitResponse)
    assert waited.exit_status == 3
    assert waited.exited_at.year >= 2024
    assert stdout.read_text() == "hello\n"
    state = await shim.call("State", StateRequest(id=cid), StateResponse)
    assert (state.status, state.exit_status) == (Status.STOPPED, 3)
    deleted = await shim.call("Delete", DeleteRequest(id=cid), DeleteResponse)
    assert (deleted.pid, deleted.exit_status) == (pid, 3)
    with pytest.raises(NotFound, match=cid):
        await shim.call("State", StateRequest(id=cid), StateResponse)


async def test_kill_running_task(shim: Shim) -> None:
    cid = shim.cid("sleeper")
    await shim.connect(shim.start())
    pid, _ = await shim.create(cid, "sleep", "1000")
    await shim.call("Start", StartRequest(id=cid), StartResponse)
    with pytest.raises(FailedPrecondition, match=cid):
        await shim.call("Start", StartRequest(id=cid), StartResponse)
    with pytest.raises(FailedPrecondition, match="running"):
        await shim.call("Delete", DeleteRequest(id=cid), DeleteResponse)
    state = await shim.call("State", StateRequest(id=cid), StateResponse)
    assert state.status == Status.RUNNING
    pids = await shim.call("Pids", PidsRequest(id=cid), PidsResponse)
    assert pid in [p.pid for p in pids.processes]
    connected = await shim.call("Connect", ConnectRequest(id=cid), ConnectResponse)
    assert connected.task_pid == pid
    await shim.call("Kill", KillRequest(id=cid, signal=signal.SIGKILL), pb.Empty)
    waited = await shim.call("Wait", WaitRequest(id=cid), WaitResponse)
    assert waited.exit_status == 128 + signal.SIGKILL
    with pytest.raises(NotFound, match="finished"):
        await shim.call("Kill", KillRequest(id=cid, signal=signal.SIGKILL), pb.Empty)
    deleted = await shim.call("Delete", DeleteRequest(id=cid), DeleteResponse)
    assert deleted.exit_status == 137
    assert not alive(pid)


async def test_unknown_task_is_not_found(shim: Shim) -> None:
    await shim.connect(shim.start())
    with pytest.raises(NotFound, match="ghost"):
        await shim.call("State", StateRequest(id="ghost"), StateResponse)
    with pytest.raises(NotFound, match="ghost"):
        await shim.call("Wait", WaitRequest(id="ghost"), WaitResponse)


async def test_shutdown_waits_for_tasks_then_ends_the_shim(shim: Shim) -> None:
    cid = shim.cid("created")
    address = shim.start()
    await shim.connect(address)
    await shim.create(cid, "sleep", "1000")
    await shim.call("Shutdown", ShutdownRequest(id=shim.shim_id), pb.Empty)
    # A task remains: the shim stays and answers.
    connected = await shim.call("Connect", ConnectRequest(id=cid), ConnectResponse)
    assert connected.shim_pid == shim.pid
    # Deleting a created task kills its init.
    deleted = await shim.call("Delete", DeleteRequest(id=cid), DeleteResponse)
    assert deleted.exit_status == 128 + signal.SIGKILL
    await shim.call("Shutdown", ShutdownRequest(id=shim.shim_id), pb.Empty)
    pid = shim.pid
    assert pid is not None
    assert await poll(lambda: not alive(pid)), f"shim {pid} still alive after Shutdown"
    assert not Path(address.removeprefix("unix://")).exists()


async def test_delete_action_cleans_up_after_a_dead_shim(shim: Shim) -> None:
    await shim.connect(shim.start())
    cid = shim.shim_id  # upstream's one-task shim: the task is named like the shim
    pid, _ = await shim.create(cid, "sleep", "1000")
    await shim.call("Start", StartRequest(id=cid), StartResponse)
    assert shim.pid is not None
    os.kill(shim.pid, signal.SIGKILL)
    shim_pid = shim.pid
    assert await poll(lambda: not alive(shim_pid))
    done = subprocess.run(
        shim.argv("delete"), env=shim.env, cwd=shim.bundles / cid, capture_output=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    deleted = DeleteResponse().parse(done.stdout)
    assert deleted.exit_status == 128 + signal.SIGKILL
    assert await poll(lambda: not alive(pid)), f"container init {pid} survived delete"
    runc_root = shim.state / "runc" / shim.namespace
    state = subprocess.run(["runc", "--root", str(runc_root), "state", cid], capture_output=True, timeout=30)
    assert state.returncode != 0
