"""The shim's process model against real runc: exec bootstrap and zygote, grouping, events, cleanup.

Every test works in a fresh short directory under /tmp (unix socket paths are
limited to 108 bytes) holding the shim state, busybox bundles and a ttrpc
server standing in for berthd's Events service. Teardown, even after a
failure, force-deletes every container the test named, releases mounts and
kills every shim, zygote and helper process by PID, then checks none survived.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
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

from daemon.mount import mount_points_under, release
from daemon.ttrpc import TtrpcClient, TtrpcServer
from daemon.ttrpc.services import EVENTS_METHODS, EVENTS_SERVICE, TASK_METHODS, TASK_SERVICE, bind
from daemon.typeurl import decode_any
from plugins.runtime.runc_v2.shim.service import TaskService
from plugins.runtime.runc_v2.shim.zygote import ZygoteClient
from protos.containerd.events import TaskExit
from protos.containerd.services.events.ttrpc.v1 import ForwardRequest
from protos.containerd.task.v2 import (
    ConnectRequest,
    ConnectResponse,
    CreateTaskRequest,
    CreateTaskResponse,
    DeleteRequest,
    DeleteResponse,
    KillRequest,
    ShutdownRequest,
    StartRequest,
    StartResponse,
    WaitRequest,
    WaitResponse,
)
from protos.containerd.types import Envelope

SHIM = str(Path(sys.executable).parent / "berth-shim-runc-v2")
RUNC = shutil.which("runc") or "runc"
BUSYBOX = Path("/bin/busybox")
CALL_TIMEOUT = 15.0
DEADLINE = 10.0
NAMESPACE = "test"
ADDRESS = "/test/berth.sock"
GROUP = "io.containerd.runc.v2.group"

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="runc containers need root"),
    pytest.mark.skipif(shutil.which("runc") is None, reason="runc is not installed"),
    pytest.mark.skipif(not BUSYBOX.is_file(), reason="no /bin/busybox for the rootfs"),
]

publishing = pytest.mark.skipif(
    "publish" not in inspect.signature(TaskService).parameters,
    reason="TaskService does not publish events yet (its publish argument has not landed)",
)

M = TypeVar("M")


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie counts as gone: our PID 1 may not reap it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


async def poll(predicate: Callable[[], bool], timeout: float = DEADLINE) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.02)
    return predicate()


async def close_client(client: TtrpcClient) -> None:
    """Close ``client``, tolerating the peer having closed first (see test_shim.close_client)."""
    try:
        await client.close()
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise


class FakeBerthd:
    """Events/Forward at the TTRPC_ADDRESS the shims get: records envelopes; can stop and restart."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.received: list[Envelope] = []
        self.server: TtrpcServer | None = None

    async def forward(self, request: ForwardRequest) -> pb.Empty:
        self.received.append(request.envelope)
        return pb.Empty()

    async def start(self) -> None:
        self.server = TtrpcServer({EVENTS_SERVICE: bind(EVENTS_METHODS, self)})
        await self.server.start(self.path)

    async def stop(self) -> None:
        server, self.server = self.server, None
        if server is not None:
            await server.stop()

    def topics(self, container_id: str) -> list[str]:
        found = []
        for envelope in self.received:
            event = decode_any(envelope.event)
            if getattr(event, "container_id", None) == container_id:
                found.append(envelope.topic)
        return found


class Lab:
    """Bundles, shims and their clients of one test, plus everything to clean up."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.state = base / "state"
        self.runc_root = self.state / "runc" / NAMESPACE
        self.suffix = base.name.removeprefix("berth-sp-").lower()
        self.berthd = FakeBerthd(base / "berthd.ttrpc")
        self.env = {**os.environ, "BERTH_SHIM_STATE": str(self.state), "TTRPC_ADDRESS": str(self.berthd.path)}
        self.container_ids: list[str] = []
        self.pids: set[int] = set()  # shims, zygotes, helpers and task inits: all must be gone at the end
        self.clients: list[TtrpcClient] = []
        self.zygotes: list[ZygoteClient] = []
        self.helpers: list[subprocess.Popen[bytes]] = []

    def cid(self, name: str) -> str:
        """Container ids name cgroups, which are host-wide: unique per run."""
        return f"{name}-{self.suffix}"

    def bundle(self, container_id: str, *args: str, group: str = "") -> Path:
        self.container_ids.append(container_id)
        bundle = self.base / "bundles" / container_id
        bindir = bundle / "rootfs" / "bin"
        bindir.mkdir(parents=True)
        shutil.copy2(BUSYBOX, bindir / "busybox")
        for applet in ("sh", "echo", "sleep", "true"):
            (bindir / applet).symlink_to("busybox")
        subprocess.run([RUNC, "spec"], cwd=bundle, check=True, timeout=30)
        config_path = bundle / "config.json"
        config = json.loads(config_path.read_text())
        config["process"]["args"] = list(args)
        config["process"]["terminal"] = False
        config["process"].pop("oomScoreAdj", None)
        config["root"] = {"path": "rootfs", "readonly": True}
        if group:
            config["annotations"] = {GROUP: group}
        config_path.write_text(json.dumps(config))
        return bundle

    def bootstrap(self, action: str, container_id: str, bundle: Path) -> subprocess.CompletedProcess[bytes]:
        argv = [SHIM, "-namespace", NAMESPACE, "-id", container_id, "-address", ADDRESS, action]
        return subprocess.run(argv, env=self.env, cwd=bundle, capture_output=True, timeout=60)

    def exec_start(self, container_id: str, bundle: Path) -> str:
        done = self.bootstrap("start", container_id, bundle)
        assert done.returncode == 0, done.stderr
        return done.stdout.decode().strip()

    async def zygote(self) -> ZygoteClient:
        zygote = await ZygoteClient.spawn(self.state)
        self.zygotes.append(zygote)
        self.pids.add(zygote.pid)
        return zygote

    async def zygote_start(self, zygote: ZygoteClient, container_id: str, bundle: Path) -> str:
        return await zygote.start_shim(
            namespace=NAMESPACE,
            id=container_id,
            address=ADDRESS,
            ttrpc_address=str(self.berthd.path),
            bundle=str(bundle),
        )

    async def connect(self, address: str) -> tuple[TtrpcClient, int]:
        """A client of the shim at ``address`` and the shim's pid (from Connect)."""
        assert address.startswith(f"unix://{self.state}/s/"), address
        client = await TtrpcClient.connect(address.removeprefix("unix://"))
        self.clients.append(client)
        connected = await call(client, "Connect", ConnectRequest(id=""), ConnectResponse)
        self.pids.add(connected.shim_pid)
        return client, connected.shim_pid

    async def run_task(self, client: TtrpcClient, container_id: str, bundle: Path) -> tuple[int, int]:
        """Create, start and wait a task: (init pid, exit status); the task is deleted afterwards."""
        created = await call(
            client, "Create", CreateTaskRequest(id=container_id, bundle=str(bundle)), CreateTaskResponse
        )
        self.pids.add(created.pid)
        await call(client, "Start", StartRequest(id=container_id), StartResponse)
        waited = await call(client, "Wait", WaitRequest(id=container_id), WaitResponse)
        await call(client, "Delete", DeleteRequest(id=container_id), DeleteResponse)
        return created.pid, waited.exit_status

    async def teardown(self) -> None:
        try:
            for helper in self.helpers:
                with contextlib.suppress(ProcessLookupError):
                    helper.kill()
                helper.wait(timeout=10)
            for container_id in self.container_ids:
                subprocess.run(
                    [RUNC, "--root", str(self.runc_root), "delete", "--force", container_id],
                    capture_output=True,
                    timeout=30,
                    check=False,
                )
                await release(self.base / "bundles" / container_id / "rootfs")
            for zygote in self.zygotes:
                with contextlib.suppress(Exception):
                    await zygote.close()
            for pid_file in self.state.glob(f"{NAMESPACE}/*/shim.pid"):
                with contextlib.suppress(ValueError, OSError):
                    self.pids.add(int(pid_file.read_text()))
            for pid in self.pids:
                if alive(pid):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
            gone = await poll(lambda: not any(alive(pid) for pid in self.pids))
        finally:
            try:
                for client in self.clients:
                    await close_client(client)
                await self.berthd.stop()
            finally:
                shutil.rmtree(self.base, ignore_errors=True)
        assert gone, f"processes left behind: {[pid for pid in self.pids if alive(pid)]}"


async def call(client: TtrpcClient, method: str, request: Any, response_cls: type[M]) -> M:
    assert TASK_METHODS[method][1] is response_cls
    return await client.call(TASK_SERVICE, method, request, response_cls, timeout=CALL_TIMEOUT)


@pytest.fixture
async def lab() -> AsyncIterator[Lab]:
    base = Path(tempfile.mkdtemp(prefix="berth-sp-", dir="/tmp"))
    started = Lab(base)
    await started.berthd.start()
    try:
        yield started
    finally:
        await started.teardown()


async def test_exec_start_writes_bundle_files_and_serves_a_task(lab: Lab) -> None:
    cid = lab.cid("exec")
    bundle = lab.bundle(cid, "sh", "-c", "exit 4")
    address = lab.exec_start(cid, bundle)
    client, shim_pid = await lab.connect(address)
    assert (bundle / "address").read_text() == address
    assert int((bundle / "shim.pid").read_text()) == shim_pid
    assert os.getsid(shim_pid) == shim_pid  # detached: its own session
    _, status = await lab.run_task(client, cid, bundle)
    assert status == 4
    assert lab.exec_start(cid, bundle) == address  # reused while it lives
    await call(client, "Shutdown", ShutdownRequest(id=cid), pb.Empty)
    assert await poll(lambda: not alive(shim_pid)), "shim did not exit after Shutdown with no task"
    assert not Path(address.removeprefix("unix://")).exists()


async def test_zygote_forks_a_shim_that_serves_a_task(lab: Lab) -> None:
    zygote = await lab.zygote()
    cid = lab.cid("zyg")
    bundle = lab.bundle(cid, "sh", "-c", "exit 5")
    address = await lab.zygote_start(zygote, cid, bundle)
    client, shim_pid = await lab.connect(address)
    assert parent_of(shim_pid) == zygote.pid
    assert os.getsid(shim_pid) == shim_pid
    assert (bundle / "address").read_text() == address
    assert int((bundle / "shim.pid").read_text()) == shim_pid
    assert Path(f"/proc/{shim_pid}/cwd").resolve() == bundle.resolve()
    # The zygote's socket is not among the shim's fds: only the shim's own things are open.
    fds = {os.readlink(f"/proc/{shim_pid}/fd/{fd}") for fd in os.listdir(f"/proc/{shim_pid}/fd")}
    assert not any("zygote.sock" in target for target in fds)
    _, status = await lab.run_task(client, cid, bundle)
    assert status == 5
    assert await lab.zygote_start(zygote, cid, bundle) == address  # live shim reused
    await call(client, "Shutdown", ShutdownRequest(id=cid), pb.Empty)
    assert await poll(lambda: not alive(shim_pid))
    # The zygote reaped it: no zombie is left under the zygote.
    assert await poll(lambda: not Path(f"/proc/{shim_pid}").exists())
    second = lab.cid("zyg2")
    bundle2 = lab.bundle(second, "true")
    client2, shim2 = await lab.connect(await lab.zygote_start(zygote, second, bundle2))
    assert shim2 != shim_pid
    assert (await lab.run_task(client2, second, bundle2))[1] == 0


async def test_zygote_reports_a_shim_that_cannot_start(lab: Lab) -> None:
    zygote = await lab.zygote()
    cid = lab.cid("nostate")
    bundle = lab.bundle(cid, "true")
    lab.state.joinpath("runc").write_text("not a directory")  # the shim cannot create runc's root
    with pytest.raises(Exception, match="shim exited before listening"):
        await lab.zygote_start(zygote, cid, bundle)


@pytest.mark.parametrize("how", ["exec", "zygote"])
async def test_a_group_shares_one_shim(lab: Lab, how: str) -> None:
    group = lab.cid("pod")
    first, second = lab.cid("a"), lab.cid("b")
    bundle_a = lab.bundle(first, "sh", "-c", "exit 1", group=group)
    bundle_b = lab.bundle(second, "sh", "-c", "exit 2", group=group)
    if how == "exec":
        address_a = lab.exec_start(first, bundle_a)
        address_b = lab.exec_start(second, bundle_b)
    else:
        zygote = await lab.zygote()
        # Concurrent starts of one group: the second waits for the shim the first forks.
        address_a, address_b = await asyncio.gather(
            lab.zygote_start(zygote, first, bundle_a), lab.zygote_start(zygote, second, bundle_b)
        )
    assert address_a == address_b
    client, shim_pid = await lab.connect(address_a)
    assert (bundle_b / "shim.pid").read_text().strip() == str(shim_pid)
    assert (bundle_a / "address").read_text() == (bundle_b / "address").read_text() == address_a
    results = await asyncio.gather(
        lab.run_task(client, first, bundle_a), lab.run_task(client, second, bundle_b)
    )
    assert [status for _, status in results] == [1, 2]
    assert lab.state.joinpath(NAMESPACE, group, "shim.pid").read_text().strip() == str(shim_pid)


async def test_shim_outlives_the_zygote_and_its_parent(lab: Lab) -> None:
    cid = lab.cid("orphan")
    bundle = lab.bundle(cid, "sh", "-c", "exit 6")
    script = (
        "import asyncio, sys\n"
        "from pathlib import Path\n"
        "from plugins.runtime.runc_v2.shim.zygote import ZygoteClient\n"
        "async def main():\n"
        "    z = await ZygoteClient.spawn(Path(sys.argv[1]))\n"
        "    a = await z.start_shim(namespace=sys.argv[2], id=sys.argv[3], address=sys.argv[4],\n"
        "                           ttrpc_address='', bundle=sys.argv[5])\n"
        "    print('READY', z.pid, a, flush=True)\n"
        "    await asyncio.sleep(3600)\n"
        "asyncio.run(main())\n"
    )
    helper = subprocess.Popen(
        [sys.executable, "-c", script, str(lab.state), NAMESPACE, cid, ADDRESS, str(bundle)],
        stdout=subprocess.PIPE,
    )
    lab.helpers.append(helper)
    lab.pids.add(helper.pid)
    assert helper.stdout is not None
    stdout = helper.stdout

    def ready_line() -> str:
        for line in stdout:  # the helper also logs to stdout
            if line.startswith(b"READY "):
                return line.decode()
        raise AssertionError("the helper exited before starting a shim")

    _, zygote_pid, address = (await asyncio.wait_for(asyncio.to_thread(ready_line), 60)).split()
    lab.pids.add(int(zygote_pid))
    client, shim_pid = await lab.connect(address)
    helper.kill()  # berthd dies: the zygote goes with it (PDEATHSIG), the shim stays
    helper.wait(timeout=10)
    assert await poll(lambda: not alive(int(zygote_pid))), "zygote survived its parent"
    assert alive(shim_pid)
    connected = await call(client, "Connect", ConnectRequest(id=""), ConnectResponse)
    assert connected.shim_pid == shim_pid
    assert (await lab.run_task(client, cid, bundle))[1] == 6


async def test_delete_bootstrap_cleans_up_after_a_killed_shim(lab: Lab) -> None:
    cid = lab.cid("killed")
    bundle = lab.bundle(cid, "sleep", "1000")
    rootfs = bundle / "rootfs"
    subprocess.run(["mount", "--bind", str(rootfs), str(rootfs)], check=True, timeout=30)
    # What the shim writes at Create for delete: here a runc root of its own and runc's full path.
    # runc's root is <root>/<namespace>, as containerd's shim has it.
    own_root = lab.base / "own-runc" / NAMESPACE
    lab.runc_root = own_root  # teardown deletes there too
    (bundle / "options.json").write_text(json.dumps({"root": str(own_root.parent), "binary_name": RUNC}))
    address = lab.exec_start(cid, bundle)
    _, shim_pid = await lab.connect(address)
    # The container as the dead shim would have left it (its stdio must not be a pipe of ours).
    errors = lab.base / "runc-run.err"
    with errors.open("wb") as err:
        created = subprocess.run(
            [RUNC, "--root", str(own_root), "run", "--detach", "--bundle", str(bundle), cid],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
            timeout=30,
        )
    assert created.returncode == 0, errors.read_text()
    init_pid = int(
        json.loads(subprocess.run([RUNC, "--root", str(own_root), "state", cid], capture_output=True).stdout)[
            "pid"
        ]
    )
    lab.pids.add(init_pid)
    os.kill(shim_pid, signal.SIGKILL)
    assert await poll(lambda: not alive(shim_pid))
    done = lab.bootstrap("delete", cid, bundle)
    assert done.returncode == 0, done.stderr
    deleted = DeleteResponse().parse(done.stdout)
    assert deleted.exit_status == 137
    assert await poll(lambda: not alive(init_pid)), "container init survived delete"
    state = subprocess.run([RUNC, "--root", str(own_root), "state", cid], capture_output=True, timeout=30)
    assert state.returncode != 0
    assert mount_points_under(rootfs) == []
    assert not Path(address.removeprefix("unix://")).exists()  # the dead shim's socket is gone


@publishing
@pytest.mark.parametrize("how", ["exec", "zygote"])
async def test_task_events_reach_berthd(lab: Lab, how: str) -> None:
    cid = lab.cid(f"ev{how}")
    bundle = lab.bundle(cid, "sh", "-c", "exit 7")
    if how == "exec":
        address = lab.exec_start(cid, bundle)
    else:
        address = await lab.zygote_start(await lab.zygote(), cid, bundle)
    client, _ = await lab.connect(address)
    await lab.run_task(client, cid, bundle)
    assert await poll(lambda: "/tasks/delete" in lab.berthd.topics(cid)), lab.berthd.topics(cid)
    topics = lab.berthd.topics(cid)
    # The shim's order of start and exit of a task that exits at once is the service's business.
    assert topics[0] == "/tasks/create"
    assert topics[-1] == "/tasks/delete"
    assert sorted(topics[1:-1]) == ["/tasks/exit", "/tasks/start"]
    exits = [decode_any(e.event) for e in lab.berthd.received if e.topic == "/tasks/exit"]
    assert [(e.container_id, e.exit_status) for e in exits if isinstance(e, TaskExit)] == [(cid, 7)]
    assert all(e.namespace == NAMESPACE for e in lab.berthd.received)


@publishing
async def test_an_exit_while_berthd_is_down_is_delivered_when_it_is_back(lab: Lab) -> None:
    cid = lab.cid("down")
    bundle = lab.bundle(cid, "sleep", "1000")
    client, _ = await lab.connect(lab.exec_start(cid, bundle))
    created = await call(client, "Create", CreateTaskRequest(id=cid, bundle=str(bundle)), CreateTaskResponse)
    lab.pids.add(created.pid)
    await call(client, "Start", StartRequest(id=cid), StartResponse)
    assert await poll(lambda: lab.berthd.topics(cid) == ["/tasks/create", "/tasks/start"])
    await lab.berthd.stop()
    await call(client, "Kill", KillRequest(id=cid, signal=signal.SIGKILL), pb.Empty)
    waited = await call(client, "Wait", WaitRequest(id=cid), WaitResponse)
    assert waited.exit_status == 137
    assert "/tasks/exit" not in lab.berthd.topics(cid)
    await lab.berthd.start()
    assert await poll(lambda: "/tasks/exit" in lab.berthd.topics(cid)), "exit never delivered"
    exit_event = next(decode_any(e.event) for e in lab.berthd.received if e.topic == "/tasks/exit")
    assert isinstance(exit_event, TaskExit)
    assert (exit_event.pid, exit_event.exit_status) == (created.pid, 137)
