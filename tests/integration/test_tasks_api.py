"""The Tasks service of a real berthd with real runc, over both shims (berth's and containerd's).

Every test is parametrised over the runtime plugin's ``runtime_binary``: ""
(berth's shim) and "containerd-shim-runc-v2" (Debian containerd's; the
containerd daemon is never started). A container is made the way a client
makes one: the busybox image imported with ``ctr``, a snapshot prepared on
its top layer, a spec from :mod:`daemon.oci.spec`, a container record.

:class:`Rig` is shared with test_runtime_restart.py and
test_runtime_interop.py. Its teardown runs even when a test failed: it
kills, by PID, every shim whose command line names this daemon, force-deletes
runc containers left in the plugin's runc root, unmounts what is left under
the daemon's directories and removes the test's cgroups, then checks that
nothing was left behind by berthd itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import betterproto
import betterproto.lib.google.protobuf as pb
import pytest
from grpclib.client import Channel
from grpclib.const import Status as Code

from daemon.mount import mount_points_under
from daemon.oci import spec as ocispec
from protos.containerd.events import TaskExit
from protos.containerd.services.containers.v1 import (
    Container,
    ContainerRuntime,
    ContainersStub,
    CreateContainerRequest,
)
from protos.containerd.services.leases.v1 import CreateRequest as LeaseCreateRequest
from protos.containerd.services.leases.v1 import DeleteRequest as LeaseDeleteRequest
from protos.containerd.services.leases.v1 import LeasesStub
from protos.containerd.services.snapshots.v1 import (
    ListSnapshotsRequest,
    PrepareSnapshotRequest,
    SnapshotsStub,
)
from protos.containerd.services.tasks.v1 import (
    CheckpointTaskRequest,
    CreateTaskRequest,
    DeleteProcessRequest,
    DeleteTaskRequest,
    ExecProcessRequest,
    GetRequest,
    KillRequest,
    ListPidsRequest,
    ListTasksRequest,
    MetricsRequest,
    PauseTaskRequest,
    ResumeTaskRequest,
    StartRequest,
    TasksStub,
    WaitRequest,
)
from protos.containerd.v1.types import Status
from tests.integration.conftest import Berthd, Subscribed, ctr, grpc_error, headers, ok
from tests.support.oci import busybox_image, oci_archive

RUNC = shutil.which("runc")
SPEC_URL = "types.containerd.io/opencontainers/runtime-spec/1/Spec"
PROCESS_URL = "types.containerd.io/opencontainers/runtime-spec/1/Process"
RUNTIME = "io.containerd.runc.v2"
PLUGIN = "berth.runtime.v2.task"
IMAGE = "docker.io/berth/bb:1.0"
CGROUP_ROOT = Path("/sys/fs/cgroup")
RUNTIMES = ["", "containerd-shim-runc-v2"]

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="runc containers need root"),
    pytest.mark.skipif(RUNC is None, reason="runc is not installed"),
    pytest.mark.skipif(shutil.which("ctr") is None, reason="ctr (Debian's containerd) is not installed"),
]


def runtime_config(runtime_binary: str, extra: str = "") -> str:
    return f'[plugins."{PLUGIN}"]\nruntime_binary = "{runtime_binary}"\n{extra}'


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def parent_pid(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def pids_naming(text: str) -> list[int]:
    """Processes whose command line contains ``text`` (this daemon's shims name its address)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if text.encode() in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
    return found


async def poll(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


# -- cgroups v1 metrics, just what the tests read (io.containerd.cgroups.v1.Metrics) ------------


@dataclass(eq=False, repr=False)
class MemoryEntry(betterproto.Message):  # type: ignore[misc]
    limit: int = betterproto.uint64_field(1)
    usage: int = betterproto.uint64_field(2)


@dataclass(eq=False, repr=False)
class MemoryStat(betterproto.Message):
    usage: MemoryEntry = betterproto.message_field(33)  # noqa: RUF009


@dataclass(eq=False, repr=False)
class PidsStat(betterproto.Message):
    current: int = betterproto.uint64_field(1)


@dataclass(eq=False, repr=False)
class MetricsV1(betterproto.Message):
    pids: PidsStat = betterproto.message_field(2)  # noqa: RUF009
    memory: MemoryStat = betterproto.message_field(4)  # noqa: RUF009


@dataclass
class Rig:
    """One berthd with the busybox image imported in namespace ``ns``, and what to clean up."""

    d: Berthd
    ns: str
    base: Path
    channel: Channel
    parent: str = ""
    ids: list[str] = field(default_factory=list)

    @property
    def tasks(self) -> TasksStub:
        return TasksStub(self.channel, timeout=60, metadata=headers(self.ns))

    @property
    def plugin_state(self) -> Path:
        return self.d.state / PLUGIN

    async def import_image(self) -> None:
        archive = oci_archive(busybox_image(), self.base / "bb.tar", ref_name="1.0")
        ok(ctr(self.d, "images", "import", "--base-name", "docker.io/berth/bb", str(archive), ns=self.ns))
        stub = SnapshotsStub(self.channel, timeout=30, metadata=headers(self.ns))
        infos = [i async for r in stub.list(ListSnapshotsRequest(snapshotter="overlayfs")) for i in r.info]
        parents = {i.parent for i in infos}
        tops = [i.name for i in infos if i.name not in parents]
        assert len(tops) == 1, tops
        self.parent = tops[0]

    def cid(self, name: str) -> str:
        cid = f"{name}-{self.ns}"
        self.ids.append(cid)
        return cid

    async def container(self, cid: str, args: Sequence[str], *opts: ocispec.SpecOpt) -> None:
        """A container record running ``args`` on a fresh snapshot of the image.

        The snapshot is prepared under a lease until the record names it (as ``ctr`` does):
        otherwise a garbage collection in between may take it.
        """
        leases = LeasesStub(self.channel, timeout=30, metadata=headers(self.ns))
        lease = (await leases.create(LeaseCreateRequest(id=f"create-{cid}"))).lease.id
        try:
            await self._container(cid, args, lease, *opts)
        finally:
            await leases.delete(LeaseDeleteRequest(id=lease))

    async def _container(self, cid: str, args: Sequence[str], lease: str, *opts: ocispec.SpecOpt) -> None:
        snapshots = SnapshotsStub(self.channel, timeout=30, metadata=headers(self.ns, lease))
        await snapshots.prepare(PrepareSnapshotRequest(snapshotter="overlayfs", key=cid, parent=self.parent))
        config = ocispec.generate(
            cid,
            ocispec.with_process_args(list(args)),
            ocispec.with_env(["PATH=/bin:/usr/bin"]),
            *opts,
            namespace=self.ns,
        )
        record = Container(
            id=cid,
            image=IMAGE,
            runtime=ContainerRuntime(name=RUNTIME),
            spec=pb.Any(type_url=SPEC_URL, value=json.dumps(config).encode()),
            snapshotter="overlayfs",
            snapshot_key=cid,
        )
        await ContainersStub(self.channel, timeout=30, metadata=headers(self.ns)).create(
            CreateContainerRequest(container=record)
        )

    async def run(self, name: str, *args: str, opts: Sequence[ocispec.SpecOpt] = ()) -> tuple[str, int, Path]:
        """Create and start a task; (container id, pid, stdout file)."""
        cid = self.cid(name)
        await self.container(cid, args, *opts)
        out = self.base / f"{cid}.out"
        created = await self.tasks.create(
            CreateTaskRequest(container_id=cid, stdout=f"file://{out}", stderr=f"file://{out}.err")
        )
        await self.tasks.start(StartRequest(container_id=cid))
        return cid, created.pid, out

    def runc_roots(self) -> list[Path]:
        root = self.plugin_state / ".runc"
        return [root, root / self.ns]

    def runc_containers(self) -> list[str]:
        assert RUNC is not None
        names: list[str] = []
        for root in self.runc_roots():
            if root.is_dir():
                listed = subprocess.run(
                    [RUNC, "--root", str(root), "list", "-q"], capture_output=True, text=True, timeout=30
                )
                names += [n for n in listed.stdout.split() if n in self.ids]
        return names

    def cgroups(self) -> list[Path]:
        """Leaf cgroups of this test's containers still present, in any hierarchy."""
        return [d for d in CGROUP_ROOT.glob(f"*/{self.ns}/*") if d.is_dir()]

    def shim_pids(self) -> list[int]:
        """Shims of this daemon: processes naming its state directory that are not berthd or its children.

        containerd's shims name the daemon's address, berth's (forked by the zygote, a child of
        berthd that dies with it) the plugin's state.
        """
        out = []
        for pid in pids_naming(str(self.d.state)):
            with contextlib.suppress(OSError):
                if pid != self.d.pid and parent_pid(pid) != self.d.pid and alive(pid):
                    out.append(pid)
        return out

    async def teardown(self) -> list[str]:
        """Remove every trace (processes first); what berthd itself had left behind."""
        assert RUNC is not None
        left: list[str] = []
        # sockets of shims still recorded in bundles: containerd's shim keeps its own in /run/containerd/s
        sockets = [
            Path(a.read_text().strip().removeprefix("unix://"))
            for a in (self.plugin_state / self.ns).glob("*/address")
            if a.is_file()
        ]
        for pid in self.shim_pids():
            left.append(f"shim {pid}")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for sock in sockets:
            if sock.is_socket():
                sock.unlink(missing_ok=True)
        left += [f"runc container {cid}" for cid in self.runc_containers()]
        for root in self.runc_roots():
            for cid in self.ids:
                subprocess.run(
                    [RUNC, "--root", str(root), "delete", "--force", cid], capture_output=True, timeout=30
                )
        self.channel.close()
        self.d.stop()
        for point in reversed(mount_points_under(self.d.base)):
            left.append(f"mount {point}")
            subprocess.run(["umount", "-l", point], capture_output=True, timeout=30)
        for leaf in self.cgroups():
            left.append(f"cgroup {leaf}")
            with contextlib.suppress(OSError):
                leaf.rmdir()
        for parent in CGROUP_ROOT.glob(f"*/{self.ns}"):
            with contextlib.suppress(OSError):
                parent.rmdir()
        return left


@contextlib.asynccontextmanager
async def rig(make_berthd: Callable[..., Berthd], runtime_binary: str, extra: str = "") -> AsyncIterator[Rig]:
    """A started berthd (runtime ``runtime_binary``) with the image imported; torn down even on failure."""
    ns = f"t{uuid.uuid4().hex[:8]}"
    d = make_berthd(config=runtime_config(runtime_binary, extra))
    r = Rig(d, ns, d.base, d.channel())
    try:
        d.start()
        await d.wait_ready()
        await r.import_image()
        yield r
    finally:
        left = await r.teardown()
    assert not left, f"left behind: {left}\n{d.log()[-4000:]}"


@pytest.fixture(params=RUNTIMES, ids=["berth-shim", "containerd-shim"])
async def tasks_rig(request: pytest.FixtureRequest, make_berthd: Callable[..., Berthd]) -> AsyncIterator[Rig]:
    async with rig(make_berthd, request.param) as r:
        yield r


def exit_of(env: Any) -> TaskExit:
    return TaskExit().parse(env.event.value)


async def test_task_lifecycle_output_exit_and_events(tasks_rig: Rig) -> None:
    r = tasks_rig
    events = Subscribed(r.channel, "^/tasks/")
    try:
        cid = r.cid("life")
        await r.container(cid, ["sh", "-c", "echo hello; exit 3"])
        out = r.base / "life.out"
        # containerd 1.6's shim crashes on a file:// stdout without a stderr: give both, as ctr does
        created = await r.tasks.create(
            CreateTaskRequest(container_id=cid, stdout=f"file://{out}", stderr=f"file://{out}.err")
        )
        assert created.container_id == cid and created.pid > 0
        got = (await r.tasks.get(GetRequest(container_id=cid))).process
        assert (got.status, got.pid, got.id) == (Status.CREATED, created.pid, cid)
        assert (r.plugin_state / r.ns / cid / "config.json").is_file()
        err = await grpc_error(r.tasks.create(CreateTaskRequest(container_id=cid)))
        assert err.status == Code.ALREADY_EXISTS and cid in str(err.message)

        assert (await r.tasks.start(StartRequest(container_id=cid))).pid == created.pid
        waited = await r.tasks.wait(WaitRequest(container_id=cid))
        assert waited.exit_status == 3 and waited.exited_at.year >= 2024
        assert out.read_text() == "hello\n"
        got = (await r.tasks.get(GetRequest(container_id=cid))).process
        assert (got.status, got.exit_status) == (Status.STOPPED, 3)
        listed = (await r.tasks.list(ListTasksRequest())).tasks
        assert [(t.id, t.status) for t in listed] == [(cid, Status.STOPPED)]
        assert (await r.tasks.list(ListTasksRequest(filter="status==RUNNING"))).tasks == []

        deleted = await r.tasks.delete(DeleteTaskRequest(container_id=cid))
        assert (deleted.id, deleted.pid, deleted.exit_status) == (cid, created.pid, 3)
        err = await grpc_error(r.tasks.get(GetRequest(container_id=cid)))
        assert err.status == Code.NOT_FOUND
        assert not (r.plugin_state / r.ns / cid).exists()
        assert mount_points_under(r.d.state) == []
        assert r.runc_containers() == [] and r.cgroups() == []
        await poll(lambda: not r.shim_pids(), what="the shim to exit after its last task")

        seen = await events.wait_for(4, r.ns, timeout=20)
        topics = [e.topic for e in seen]
        # Order of start and exit is the shim's business (berth's may report a quick exit first).
        assert topics[0] == "/tasks/create" and sorted(topics[1:3]) == ["/tasks/exit", "/tasks/start"], topics
        assert "/tasks/delete" in topics
        ended = exit_of(next(e for e in seen if e.topic == "/tasks/exit"))
        assert (ended.container_id, ended.pid, ended.exit_status) == (cid, created.pid, 3)
        assert topics.count("/tasks/exit") == 1
    finally:
        await events.close()


async def test_exec_pause_pids_metrics_kill(tasks_rig: Rig) -> None:
    r = tasks_rig
    cid, pid, _ = await r.run("box", "sleep", "1000", opts=[ocispec.with_memory_limit(64 << 20)])
    assert pid in [p.pid for p in (await r.tasks.list_pids(ListPidsRequest(container_id=cid))).processes]

    process = {
        "args": ["sh", "-c", "echo exec; exit 5"],
        "cwd": "/",
        "env": ["PATH=/bin"],
        "user": {"uid": 0, "gid": 0},
    }
    out = r.base / "exec.out"
    await r.tasks.exec(
        ExecProcessRequest(
            container_id=cid,
            exec_id="e1",
            stdout=f"file://{out}",
            stderr=f"file://{out}.err",
            spec=pb.Any(type_url=PROCESS_URL, value=json.dumps(process).encode()),
        )
    )
    exec_pid = (await r.tasks.start(StartRequest(container_id=cid, exec_id="e1"))).pid
    assert exec_pid > 0 and exec_pid != pid
    assert (await r.tasks.wait(WaitRequest(container_id=cid, exec_id="e1"))).exit_status == 5
    assert out.read_text() == "exec\n"
    gone = await r.tasks.delete_process(DeleteProcessRequest(container_id=cid, exec_id="e1"))
    assert (gone.id, gone.exit_status) == ("e1", 5)
    err = await grpc_error(r.tasks.get(GetRequest(container_id=cid, exec_id="e1")))
    assert err.status == Code.NOT_FOUND

    await r.tasks.pause(PauseTaskRequest(container_id=cid))
    assert (await r.tasks.get(GetRequest(container_id=cid))).process.status == Status.PAUSED
    await r.tasks.resume(ResumeTaskRequest(container_id=cid))
    assert (await r.tasks.get(GetRequest(container_id=cid))).process.status == Status.RUNNING

    metrics = (await r.tasks.metrics(MetricsRequest(filters=[f"id=={cid}"]))).metrics
    assert [m.id for m in metrics] == [cid]
    assert metrics[0].data.type_url.endswith("io.containerd.cgroups.v1.Metrics"), metrics[0].data.type_url
    stats = MetricsV1().parse(metrics[0].data.value)
    assert stats.memory.usage.limit == 64 << 20
    assert 0 < stats.memory.usage.usage < 64 << 20
    assert stats.pids.current >= 1
    assert (await r.tasks.metrics(MetricsRequest(filters=["id==nope"]))).metrics == []
    limit = next(CGROUP_ROOT.glob(f"memory/{r.ns}/{cid}/memory.limit_in_bytes"))
    assert int(limit.read_text()) == 64 << 20

    await r.tasks.kill(KillRequest(container_id=cid, signal=signal.SIGKILL))
    assert (await r.tasks.wait(WaitRequest(container_id=cid))).exit_status == 137
    err = await grpc_error(r.tasks.kill(KillRequest(container_id=cid, signal=signal.SIGTERM)))
    assert err.status == Code.NOT_FOUND
    err = await grpc_error(
        r.tasks.exec(
            ExecProcessRequest(
                container_id=cid,
                exec_id="late",
                spec=pb.Any(type_url=PROCESS_URL, value=json.dumps(process).encode()),
            )
        )
    )
    assert err.status == Code.FAILED_PRECONDITION and "stopped" in str(err.message)
    await r.tasks.delete(DeleteTaskRequest(container_id=cid))
    assert r.runc_containers() == [] and r.cgroups() == []
    assert mount_points_under(r.d.state) == []


async def test_bad_requests(tasks_rig: Rig) -> None:
    r = tasks_rig
    err = await grpc_error(r.tasks.create(CreateTaskRequest(container_id="ghost")))
    assert err.status == Code.NOT_FOUND and "ghost" in str(err.message)

    nosnap = r.cid("nosnap")
    record = Container(
        id=nosnap,
        image=IMAGE,
        runtime=ContainerRuntime(name=RUNTIME),
        spec=pb.Any(type_url=SPEC_URL, value=json.dumps(ocispec.generate(nosnap, namespace=r.ns)).encode()),
        snapshotter="overlayfs",
        snapshot_key="no-such-snapshot",
    )
    await ContainersStub(r.channel, timeout=30, metadata=headers(r.ns)).create(
        CreateContainerRequest(container=record)
    )
    err = await grpc_error(r.tasks.create(CreateTaskRequest(container_id=nosnap)))
    assert err.status == Code.NOT_FOUND and "no-such-snapshot" in str(err.message)

    missing = r.cid("missing")
    await r.container(missing, ["/bin/no-such-command"])
    async with asyncio.timeout(60):
        err = await grpc_error(r.tasks.create(CreateTaskRequest(container_id=missing)))
    assert "no-such-command" in str(err.message), err.message
    assert not (r.plugin_state / r.ns / missing).exists()
    err = await grpc_error(r.tasks.get(GetRequest(container_id=missing)))
    assert err.status == Code.NOT_FOUND

    err = await grpc_error(r.tasks.checkpoint(CheckpointTaskRequest(container_id=missing)))
    assert err.status == Code.UNIMPLEMENTED and "checkpoint" in str(err.message)
    err = await grpc_error(r.tasks.start(StartRequest(container_id="")))
    assert err.status == Code.INVALID_ARGUMENT and "container_id" in str(err.message)
    await poll(lambda: not r.shim_pids(), what="shims of failed creates to exit")


async def test_shim_killed_reports_exit_and_cleans_up(tasks_rig: Rig) -> None:
    r = tasks_rig
    events = Subscribed(r.channel, "^/tasks/exit")
    try:
        cid, pid, _ = await r.run("victim", "sleep", "1000")
        shim = parent_pid(pid)
        assert shim in r.shim_pids()
        socket_path = Path((r.plugin_state / r.ns / cid / "address").read_text().removeprefix("unix://"))
        assert socket_path.exists()
        waiter = asyncio.create_task(r.tasks.wait(WaitRequest(container_id=cid)))
        await asyncio.sleep(0)  # the Wait is in flight before the shim dies
        os.kill(shim, signal.SIGKILL)
        async with asyncio.timeout(30):
            waited = await waiter
        assert waited.exit_status == 137
        seen = await events.wait_for(1, r.ns, timeout=20)
        assert (exit_of(seen[0]).container_id, exit_of(seen[0]).exit_status) == (cid, 137)
        got = (await r.tasks.get(GetRequest(container_id=cid))).process
        assert (got.status, got.exit_status) == (Status.STOPPED, 137)
        await poll(lambda: not alive(pid), what="the container init to be killed by the delete bootstrap")
        err = await grpc_error(r.tasks.kill(KillRequest(container_id=cid, signal=signal.SIGKILL)))
        assert err.status == Code.NOT_FOUND
        await r.tasks.delete(DeleteTaskRequest(container_id=cid))
        assert r.runc_containers() == [] and r.cgroups() == []
        assert mount_points_under(r.d.state) == []
        assert not (r.plugin_state / r.ns / cid).exists()
        assert not socket_path.exists()
    finally:
        await events.close()


async def test_exec_bootstrap_of_berths_shim(make_berthd: Callable[..., Berthd]) -> None:
    """runtime_binary = "berth-shim-runc-v2": berth's shim started as a program, not forked by the zygote."""
    async with rig(make_berthd, "berth-shim-runc-v2") as r:
        cid, _, out = await r.run("exec", "sh", "-c", "echo via-exec; exit 2")
        assert (await r.tasks.wait(WaitRequest(container_id=cid))).exit_status == 2
        assert out.read_text() == "via-exec\n"
        await r.tasks.delete(DeleteTaskRequest(container_id=cid))
        assert r.runc_containers() == [] and mount_points_under(r.d.state) == []
        await poll(lambda: not r.shim_pids(), what="the shim to exit")


async def test_missing_runc_is_an_init_error_in_introspection(make_berthd: Callable[..., Berthd]) -> None:
    d = make_berthd(config=runtime_config("", 'runc_binary = "no-such-runc"\n')).start()
    await d.wait_ready()
    async with d.client() as c:
        plugins = {f"{p.type}.{p.id}": p for p in await c.plugins()}
    runtime = plugins[PLUGIN]
    assert "no-such-runc" in runtime.init_err.message and "runc_binary" in runtime.init_err.message
    assert PLUGIN in plugins["berth.grpc.v1.tasks"].init_err.message  # skipped, saying why
