"""CRI logs written by berth's shim (``crilog://`` stdio) against real runc, with no berthd at all.

One shim per module, started through the real bootstrap (``berth-shim-runc-v2
... start``, so main.py's serving wiring is what answers), with $TTRPC_ADDRESS
naming a socket nobody listens on: there is no daemon to deliver events or
output to, which is the point. Every container joins the shim through the group
annotation. Teardown, even after a failure, force-deletes the containers,
unmounts their rootfs, removes their cgroups and kills the shim by PID.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import betterproto.lib.google.protobuf as pb
import pytest

from daemon.errors import FailedPrecondition, InvalidArgument
from daemon.ttrpc import TtrpcClient
from daemon.ttrpc.services import LOGS_SERVICE, TASK_METHODS, TASK_SERVICE
from plugins.runtime.runc_v2.shim.crilog import uri
from protos.berth.shim.v1 import ReopenLogRequest
from protos.containerd.task.v2 import (
    CreateTaskRequest,
    CreateTaskResponse,
    DeleteRequest,
    DeleteResponse,
    ExecProcessRequest,
    KillRequest,
    StartRequest,
    StartResponse,
    WaitRequest,
    WaitResponse,
)
from protos.containerd.types import Mount
from tests.integration.test_shim import (
    BUSYBOX,
    SHIM,
    Fifo,
    alive,
    cgroup_dirs,
    close_client,
    exec_spec,
    make_bundle,
    poll,
    unmount_all,
)

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="runc containers need root"),
    pytest.mark.skipif(shutil.which("runc") is None, reason="runc is not installed"),
    pytest.mark.skipif(not BUSYBOX.is_file(), reason="no /bin/busybox for the rootfs"),
]

M = TypeVar("M")
NAMESPACE = "test"
CALL_TIMEOUT = 15.0
EXTRA_APPLETS = ("yes",)
B_LINES = 200000
ENTRY = re.compile(rb"^(\S+) (stdout|stderr) ([PF]) (.*)$", re.DOTALL)


def parse_log(path: Path) -> list[tuple[datetime, str, str, bytes]]:
    """(timestamp, stream, tag, text) of every entry; every line must be a well-formed entry."""
    data = path.read_bytes()
    assert data.endswith(b"\n") or not data
    found = []
    for line in data.split(b"\n")[:-1]:
        match = ENTRY.match(line)
        assert match is not None, line[:200]
        stamp = match.group(1).decode()
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z", stamp), stamp
        when = datetime.strptime(stamp[:26], "%Y-%m-%dT%H:%M:%S.%f").replace(tzinfo=UTC)
        found.append((when, match.group(2).decode(), match.group(3).decode(), match.group(4)))
    return found


def texts(entries: list[tuple[datetime, str, str, bytes]], stream: str = "stdout") -> list[bytes]:
    """The lines of ``stream`` as the process wrote them: P entries joined to the next F."""
    lines: list[bytes] = []
    partial = b""
    for _, name, tag, text in entries:
        if name != stream:
            continue
        partial += text
        if tag == "F":
            lines.append(partial)
            partial = b""
    if partial:
        lines.append(partial)
    return lines


class ShimProcess:
    """The module's shim, started through the bootstrap with no berthd behind $TTRPC_ADDRESS."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.state = base / "state"
        self.group = f"crilog-{base.name.rsplit('-', 1)[-1].lower()}"
        self.env = {
            **os.environ,
            "BERTH_SHIM_STATE": str(self.state),
            "TTRPC_ADDRESS": str(base / "no-berthd.sock"),
        }
        self.runc_root = self.state / "runc" / NAMESPACE
        self.socket = ""
        self.pid = 0

    def start(self) -> None:
        seed = self.base / "seed"
        seed.mkdir()
        (seed / "config.json").write_text(
            json.dumps({"annotations": {"io.containerd.runc.v2.group": self.group}})
        )
        done = subprocess.run(
            [SHIM, "-namespace", NAMESPACE, "-id", "seed", "-address", "/test/berth.sock", "start"],
            env=self.env,
            cwd=seed,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        self.socket = done.stdout.strip().removeprefix("unix://")
        self.pid = int((seed / "shim.pid").read_text())

    def stop(self) -> None:
        if self.pid and alive(self.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def shim() -> Iterator[ShimProcess]:
    base = Path(tempfile.mkdtemp(prefix="berth-crilog-", dir="/tmp"))
    started = ShimProcess(base)
    try:
        started.start()
        yield started
    finally:
        started.stop()
        deadline = time.monotonic() + 10
        while started.pid and alive(started.pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        shutil.rmtree(base, ignore_errors=True)


class Session:
    """One test's client of the shim and everything it must clean up."""

    def __init__(self, shim: ShimProcess, client: TtrpcClient) -> None:
        self.shim = shim
        self.client: TtrpcClient | None = client
        self.base = Path(tempfile.mkdtemp(prefix="t-", dir=shim.base))
        self.logs = self.base / "logs"
        self.logs.mkdir()
        self.suffix = self.base.name.removeprefix("t-").lower().replace("_", "")
        self.container_ids: list[str] = []
        self.pids: list[int] = []
        self.cgroups: list[Path] = []
        self.fifos: list[Fifo] = []

    def cid(self, name: str) -> str:
        return f"{name}-{self.suffix}"

    async def connect(self) -> TtrpcClient:
        if self.client is None:
            self.client = await TtrpcClient.connect(self.shim.socket)
        return self.client

    async def disconnect(self) -> None:
        if self.client is not None:
            client, self.client = self.client, None
            await close_client(client)

    async def call(self, method: str, request: Any, response_cls: type[M]) -> M:
        assert TASK_METHODS[method][1] is response_cls
        client = await self.connect()
        return await client.call(TASK_SERVICE, method, request, response_cls, timeout=CALL_TIMEOUT)

    async def reopen(self, container_id: str, exec_id: str = "") -> None:
        client = await self.connect()
        await client.call(
            LOGS_SERVICE,
            "Reopen",
            ReopenLogRequest(id=container_id, exec_id=exec_id),
            pb.Empty,
            timeout=CALL_TIMEOUT,
        )

    def fifo(self, name: str) -> Fifo:
        fifo = Fifo(self.base / name, write=True)
        self.fifos.append(fifo)
        return fifo

    async def create(
        self,
        container_id: str,
        script: str,
        *,
        stdout: str,
        stderr: str = "",
        stdin: str = "",
        terminal: bool = False,
    ) -> int:
        self.container_ids.append(container_id)
        bundle, rootfs = make_bundle(self.base, container_id, "sh", "-c", script, terminal=terminal)
        for applet in EXTRA_APPLETS:
            (rootfs / "bin" / applet).symlink_to("busybox")
        config = json.loads((bundle / "config.json").read_text())
        config["annotations"] = {"io.containerd.runc.v2.group": self.shim.group}
        (bundle / "config.json").write_text(json.dumps(config))
        created = await self.call(
            "Create",
            CreateTaskRequest(
                id=container_id,
                bundle=str(bundle),
                rootfs=[Mount(type="bind", source=str(rootfs), options=["rbind", "ro"])],
                stdin=stdin,
                stdout=stdout,
                stderr=stderr,
                terminal=terminal,
            ),
            CreateTaskResponse,
        )
        self.pids.append(created.pid)
        with contextlib.suppress(OSError):
            self.cgroups += cgroup_dirs(created.pid)
        return int(created.pid)

    async def run(self, container_id: str, script: str, **kwargs: Any) -> int:
        pid = await self.create(container_id, script, **kwargs)
        await self.call("Start", StartRequest(id=container_id), StartResponse)
        return pid

    async def finish(self, container_id: str) -> int:
        """Wait for the init's exit and Delete the task (which drains its output); the exit status."""
        waited = await self.call("Wait", WaitRequest(id=container_id), WaitResponse)
        await self.call("Delete", DeleteRequest(id=container_id), DeleteResponse)
        return int(waited.exit_status)

    async def teardown(self) -> None:
        try:
            for container_id in self.container_ids:
                subprocess.run(
                    ["runc", "--root", str(self.shim.runc_root), "delete", "--force", container_id],
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
            await self.disconnect()
            shutil.rmtree(self.base, ignore_errors=True)
        assert gone, f"processes left behind: {[pid for pid in self.pids if alive(pid)]}"


@pytest.fixture
async def task(shim: ShimProcess) -> AsyncIterator[Session]:
    assert alive(shim.pid), "the module's shim died"
    session = Session(shim, await TtrpcClient.connect(shim.socket))
    try:
        yield session
    finally:
        await session.teardown()


async def test_stdout_stderr_long_line_and_partial_last_line(task: Session) -> None:
    cid = task.cid("out")
    log = task.logs / "0.log"
    script = (
        "echo out1; echo err1 >&2; echo; echo out2; "
        "head -c 40960 /dev/zero | tr '\\0' a; echo; echo err2 >&2; echo -n partial"
    )
    await task.run(cid, script, stdout=uri(str(log)), stderr=uri(str(log)))
    assert await task.finish(cid) == 0
    entries = parse_log(log)
    out = [
        (tag, len(text) if text.startswith(b"a") else text) for _, s, tag, text in entries if s == "stdout"
    ]
    assert out == [
        ("F", b"out1"),
        ("F", b""),
        ("F", b"out2"),
        ("P", 16384),
        ("P", 16384),
        ("F", 40960 - 32768),
        ("P", b"partial"),  # unterminated at EOF: P, as containerd writes it
    ]
    assert [(tag, text) for _, s, tag, text in entries if s == "stderr"] == [("F", b"err1"), ("F", b"err2")]
    for stream in ("stdout", "stderr"):
        stamps = [when for when, s, _, _ in entries if s == stream]
        assert stamps == sorted(stamps)
    assert abs((entries[0][0] - datetime.now(UTC)).total_seconds()) < 60
    assert oct(log.stat().st_mode & 0o777) == oct(0o640)


async def test_rotation_by_rename_and_reopen_loses_nothing(task: Session) -> None:
    cid = task.cid("rot")
    log = task.logs / "0.log"
    go = task.fifo("go")
    # a: written before the rename; b: flowing while the test renames and reopens; c: after reopen
    script = (
        "i=0; while [ $i -lt 1000 ]; do echo a$i; i=$((i+1)); done; read x; "
        f"i=0; while [ $i -lt {B_LINES} ]; do echo b$i; i=$((i+1)); done; read x; "
        "i=0; while [ $i -lt 1000 ]; do echo c$i; i=$((i+1)); done"
    )
    await task.run(cid, script, stdout=uri(str(log)), stderr=uri(str(log)), stdin=str(go.path))
    assert await poll(lambda: log.exists() and log.read_bytes().count(b"\n") == 1000)
    go.write(b"go\n")
    assert await poll(lambda: log.read_bytes().count(b" b") >= 10)
    log.rename(task.logs / "0.log.1")
    await task.reopen(cid)
    go.write(b"go\n")
    assert await task.finish(cid) == 0
    old, new = parse_log(task.logs / "0.log.1"), parse_log(log)
    assert texts(old)[:1000] == [b"a%d" % i for i in range(1000)]
    assert texts(new)[-1000:] == [b"c%d" % i for i in range(1000)]  # after the reopen: the new file
    expected = [b"a%d" % i for i in range(1000)] + [b"b%d" % i for i in range(B_LINES)]
    expected += [b"c%d" % i for i in range(1000)]
    assert texts(old) + texts(new) == expected
    assert old[-1][0] <= new[0][0]


async def test_reopen_errors_name_the_task(task: Session) -> None:
    cid = task.cid("plain")
    await task.run(cid, "sleep 1000", stdout=str(task.base / "plain.out"))
    with pytest.raises(FailedPrecondition, match=f"{cid}.*not a crilog"):
        await task.reopen(cid)
    await task.call("Kill", _kill(cid), pb.Empty)
    await task.finish(cid)
    with pytest.raises(InvalidArgument, match=r"log directory .* does not exist"):
        await task.create(task.cid("nodir"), "true", stdout=uri(str(task.logs / "missing" / "0.log")))
    task.pids.clear()  # the refused create started nothing


async def test_no_client_and_no_berthd_while_10_mib_are_written(task: Session) -> None:
    cid = task.cid("big")
    log = task.logs / "0.log"
    line = b"0123456789" * 10  # 100 bytes + "\n"
    count = 10 * 1024 * 1024 // (len(line) + 1)
    script = f"yes {line.decode()} | head -n {count}; echo done"
    pid = await task.create(cid, script, stdout=uri(str(log)), stderr=uri(str(log)))
    await task.call("Start", StartRequest(id=cid), StartResponse)
    await task.disconnect()  # the client side is gone, and no berthd ever was there
    assert await poll(lambda: not alive(pid), timeout=60), "the container blocked with nobody reading"
    assert await poll(lambda: log.read_bytes().endswith(b" stdout F done\n"), timeout=30)
    assert await task.finish(cid) == 0  # a new client finds the task and its exit
    entries = parse_log(log)
    assert len(entries) == count + 1
    assert all(text == line for _, _, _, text in entries[:-1])
    assert {tag for _, _, tag, _ in entries} == {"F"}
    assert log.stat().st_size > 10 * 1024 * 1024


async def test_terminal_output_drops_the_ptys_carriage_returns(task: Session) -> None:
    cid = task.cid("tty")
    log = task.logs / "0.log"
    await task.run(cid, "echo tty1; echo tty2", stdout=uri(str(log)), terminal=True)
    assert await task.finish(cid) == 0
    assert [(s, tag, text) for _, s, tag, text in parse_log(log)] == [
        ("stdout", "F", b"tty1"),
        ("stdout", "F", b"tty2"),
    ]


async def test_exec_writes_its_own_crilog_and_reopens_alone(task: Session) -> None:
    cid = task.cid("exec")
    init_log, exec_log = task.logs / "0.log", task.logs / "exec.log"
    await task.run(cid, "sleep 1000", stdout=uri(str(init_log)), stderr=uri(str(init_log)))
    bundle = task.base / "bundles" / cid
    await task.call(
        "Exec",
        ExecProcessRequest(
            id=cid,
            exec_id="e1",
            stdout=uri(str(exec_log)),
            stderr=uri(str(exec_log)),
            spec=exec_spec(bundle, "sh", "-c", "echo from-exec; echo oops >&2"),
        ),
        pb.Empty,
    )
    await task.call("Start", StartRequest(id=cid, exec_id="e1"), StartResponse)
    waited = await task.call("Wait", WaitRequest(id=cid, exec_id="e1"), WaitResponse)
    assert waited.exit_status == 0
    await task.reopen(cid, "e1")  # its output ended: nothing to reopen, and no error
    await task.call("Delete", DeleteRequest(id=cid, exec_id="e1"), DeleteResponse)
    assert sorted((s, text) for _, s, _, text in parse_log(exec_log)) == [
        ("stderr", b"oops"),
        ("stdout", b"from-exec"),
    ]
    await task.call("Kill", _kill(cid), pb.Empty)
    await task.finish(cid)
    assert parse_log(init_log) == []


def _kill(container_id: str) -> KillRequest:
    return KillRequest(id=container_id, signal=signal.SIGKILL, all=True)
