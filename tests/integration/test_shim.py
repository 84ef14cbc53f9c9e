"""berth-shim-runc-v2 against real runc: the Task service over ttrpc, and the bootstrap.

Most tests share one shim process per module (the harness below: the real
TaskService and Reaper behind a ttrpc server, as main.py serves them, with a
``publish`` that appends each event to a JSON-lines file the tests read). Each
test builds busybox bundles whose rootfs reaches the shim as a bind mount in
CreateTaskRequest.rootfs, as a snapshot's mounts do. The bootstrap tests
(``start``/``delete``/Shutdown) start their own shim through main.py.

Teardown, even after a failure, force-deletes every container a test named,
unmounts its rootfs, removes its cgroups and kills shims by PID.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import betterproto.lib.google.protobuf as pb
import pytest

from daemon.errors import AlreadyExists, FailedPrecondition, Internal, InvalidArgument, NotFound
from daemon.mount import mount_points_under
from daemon.ttrpc import TtrpcClient
from daemon.ttrpc.services import TASK_METHODS, TASK_SERVICE
from daemon.typeurl import decode_any, pack_any
from protos.containerd.runc.v1 import Options, ProcessDetails
from protos.containerd.task.v2 import (
    CloseIoRequest,
    ConnectRequest,
    ConnectResponse,
    CreateTaskRequest,
    CreateTaskResponse,
    DeleteRequest,
    DeleteResponse,
    ExecProcessRequest,
    KillRequest,
    PauseRequest,
    PidsRequest,
    PidsResponse,
    ResizePtyRequest,
    ResumeRequest,
    ShutdownRequest,
    StartRequest,
    StartResponse,
    StateRequest,
    StateResponse,
    StatsRequest,
    StatsResponse,
    UpdateTaskRequest,
    WaitRequest,
    WaitResponse,
)
from protos.containerd.types import Mount
from protos.containerd.v1.types import Status
from protos.io.containerd.cgroups.v1 import Metrics as MetricsV1

SHIM = str(Path(sys.executable).parent / "berth-shim-runc-v2")
BUSYBOX = Path("/bin/busybox")
APPLETS = ("sh", "echo", "sleep", "cat", "stty", "true", "head", "tr")
CALL_TIMEOUT = 15.0
GONE_TIMEOUT = 10.0
MIB = 1024 * 1024

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="runc containers need root"),
    pytest.mark.skipif(shutil.which("runc") is None, reason="runc is not installed"),
    pytest.mark.skipif(not BUSYBOX.is_file(), reason="no /bin/busybox for the rootfs"),
]

M = TypeVar("M")

HARNESS = """
import asyncio, ctypes, json, signal, sys
import structlog
structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
from daemon.ttrpc import TtrpcServer
from daemon.ttrpc.services import TASK_METHODS, TASK_SERVICE, bind
from plugins.runtime.runc_v2.shim.reaper import Reaper
from plugins.runtime.runc_v2.shim.service import TaskService

async def main():
    sock, root, events = sys.argv[1:4]
    if ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0) != 0:  # PR_SET_CHILD_SUBREAPER
        raise OSError(ctypes.get_errno(), "prctl")
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    reaper = Reaper()
    reaper.install()
    out = open(events, "a", buffering=1)
    def publish(topic, event):
        out.write(json.dumps({"topic": topic, "event": event.to_dict()}) + "\\n")
    service = TaskService(reaper, root, stop.set, publish, namespace="test")
    server = TtrpcServer({TASK_SERVICE: bind(TASK_METHODS, service)})
    await server.start(sock)
    print("ready", flush=True)
    await stop.wait()
    await server.stop()

asyncio.run(main())
"""


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie counts as gone: our PID 1 may not reap it)."""
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat_line.rsplit(")", 1)[1].split()[0] != "Z"


async def poll(predicate: Callable[[], bool], timeout: float = GONE_TIMEOUT) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.02)
    return predicate()


async def close_client(client: TtrpcClient) -> None:
    """Close ``client``, tolerating the peer having closed first (see TtrpcClient.close)."""
    try:
        await client.close()
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise


def cgroup_dirs(pid: int) -> list[Path]:
    """The v1 controller directories of ``pid`` (this host mounts each at /sys/fs/cgroup/<name>)."""
    dirs = []
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, names, path = line.split(":", 2)
        for name in names.split(","):
            base = Path("/sys/fs/cgroup") / name.removeprefix("name=")
            if name and base.is_dir() and path != "/":
                dirs.append(base / path.lstrip("/"))
    return dirs


def unmount_all(path: Path) -> None:
    """Lazily unmount whatever a failed test left mounted under ``path``."""
    for point in reversed(mount_points_under(path)):
        subprocess.run(["umount", "-l", point], capture_output=True, timeout=30, check=False)


def make_bundle(base: Path, container_id: str, *args: str, **process: Any) -> tuple[Path, Path]:
    """A bundle (config.json only) and a busybox rootfs beside it to bind-mount: (bundle, rootfs)."""
    bundle = base / "bundles" / container_id
    rootfs = base / "rootfs" / container_id
    (rootfs / "bin").mkdir(parents=True)
    for sub in ("proc", "dev", "sys", "tmp"):
        (rootfs / sub).mkdir()
    shutil.copy2(BUSYBOX, rootfs / "bin" / "busybox")
    for applet in APPLETS:
        (rootfs / "bin" / applet).symlink_to("busybox")
    bundle.mkdir(parents=True)
    subprocess.run(["runc", "spec"], cwd=bundle, check=True, timeout=30)
    config_path = bundle / "config.json"
    config = json.loads(config_path.read_text())
    config["process"]["args"] = list(args)
    config["process"]["terminal"] = False
    config["process"].pop("oomScoreAdj", None)
    config["process"].update(process)
    config["root"] = {"path": "rootfs", "readonly": True}
    config["linux"]["resources"]["memory"] = {"limit": 64 * MIB}
    config_path.write_text(json.dumps(config))
    return bundle, rootfs


def exec_spec(bundle: Path, *args: str, terminal: bool = False) -> pb.Any:
    process = json.loads((bundle / "config.json").read_text())["process"]
    process.update(args=list(args), terminal=terminal)
    return pb.Any(
        type_url="types.containerd.io/opencontainers/runtime-spec/1/Process",
        value=json.dumps(process).encode(),
    )


class Fifo:
    """A FIFO the test (the client) created and holds one end of, as containerd's cio does."""

    def __init__(self, path: Path, *, write: bool = False) -> None:
        os.mkfifo(path)
        self.path = path
        # The shim opens its end O_RDWR, so our non-blocking open needs no peer.
        self.fd = os.open(path, (os.O_RDWR if write else os.O_RDONLY) | os.O_NONBLOCK)

    async def read_to_eof(self, timeout: float = GONE_TIMEOUT) -> bytes:
        chunks: list[bytes] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = os.read(self.fd, 65536)
            except BlockingIOError:
                await asyncio.sleep(0.01)
                continue
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
        raise AssertionError(f"no EOF on {self.path} after {timeout}s, got {b''.join(chunks)!r}")

    def write(self, data: bytes) -> None:
        os.write(self.fd, data)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)


class Harness:
    """One shim process (module scope): the service with a list-like event log."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.socket = base / "shim.sock"
        self.runc_root = base / "runc"
        self.events_path = base / "events.jsonl"
        self.log_path = base / "shim.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.runc_root.mkdir()
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", HARNESS, str(self.socket), str(self.runc_root), str(self.events_path)],
                stdout=subprocess.PIPE,
                stderr=log,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line == b"ready\n", self.log_path.read_text()

    def events(self, container_id: str) -> list[tuple[str, dict[str, Any]]]:
        found = []
        for line in self.events_path.read_text().splitlines():
            entry = json.loads(line)
            if entry["event"].get("containerId") == container_id:
                found.append((entry["topic"], entry["event"]))
        return found

    def stop(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
            if self.proc.stdout is not None:
                self.proc.stdout.close()


@pytest.fixture(scope="module")
def harness() -> Iterator[Harness]:
    base = Path(tempfile.mkdtemp(prefix="berth-shimh-", dir="/tmp"))
    started = Harness(base)
    try:
        started.start()
        yield started
    finally:
        started.stop()
        shutil.rmtree(base, ignore_errors=True)


class Session:
    """One test's client of the shared shim, and everything it must clean up."""

    def __init__(self, harness: Harness, client: TtrpcClient) -> None:
        self.harness = harness
        self.client = client
        self.base = Path(tempfile.mkdtemp(prefix="t-", dir=harness.base))
        self.suffix = self.base.name.removeprefix("t-").lower().replace("_", "")
        self.container_ids: list[str] = []
        self.pids: list[int] = []
        self.cgroups: list[Path] = []
        self.fifos: list[Fifo] = []
        self.runc_roots = [harness.runc_root]

    def cid(self, name: str) -> str:
        """Container ids name cgroups, which are host-wide: unique per run."""
        return f"{name}-{self.suffix}"

    async def call(self, method: str, request: Any, response_cls: type[M]) -> M:
        assert TASK_METHODS[method][1] is response_cls
        return await self.client.call(TASK_SERVICE, method, request, response_cls, timeout=CALL_TIMEOUT)

    def fifo(self, name: str, *, write: bool = False) -> Fifo:
        fifo = Fifo(self.base / name, write=write)
        self.fifos.append(fifo)
        return fifo

    async def create(
        self,
        container_id: str,
        *args: str,
        stdout: str = "",
        stdin: str = "",
        terminal: bool = False,
        **process: Any,
    ) -> tuple[int, Path]:
        self.container_ids.append(container_id)
        bundle, rootfs = make_bundle(self.base, container_id, *args, terminal=terminal, **process)
        created = await self.call(
            "Create",
            CreateTaskRequest(
                id=container_id,
                bundle=str(bundle),
                rootfs=[Mount(type="bind", source=str(rootfs), options=["rbind", "ro"])],
                stdin=stdin,
                stdout=stdout,
                stderr=str(self.base / f"{container_id}.err") if not terminal else "",
                terminal=terminal,
            ),
            CreateTaskResponse,
        )
        assert created.pid > 0
        self.pids.append(created.pid)
        with contextlib.suppress(OSError):
            self.cgroups += cgroup_dirs(created.pid)
        return created.pid, bundle

    async def run(self, container_id: str, *args: str, **kwargs: Any) -> tuple[int, Path]:
        created = await self.create(container_id, *args, **kwargs)
        await self.call("Start", StartRequest(id=container_id), StartResponse)
        return created

    async def teardown(self) -> None:
        try:
            for container_id in self.container_ids:
                for root in self.runc_roots:
                    subprocess.run(
                        ["runc", "--root", str(root), "delete", "--force", container_id],
                        capture_output=True,
                        timeout=30,
                        check=False,
                    )
                unmount_all(self.base / "bundles" / container_id)
            for path in sorted(set(self.cgroups), reverse=True):
                with contextlib.suppress(OSError):
                    path.rmdir()
            gone = await poll(lambda: not any(alive(pid) for pid in self.pids))
        finally:
            for fifo in self.fifos:
                fifo.close()
            await close_client(self.client)
            shutil.rmtree(self.base, ignore_errors=True)
        assert gone, f"processes left behind: {[pid for pid in self.pids if alive(pid)]}"


@pytest.fixture
async def task(harness: Harness) -> AsyncIterator[Session]:
    assert harness.proc is not None and harness.proc.poll() is None, harness.log_path.read_text()
    session = Session(harness, await TtrpcClient.connect(str(harness.socket)))
    try:
        yield session
    finally:
        await session.teardown()


# -- the init process ---------------------------------------------------------


async def test_lifecycle_events_output_and_nothing_left_behind(task: Session) -> None:
    cid = task.cid("life")
    out = task.fifo("out")
    pid, bundle = await task.create(cid, "sh", "-c", "echo hello; sleep 1000", stdout=str(out.path))
    state = await task.call("State", StateRequest(id=cid), StateResponse)
    assert (state.status, state.pid, state.stdout) == (Status.CREATED, pid, str(out.path))
    assert mount_points_under(bundle) == [str(bundle / "rootfs")]
    options = json.loads((bundle / "options.json").read_text())
    assert isinstance(options, dict)
    cgroups = cgroup_dirs(pid)
    assert any("memory" in str(p) for p in cgroups), cgroups
    started = await task.call("Start", StartRequest(id=cid), StartResponse)
    assert started.pid == pid
    with pytest.raises(FailedPrecondition, match=cid):
        await task.call("Start", StartRequest(id=cid), StartResponse)
    with pytest.raises(FailedPrecondition, match="running"):
        await task.call("Delete", DeleteRequest(id=cid), DeleteResponse)
    connected = await task.call("Connect", ConnectRequest(id=cid), ConnectResponse)
    assert connected.task_pid == pid
    await task.call("Kill", KillRequest(id=cid, signal=signal.SIGKILL, all=True), pb.Empty)
    waited = await task.call("Wait", WaitRequest(id=cid), WaitResponse)
    assert waited.exit_status == 128 + signal.SIGKILL
    assert waited.exited_at.year >= 2024
    assert await out.read_to_eof() == b"hello\n"
    again = await task.call("Wait", WaitRequest(id=cid), WaitResponse)  # kept until Delete
    assert again.exit_status == waited.exit_status
    deleted = await task.call("Delete", DeleteRequest(id=cid), DeleteResponse)
    assert (deleted.pid, deleted.exit_status) == (pid, 128 + signal.SIGKILL)
    with pytest.raises(NotFound, match=cid):
        await task.call("State", StateRequest(id=cid), StateResponse)
    # nothing left: runc state, the rootfs mount, the cgroups
    assert not (task.harness.runc_root / cid).exists()
    assert mount_points_under(bundle) == []
    assert [p for p in cgroups if p.exists()] == []
    topics = [topic for topic, _ in task.harness.events(cid)]
    assert topics == ["/tasks/create", "/tasks/start", "/tasks/exit", "/tasks/delete"]
    _, exit_event = task.harness.events(cid)[2]
    assert (exit_event["id"], exit_event["pid"], exit_event["exitStatus"]) == (cid, pid, 137)


async def test_runc_options_are_honoured_and_written_to_the_bundle(task: Session) -> None:
    cid = task.cid("opts")
    root = task.base / "runc-root"
    options = Options(root=str(root), binary_name=shutil.which("runc") or "runc")
    task.container_ids.append(cid)
    task.runc_roots.append(root / "test")
    bundle, rootfs = make_bundle(task.base, cid, "sleep", "1000")
    created = await task.call(
        "Create",
        CreateTaskRequest(
            id=cid,
            bundle=str(bundle),
            rootfs=[Mount(type="bind", source=str(rootfs), options=["rbind"])],
            options=pack_any(options),
        ),
        CreateTaskResponse,
    )
    task.pids.append(created.pid)
    assert (root / "test" / cid / "state.json").is_file()  # <options.root>/<namespace>, as containerd
    written = json.loads((bundle / "options.json").read_text())
    assert (written["root"], written["binary_name"]) == (options.root, options.binary_name)
    with pytest.raises(InvalidArgument, match="options"):
        await task.call(
            "Create",
            CreateTaskRequest(id=task.cid("badopts"), bundle=str(bundle), options=pb.Any(type_url="x.Y")),
            CreateTaskResponse,
        )
    await task.call("Delete", DeleteRequest(id=cid), DeleteResponse)
    assert not (root / "test" / cid).exists()
    subprocess.run(
        ["runc", "--root", str(root / "test"), "delete", "--force", cid], capture_output=True, check=False
    )


async def test_missing_command_is_runc_error_not_a_hang(task: Session) -> None:
    cid = task.cid("nocmd")
    task.container_ids.append(cid)
    bundle, rootfs = make_bundle(task.base, cid, "/bin/does-not-exist")
    request = CreateTaskRequest(
        id=cid, bundle=str(bundle), rootfs=[Mount(type="bind", source=str(rootfs), options=["rbind"])]
    )
    with pytest.raises(
        Internal, match=r"does-not-exist.*(no such file or directory|executable file not found)"
    ):
        await task.call("Create", request, CreateTaskResponse)
    assert mount_points_under(bundle) == []
    assert not (task.harness.runc_root / cid).exists()
    with pytest.raises(NotFound):
        await task.call("State", StateRequest(id=cid), StateResponse)


async def test_kill_exited_and_exec_in_a_stopped_task(task: Session) -> None:
    cid = task.cid("done")
    await task.run(cid, "true")
    assert (await task.call("Wait", WaitRequest(id=cid), WaitResponse)).exit_status == 0
    with pytest.raises(NotFound, match="process already finished"):
        await task.call("Kill", KillRequest(id=cid, signal=signal.SIGKILL), pb.Empty)
    with pytest.raises(FailedPrecondition, match="stopped"):
        await task.call(
            "Exec",
            ExecProcessRequest(id=cid, exec_id="late", spec=exec_spec(task.base / "bundles" / cid, "true")),
            pb.Empty,
        )
    assert (await task.call("Pids", PidsRequest(id=cid), PidsResponse)).processes == []
    await task.call("Delete", DeleteRequest(id=cid), DeleteResponse)


async def test_delete_of_a_created_task_kills_its_init(task: Session) -> None:
    cid = task.cid("created")
    pid, _ = await task.create(cid, "sleep", "1000")
    deleted = await task.call("Delete", DeleteRequest(id=cid), DeleteResponse)
    assert deleted.exit_status == 128 + signal.SIGKILL
    assert await poll(lambda: not alive(pid))
    with pytest.raises(NotFound, match="ghost"):
        await task.call("Wait", WaitRequest(id="ghost"), WaitResponse)


async def test_stdin_fifo_and_close_io(task: Session) -> None:
    cid = task.cid("cat")
    stdin, out = task.fifo("in", write=True), task.fifo("out")
    await task.run(cid, "cat", stdin=str(stdin.path), stdout=str(out.path))
    stdin.write(b"hello cat\n")
    await task.call("CloseIO", CloseIoRequest(id=cid, stdin=True), pb.Empty)
    waited = await task.call("Wait", WaitRequest(id=cid), WaitResponse)
    assert waited.exit_status == 0
    assert await out.read_to_eof() == b"hello cat\n"
    await task.call("Delete", DeleteRequest(id=cid), DeleteResponse)


async def test_terminal_init_with_resize(task: Session) -> None:
    cid = task.cid("tty")
    out = task.fifo("out")
    await task.create(cid, "stty", "size", stdout=str(out.path), terminal=True)
    await task.call("ResizePty", ResizePtyRequest(id=cid, width=123, height=45), pb.Empty)
    state = await task.call("State", StateRequest(id=cid), StateResponse)
    assert state.terminal
    await task.call("Start", StartRequest(id=cid), StartResponse)
    assert (await task.call("Wait", WaitRequest(id=cid), WaitResponse)).exit_status == 0
    assert (await out.read_to_eof()).strip() == b"45 123"
    await task.call("Delete", DeleteRequest(id=cid), DeleteResponse)


# -- exec ------------------------------------------------------------------------


async def test_exec_output_exit_code_pids_and_events(task: Session) -> None:
    cid = task.cid("execs")
    init_pid, bundle = await task.run(cid, "sleep", "1000")
    out, err = task.fifo("exec-out"), task.fifo("exec-err")
    request = ExecProcessRequest(
        id=cid,
        exec_id="e1",
        stdout=str(out.path),
        stderr=str(err.path),
        spec=exec_spec(bundle, "sh", "-c", "echo out; echo err >&2; exit 7"),
    )
    await task.call("Exec", request, pb.Empty)
    with pytest.raises(AlreadyExists, match="e1"):
        await task.call("Exec", request, pb.Empty)
    state = await task.call("State", StateRequest(id=cid, exec_id="e1"), StateResponse)
    assert state.status == Status.CREATED
    started = await task.call("Start", StartRequest(id=cid, exec_id="e1"), StartResponse)
    assert started.pid > 0 and started.pid != init_pid
    waited = await task.call("Wait", WaitRequest(id=cid, exec_id="e1"), WaitResponse)
    assert waited.exit_status == 7
    assert await out.read_to_eof() == b"out\n"
    assert await err.read_to_eof() == b"err\n"
    with pytest.raises(NotFound, match="process already finished"):
        await task.call("Kill", KillRequest(id=cid, exec_id="e1", signal=signal.SIGKILL), pb.Empty)
    deleted = await task.call("Delete", DeleteRequest(id=cid, exec_id="e1"), DeleteResponse)
    assert (deleted.pid, deleted.exit_status) == (started.pid, 7)
    with pytest.raises(NotFound, match="e1"):
        await task.call("State", StateRequest(id=cid, exec_id="e1"), StateResponse)

    # a running exec shows in Pids with its exec id
    await task.call(
        "Exec", ExecProcessRequest(id=cid, exec_id="e2", spec=exec_spec(bundle, "sleep", "1000")), pb.Empty
    )
    e2 = await task.call("Start", StartRequest(id=cid, exec_id="e2"), StartResponse)
    pids = await task.call("Pids", PidsRequest(id=cid), PidsResponse)
    by_pid = {p.pid: p for p in pids.processes}
    assert init_pid in by_pid and e2.pid in by_pid
    details = decode_any(by_pid[e2.pid].info)
    assert isinstance(details, ProcessDetails) and details.exec_id == "e2"
    assert not by_pid[init_pid].info.type_url

    # the init dies: the exec is killed, and its exit goes out before the init's
    await task.call("Kill", KillRequest(id=cid, signal=signal.SIGKILL), pb.Empty)
    assert (await task.call("Wait", WaitRequest(id=cid), WaitResponse)).exit_status == 137
    e2_state = await task.call("State", StateRequest(id=cid, exec_id="e2"), StateResponse)
    assert e2_state.status == Status.STOPPED
    await task.call("Delete", DeleteRequest(id=cid), DeleteResponse)
    events = task.harness.events(cid)
    topics = [(topic, event.get("id") or event.get("execId")) for topic, event in events]
    assert topics == [
        ("/tasks/create", None),
        ("/tasks/start", None),
        ("/tasks/exec-added", "e1"),
        ("/tasks/exec-started", "e1"),
        ("/tasks/exit", "e1"),
        ("/tasks/exec-added", "e2"),
        ("/tasks/exec-started", "e2"),
        ("/tasks/exit", "e2"),
        ("/tasks/exit", cid),
        ("/tasks/delete", None),
    ]


async def test_terminal_exec_with_resize_and_stdin(task: Session) -> None:
    cid = task.cid("ttyexec")
    _, bundle = await task.run(cid, "sleep", "1000")
    stdin, out = task.fifo("in", write=True), task.fifo("out")
    request = ExecProcessRequest(
        id=cid,
        exec_id="tty",
        terminal=True,
        stdin=str(stdin.path),
        stdout=str(out.path),
        spec=exec_spec(bundle, "sh", "-c", "read line; stty size", terminal=True),
    )
    await task.call("Exec", request, pb.Empty)
    await task.call("Start", StartRequest(id=cid, exec_id="tty"), StartResponse)
    await task.call("ResizePty", ResizePtyRequest(id=cid, exec_id="tty", width=77, height=22), pb.Empty)
    stdin.write(b"go\n")
    waited = await task.call("Wait", WaitRequest(id=cid, exec_id="tty"), WaitResponse)
    assert waited.exit_status == 0
    assert b"22 77" in await out.read_to_eof()
    await task.call("Delete", DeleteRequest(id=cid, exec_id="tty"), DeleteResponse)
    await task.call("Kill", KillRequest(id=cid, signal=signal.SIGKILL), pb.Empty)
    await task.call("Wait", WaitRequest(id=cid), WaitResponse)
    await task.call("Delete", DeleteRequest(id=cid), DeleteResponse)


# -- cgroups ---------------------------------------------------------------------


async def test_pause_resume(task: Session) -> None:
    cid = task.cid("pause")
    pid, _ = await task.run(cid, "sleep", "1000")
    freezer = next(p for p in cgroup_dirs(pid) if p.parts[4] == "freezer") / "freezer.state"
    await task.call("Pause", PauseRequest(id=cid), pb.Empty)
    assert (await task.call("State", StateRequest(id=cid), StateResponse)).status == Status.PAUSED
    assert freezer.read_text().strip() == "FROZEN"
    with pytest.raises(FailedPrecondition, match="paused"):
        await task.call("Delete", DeleteRequest(id=cid), DeleteResponse)
    await task.call("Resume", ResumeRequest(id=cid), pb.Empty)
    assert (await task.call("State", StateRequest(id=cid), StateResponse)).status == Status.RUNNING
    assert freezer.read_text().strip() == "THAWED"
    with pytest.raises(FailedPrecondition, match="RUNNING"):
        await task.call("Resume", ResumeRequest(id=cid), pb.Empty)
    await task.call("Kill", KillRequest(id=cid, signal=signal.SIGKILL), pb.Empty)
    await task.call("Wait", WaitRequest(id=cid), WaitResponse)
    await task.call("Delete", DeleteRequest(id=cid), DeleteResponse)
    topics = [topic for topic, _ in task.harness.events(cid)]
    assert topics[2:4] == ["/tasks/paused", "/tasks/resumed"]


async def test_stats_and_update(task: Session) -> None:
    cid = task.cid("stats")
    pid, _ = await task.run(cid, "sh", "-c", "i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done; sleep 1000")
    memory = next(p for p in cgroup_dirs(pid) if p.parts[4] == "memory")
    # the busy loop shows in cpu usage once it has run a little
    metrics = MetricsV1()
    deadline = time.monotonic() + GONE_TIMEOUT
    while time.monotonic() < deadline:
        response = await task.call("Stats", StatsRequest(id=cid), StatsResponse)
        assert response.stats.type_url == "io.containerd.cgroups.v1.Metrics"
        decoded = decode_any(response.stats)
        assert isinstance(decoded, MetricsV1)
        metrics = decoded
        if metrics.cpu.usage.total > 0:
            break
        await asyncio.sleep(0.05)
    assert metrics.cpu.usage.total > 0
    assert metrics.memory.usage.usage > 0
    assert metrics.memory.usage.limit == 64 * MIB
    assert metrics.pids.current >= 1

    resources = {"memory": {"limit": 128 * MIB}}
    await task.call(
        "Update",
        UpdateTaskRequest(
            id=cid,
            resources=pb.Any(
                type_url="types.containerd.io/opencontainers/runtime-spec/1/LinuxResources",
                value=json.dumps(resources).encode(),
            ),
        ),
        pb.Empty,
    )
    assert int((memory / "memory.limit_in_bytes").read_text()) == 128 * MIB
    decoded = decode_any((await task.call("Stats", StatsRequest(id=cid), StatsResponse)).stats)
    assert isinstance(decoded, MetricsV1) and decoded.memory.usage.limit == 128 * MIB
    await task.call("Kill", KillRequest(id=cid, signal=signal.SIGKILL), pb.Empty)
    await task.call("Wait", WaitRequest(id=cid), WaitResponse)
    await task.call("Delete", DeleteRequest(id=cid), DeleteResponse)
    assert not memory.exists()


async def test_oom_event(task: Session) -> None:
    cid = task.cid("oom")
    # 64 MiB limit, a shell variable of 200 MB: the kernel's OOM killer ends it.
    await task.run(cid, "sh", "-c", "x=$(head -c 200000000 /dev/zero | tr '\\0' a); echo survived")
    waited = await task.call("Wait", WaitRequest(id=cid), WaitResponse)
    assert waited.exit_status != 0
    assert await poll(lambda: "/tasks/oom" in [topic for topic, _ in task.harness.events(cid)])
    await task.call("Delete", DeleteRequest(id=cid), DeleteResponse)


# -- the bootstrap (main.py), one shim per test ----------------------------------


class Shim:
    """One shim started through ``start`` on its own state dir, plus what to clean up."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.state = base / "state"
        self.namespace = "test"
        self.suffix = base.name.removeprefix("berth-shim-").lower().replace("_", "")
        self.shim_id = f"shim-{self.suffix}"
        self.bundle, self.rootfs = make_bundle(base, self.shim_id, "sleep", "1000")
        self.env = {**os.environ, "BERTH_SHIM_STATE": str(self.state)}
        self.task_pids: list[int] = []
        self.pid: int | None = None
        self.client: TtrpcClient | None = None

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
        done = subprocess.run(
            self.argv("start"), env=self.env, cwd=self.bundle, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stderr
        address = done.stdout.strip()
        self.pid = int((self.state / self.namespace / self.shim_id / "shim.pid").read_text())
        return address

    async def call(self, method: str, request: Any, response_cls: type[M]) -> M:
        if self.client is None:
            self.client = await TtrpcClient.connect(self.start().removeprefix("unix://"))
        return await self.client.call(TASK_SERVICE, method, request, response_cls, timeout=CALL_TIMEOUT)

    async def create(self) -> int:
        created = await self.call(
            "Create",
            CreateTaskRequest(
                id=self.shim_id,
                bundle=str(self.bundle),
                rootfs=[Mount(type="bind", source=str(self.rootfs), options=["rbind"])],
            ),
            CreateTaskResponse,
        )
        pid: int = created.pid
        self.task_pids.append(pid)
        return pid

    async def teardown(self) -> None:
        leftovers = [*self.task_pids, *([self.pid] if self.pid else [])]
        try:
            runc_root = self.state / "runc" / self.namespace
            subprocess.run(
                ["runc", "--root", str(runc_root), "delete", "--force", self.shim_id],
                capture_output=True,
                timeout=30,
                check=False,
            )
            while os.path.ismount(self.bundle / "rootfs"):
                subprocess.run(
                    ["umount", "-l", str(self.bundle / "rootfs")], capture_output=True, check=False
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
    started = Shim(Path(tempfile.mkdtemp(prefix="berth-shim-", dir="/tmp")))
    try:
        yield started
    finally:
        await started.teardown()


async def test_start_reuses_a_live_shim_and_shutdown_waits_for_tasks(shim: Shim) -> None:
    address = shim.start()
    assert address.startswith(f"unix://{shim.state}/s/")
    first_pid = shim.pid
    assert shim.start() == address  # a second start finds the shim answering
    assert shim.pid == first_pid
    connected = await shim.call("Connect", ConnectRequest(id="none"), ConnectResponse)
    assert (connected.shim_pid, connected.task_pid) == (shim.pid, 0)
    await shim.create()
    await shim.call("Shutdown", ShutdownRequest(id=shim.shim_id), pb.Empty)
    connected = await shim.call("Connect", ConnectRequest(id=shim.shim_id), ConnectResponse)
    assert connected.shim_pid == shim.pid  # a task remains: the shim stays
    await shim.call("Delete", DeleteRequest(id=shim.shim_id), DeleteResponse)
    await shim.call("Shutdown", ShutdownRequest(id=shim.shim_id), pb.Empty)
    pid = shim.pid
    assert pid is not None
    assert await poll(lambda: not alive(pid)), f"shim {pid} still alive after Shutdown"
    assert not Path(address.removeprefix("unix://")).exists()


async def test_delete_action_cleans_up_after_a_dead_shim(shim: Shim) -> None:
    pid = await shim.create()
    await shim.call("Start", StartRequest(id=shim.shim_id), StartResponse)
    assert shim.pid is not None and stat.S_ISDIR(os.stat(shim.bundle).st_mode)
    os.kill(shim.pid, signal.SIGKILL)
    shim_pid = shim.pid
    assert await poll(lambda: not alive(shim_pid))
    done = subprocess.run(shim.argv("delete"), env=shim.env, cwd=shim.bundle, capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr
    deleted = DeleteResponse().parse(done.stdout)
    assert deleted.exit_status == 128 + signal.SIGKILL
    assert await poll(lambda: not alive(pid)), f"container init {pid} survived delete"
    assert mount_points_under(shim.bundle) == []
    runc_root = shim.state / "runc" / shim.namespace
    state = subprocess.run(
        ["runc", "--root", str(runc_root), "state", shim.shim_id], capture_output=True, timeout=30
    )
    assert state.returncode != 0
