"""``berth run``, ``berth containers`` and ``berth tasks`` against a real berthd, runc and busybox.

The CLI runs as a subprocess, as an operator runs it; a terminal, where one
is needed, is a pty made here. The busybox image is imported into the
daemon once per test. Teardown, even after a failure: every task left is
killed and deleted through the CLI, the daemon is stopped, then whatever
could survive it (shims, runc containers, mounts under the daemon's
directory) is removed by PID / by name under the daemon's own runc root, and
the test fails if it had to.

The pure helpers (mount and signal syntax, the read-only view of a
snapshot) are checked at the end without a daemon.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import pty
import select
import shutil
import signal
import struct
import subprocess
import termios
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from daemon.cli.commands import CliError
from daemon.cli.commands.run import parse_mount, readonly_mounts
from daemon.cli.commands.tasks import parse_signal
from daemon.mount import mount_points_under, release
from protos.containerd.types import Mount
from tests.integration.conftest import BIN, Berthd
from tests.support.oci import Image, oci_archive

IMAGE = "docker.io/library/busybox:latest"
RUN_TIMEOUT = 60.0

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="containers need root"),
    pytest.mark.skipif(shutil.which("runc") is None, reason="runc is not installed"),
]


def berth(
    d: Berthd, *args: str, stdin: bytes | None = b"", timeout: float = RUN_TIMEOUT
) -> subprocess.CompletedProcess[str]:
    """The ``berth`` CLI against ``d``; stdin is empty unless given (never the test runner's)."""
    proc = subprocess.run(
        [str(BIN / "berth"), "--address", d.address, *args],
        input=stdin,
        capture_output=True,
        timeout=timeout,
        env=d.env,
        check=False,
    )
    return subprocess.CompletedProcess(
        proc.args, proc.returncode, proc.stdout.decode(errors="replace"), proc.stderr.decode(errors="replace")
    )


def ok(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 0, f"rc={proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc.stdout


def fails(proc: subprocess.CompletedProcess[str], rc: int = 1) -> str:
    """The error line of a failed command (``berth: ...``)."""
    assert proc.returncode == rc, f"rc={proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    lines = [line for line in proc.stderr.splitlines() if line.startswith("berth: ")]
    assert lines, proc.stderr
    return lines[-1]


def rows(out: str) -> list[list[str]]:
    return [line.split() for line in out.splitlines()[1:]]


def containers(d: Berthd) -> list[str]:
    return ok(berth(d, "containers", "ls", "-q")).split()


def snapshot_keys(d: Berthd) -> set[str]:
    return {r[0] for r in rows(ok(berth(d, "snapshots", "ls")))}


def task_status(d: Berthd, task_id: str) -> str | None:
    for row in rows(ok(berth(d, "tasks", "ls"))):
        if row[0] == task_id:
            return row[2]
    return None


async def until(predicate: Callable[[], object], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.05)


# -- teardown of what may outlive berthd ------------------------------------------------


def _pids_naming(text: str) -> list[int]:
    """PIDs whose command line contains ``text`` (the daemon's unique temporary path)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append(int(entry.name))
    return found


def _leftovers(d: Berthd) -> list[str]:
    """Remove what a failed test could leave behind this daemon; say what there was."""
    left: list[str] = []
    for pid in _pids_naming(str(d.base)):
        left.append(f"process {pid}")
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    runc = shutil.which("runc") or "runc"
    for root in d.base.rglob("runc"):
        if not root.is_dir():
            continue
        listed = subprocess.run([runc, "--root", str(root), "list", "-q"], capture_output=True, text=True)
        for cid in listed.stdout.split():
            left.append(f"runc container {cid}")
            subprocess.run([runc, "--root", str(root), "delete", "-f", cid], capture_output=True)
    mounts = sorted(mount_points_under(d.base), key=len, reverse=True)
    for target in mounts:
        left.append(f"mount {target}")
        asyncio.run(release(target))
    return left


@pytest.fixture
async def rund(make_berthd: Callable[..., Berthd], busybox: Image, tmp_path: Path) -> AsyncIterator[Berthd]:
    """A berthd with the busybox image imported as :data:`IMAGE`; nothing may outlive the test."""
    d = make_berthd().start()
    try:
        await d.wait_ready()
        archive = oci_archive(busybox, tmp_path / "busybox.tar", image_name=IMAGE)
        ok(berth(d, "images", "import", str(archive)))
        yield d
    finally:
        if d.proc is not None and d.proc.poll() is None:
            for row in rows(berth(d, "tasks", "ls").stdout):
                berth(d, "tasks", "kill", "-s", "KILL", "--all", row[0])
            for cid in berth(d, "containers", "ls", "-q").stdout.split():
                berth(d, "containers", "rm", cid)
        d.stop()
        left = await asyncio.to_thread(_leftovers, d)
        assert left == [], f"left behind: {left}\n{d.log()[-3000:]}"


# -- run --------------------------------------------------------------------------------


async def test_run_prints_output_passes_exit_code_and_rm_leaves_nothing(rund: Berthd) -> None:
    before = snapshot_keys(rund)
    proc = berth(rund, "run", "--rm", IMAGE, "r1", "sh", "-c", "echo out; echo err >&2; exit 3")
    assert (proc.returncode, proc.stdout, proc.stderr) == (3, "out\n", "err\n")
    assert containers(rund) == []
    assert snapshot_keys(rund) == before

    # end of our stdin reaches the process (CloseIO), so `cat` ends
    assert ok(berth(rund, "run", "--rm", IMAGE, "r2", "cat", stdin=b"piped\n")) == "piped\n"
    assert ok(berth(rund, "run", "--rm", IMAGE, "r3", "true")) == ""
    # our stdin is /dev/null: the process gets no FIFO but still sees end of input at once
    devnull = subprocess.run(
        [
            str(BIN / "berth"),
            "--address",
            rund.address,
            "run",
            "--rm",
            IMAGE,
            "r4",
            "sh",
            "-c",
            "cat; echo eof",
        ],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=RUN_TIMEOUT,
        env=rund.env,
        check=False,
    )
    assert (devnull.returncode, devnull.stdout, devnull.stderr) == (0, b"eof\n", b"")
    assert containers(rund) == [] and snapshot_keys(rund) == before


async def test_death_by_signal_exits_128_plus_the_signal(rund: Berthd) -> None:
    proc = subprocess.Popen(
        [str(BIN / "berth"), "--address", rund.address, "run", "--rm", IMAGE, "k1", "sleep", "600"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        await until(lambda: task_status(rund, "k1") == "RUNNING", "k1 to run")
        ok(berth(rund, "tasks", "kill", "-s", "KILL", "k1"))
        out, err = proc.communicate(timeout=RUN_TIMEOUT)
        assert (proc.returncode, out, err) == (128 + signal.SIGKILL, b"", b"")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert containers(rund) == []


async def test_run_wires_stdin_env_user_cwd_and_mounts(rund: Berthd, tmp_path: Path) -> None:
    share = tmp_path / "share"
    share.mkdir()
    (share / "note.txt").write_text("from the host\n")
    proc = berth(
        rund,
        "run",
        "--rm",
        "--env",
        "GREETING=hi there",
        "--user",
        "app",
        "--cwd",
        "/tmp",
        "--mount",
        f"type=bind,src={share},dst=/mnt/share,options=rbind:ro",
        IMAGE,
        "r1",
        "sh",
        "-c",
        'read line; echo "got $line"; echo "$GREETING"; id -u; id -g; pwd; cat /mnt/share/note.txt;'
        " touch /mnt/share/x 2>/dev/null || echo read-only",
        stdin=b"typed input\n",
    )
    assert ok(proc).splitlines() == [
        "got typed input",
        "hi there",
        "1000",
        "1000",
        "/tmp",
        "from the host",
        "read-only",
    ]
    assert not (share / "x").exists()
    # the image's own command, env and user when nothing overrides them
    assert ok(berth(rund, "run", "--rm", IMAGE, "r2", "sh", "-c", "echo $PATH; id -u")).splitlines() == [
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "0",
    ]
    # a user the image does not have: refused before anything runs, nothing left
    assert "ghost" in fails(berth(rund, "run", "--rm", "--user", "ghost", IMAGE, "r3", "id"))
    assert containers(rund) == []


async def test_run_without_rm_keeps_the_stopped_container(rund: Berthd) -> None:
    assert ok(berth(rund, "run", "--label", "team=berth", IMAGE, "kept", "echo", "once")) == "once\n"
    assert rows(ok(berth(rund, "containers", "ls"))) == [["kept", IMAGE, "io.containerd.runc.v2"]]
    assert task_status(rund, "kept") is None  # run deletes the task after it exited, as ctr does
    info = json.loads(ok(berth(rund, "containers", "info", "kept")))
    assert info["image"] == IMAGE and info["labels"] == {"team": "berth"}
    assert info["runtime"]["name"] == "io.containerd.runc.v2"
    assert (info["snapshotter"], info["snapshot_key"]) == ("overlayfs", "kept")
    assert info["spec"]["process"]["args"] == ["echo", "once"]
    assert info["spec"]["linux"]["cgroupsPath"] == "/default/kept"
    assert "kept" in snapshot_keys(rund)

    # the same id again: refused, and the existing container is untouched
    assert "already exists" in fails(berth(rund, "run", "--rm", IMAGE, "kept", "true"))
    assert containers(rund) == ["kept"] and "kept" in snapshot_keys(rund)

    # its task can be started again from the record
    assert ok(berth(rund, "tasks", "start", "kept")) == "once\n"
    assert ok(berth(rund, "containers", "rm", "kept")) == "kept\n"
    assert containers(rund) == [] and "kept" not in snapshot_keys(rund)


async def test_unknown_image_missing_command_and_bad_flags(rund: Berthd) -> None:
    before = snapshot_keys(rund)
    err = fails(berth(rund, "run", "--rm", "no/such:image", "x1", "true"))
    assert err == "berth: image 'no/such:image': not found (pull or import it first)"
    err = fails(berth(rund, "run", "--rm", IMAGE, "x2", "/no/such/command"))
    assert "/no/such/command" in err  # runc's message, carried through
    assert containers(rund) == [] and snapshot_keys(rund) == before
    err = fails(berth(rund, "run", "--rm", "--snapshotter", "native", IMAGE, "x5", "true"))
    assert err == f"berth: image {IMAGE!r}: not unpacked in snapshotter 'native' (pull or import it there)"
    assert containers(rund) == [] and snapshot_keys(rund) == before
    assert "cannot be used together" in fails(berth(rund, "run", "--rm", "-d", IMAGE, "x3", "true"))
    assert "dst is required" in fails(berth(rund, "run", "--mount", "type=bind,src=/tmp", IMAGE, "x4"))
    assert containers(rund) == []


async def test_detached_task_ls_ps_exec_pause_resume_metrics_kill(rund: Berthd) -> None:
    ok(berth(rund, "run", "-d", "--memory-limit", str(64 << 20), IMAGE, "d1", "sleep", "600"))
    [[task, pid, status]] = [r for r in rows(ok(berth(rund, "tasks", "ls"))) if r[0] == "d1"]
    assert (task, status) == ("d1", "RUNNING") and int(pid) > 0
    assert [r[0] for r in rows(ok(berth(rund, "tasks", "ps", "d1")))] == [pid]

    proc = berth(rund, "tasks", "exec", "--exec-id", "e1", "d1", "sh", "-c", "echo in $(pwd); exit 4")
    assert (proc.returncode, proc.stdout) == (4, "in /\n")
    proc = berth(
        rund,
        "tasks",
        "exec",
        "--exec-id",
        "e2",
        "--cwd",
        "/tmp",
        "--env",
        "A=b",
        "d1",
        "sh",
        "-c",
        "cat; pwd; echo $A",
        stdin=b"piped\n",
    )
    assert ok(proc).splitlines() == ["piped", "/tmp", "b"]

    ok(berth(rund, "tasks", "pause", "d1"))
    assert task_status(rund, "d1") == "PAUSED"
    ok(berth(rund, "tasks", "resume", "d1"))
    assert task_status(rund, "d1") == "RUNNING"

    out = ok(berth(rund, "tasks", "metrics", "d1"))
    assert out.splitlines()[1].split()[0] == "d1"
    values = {r[0]: r[1] for r in (line.split(None, 1) for line in out.splitlines()[3:]) if len(r) == 2}
    if "memory.limit_in_bytes" in values:  # cgroup v1
        assert int(values["memory.limit_in_bytes"]) == 64 << 20
        assert int(values["pids.current"]) >= 1
    else:
        assert "decode" in out or int(values["memory.usage_limit"]) == 64 << 20
    [metric] = json.loads(ok(berth(rund, "--format", "json", "tasks", "metrics", "d1")))
    assert metric["id"] == "d1" and metric["type"].startswith("io.containerd.cgroups.v")

    assert "kill it first" in fails(berth(rund, "containers", "rm", "d1"))
    assert containers(rund) == ["d1"]
    ok(berth(rund, "tasks", "kill", "-s", "KILL", "d1"))
    await until(lambda: task_status(rund, "d1") == "STOPPED", "d1 to stop")
    assert ok(berth(rund, "containers", "rm", "d1")) == "d1\n"
    assert containers(rund) == [] and task_status(rund, "d1") is None
    assert "d1" not in snapshot_keys(rund)


async def test_ctrl_c_is_forwarded_to_the_task(rund: Berthd) -> None:
    script = 'trap "echo got-int; exit 7" INT; echo ready; while :; do sleep 0.05; done'
    proc = subprocess.Popen(
        [str(BIN / "berth"), "--address", rund.address, "run", "--rm", IMAGE, "c1", "sh", "-c", script],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"ready\n"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=RUN_TIMEOUT)
        assert (proc.returncode, out, err) == (7, b"got-int\n", b"")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert containers(rund) == []


def _run_on_pty(
    argv: list[str], script: Callable[[int, bytes], bytes | None], timeout: float
) -> tuple[int, bytes]:
    """``argv`` on a new pty (33 rows, 111 columns); ``script(master, output so far)`` may answer."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 33, 111, 0, 0))
    proc = subprocess.Popen(
        argv,
        stdin=slave,
        stdout=slave,
        stderr=slave,
        start_new_session=True,
        # the pty becomes berth's controlling terminal: window changes then reach it as SIGWINCH
        preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0),
    )
    os.close(slave)
    out = b""
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.1)
            if ready:
                try:
                    data = os.read(master, 4096)
                except OSError:  # EIO: every slave end closed
                    break
                if not data:
                    break
                out += data
                answer = script(master, out)
                if answer:
                    os.write(master, answer)
            elif proc.poll() is not None:
                break
        return proc.wait(timeout=timeout), out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)


async def test_tty_raw_mode_resize_and_exit_code(rund: Berthd) -> None:
    resized = False

    def script(master: int, out: bytes) -> bytes | None:
        nonlocal resized
        if b"ready" in out and not resized:
            resized = True
            # the new size, then a line: berth's SIGWINCH handler resizes before the line arrives
            fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", 44, 122, 0, 0))
            time.sleep(0.3)
            return b"typed\n"
        return None

    argv = [str(BIN / "berth"), "--address", rund.address, "run", "--rm", "-t", IMAGE, "t1"]
    argv += ["sh", "-c", "stty size; [ -t 0 ] && echo ready; read x; stty size; echo got $x; exit 4"]
    rc, out = await asyncio.to_thread(_run_on_pty, argv, script, RUN_TIMEOUT)
    text = out.decode(errors="replace")
    assert rc == 4, text
    assert "33 111\r\n" in text and "44 122\r\n" in text and "got typed\r\n" in text
    assert containers(rund) == []


# -- helpers, no daemon ------------------------------------------------------------------


def test_parse_mount_follows_ctr_syntax() -> None:
    assert parse_mount("type=bind,src=/a,dst=/b,options=rbind:ro") == {
        "type": "bind",
        "source": "/a",
        "destination": "/b",
        "options": ["rbind", "ro"],
    }
    assert parse_mount("type=bind,source=/a,target=/b")["options"] == ["rbind"]
    assert parse_mount("type=tmpfs,src=tmpfs,dst=/t,options=size=1m")["options"] == ["size=1m"]
    for bad, why in (
        ("type=bind,src=/a", "dst is required"),
        ("dst=rel", "absolute"),
        ("x=1,dst=/b", "unknown"),
    ):
        with pytest.raises(CliError, match=why):
            parse_mount(bad)


def test_parse_signal_names_and_numbers() -> None:
    assert parse_signal("9") == parse_signal("KILL") == parse_signal("sigkill") == signal.SIGKILL
    assert parse_signal("SIGTERM") == signal.SIGTERM
    for bad in ("0", "999", "NOPE"):
        with pytest.raises(CliError):
            parse_signal(bad)


def test_readonly_view_of_a_snapshot() -> None:
    overlay = Mount(
        type="overlay",
        source="overlay",
        options=["index=off", "workdir=/s/2/work", "upperdir=/s/2/fs", "lowerdir=/s/1/fs:/s/0/fs"],
    )
    plan = readonly_mounts([overlay])
    assert isinstance(plan, list)
    [m] = plan
    assert (m.type, m.options) == ("overlay", ("index=off", "lowerdir=/s/2/fs:/s/1/fs:/s/0/fs", "ro"))
    single = Mount(type="overlay", source="overlay", options=["lowerdir=/s/0/fs"])
    plan = readonly_mounts([single])
    assert isinstance(plan, list)
    [m] = plan
    assert (m.type, m.source, m.options) == ("bind", "/s/0/fs", ("rbind", "ro"))
    assert readonly_mounts([Mount(type="bind", source="/s/3/fs", options=["rbind", "rw"])]) == "/s/3/fs"
