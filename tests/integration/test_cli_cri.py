"""``berth cri`` (crictl's verbs) end to end, and the CRI demo, against a real berthd.

One berthd for the module, with a CNI conf of its own (a bridge with a unique
name, host-local in a /24 of 10.244.0.0/16, no gateway, no routes) and the
busybox test image imported into ``k8s.io``; every check goes through the CLI
as an operator would type it. Teardown removes every pod through the CLI,
stops berthd by PID, kills its shims by PID, unmounts what is left and
deletes the bridge, even when a test failed. The demo test runs on a daemon
of its own (its CNI conf dir is the demo's).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from daemon.cli.cridemo import SERVED, berthd_config, run_cri_demo
from daemon.mount import mount_points_under
from tests.integration.conftest import Berthd, wait_for
from tests.integration.test_cri_containers import shim_pids
from tests.support.oci import busybox_image, oci_archive
from tests.support.push import push_image_sync
from tests.support.registry import PASSWORD, USER, Registry

BIN = Path(sys.executable).parent
IMAGE = "docker.io/library/busybox:latest"
CNI_BIN = Path("/usr/lib/cni")

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not (CNI_BIN / "bridge").exists(),
    reason="needs root (runc, mounts) and Debian's containernetworking-plugins",
)


@dataclass
class Node:
    d: Berthd
    base: Path
    bridge: str

    def cli(
        self, *args: str, stdin: str | None = None, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(BIN / "berth"), "--address", self.d.address, *args],
            capture_output=True,
            text=True,
            input=stdin,
            timeout=timeout,
            cwd=self.base,
            check=False,
        )

    def ok(self, *args: str, **kw: Any) -> str:
        r = self.cli(*args, **kw)
        assert r.returncode == 0, f"berth {' '.join(args)}: rc {r.returncode}: {r.stderr}"
        return r.stdout

    def fail(self, *args: str, rc: int = 1) -> str:
        """The single stderr line of a refused command."""
        r = self.cli(*args)
        assert r.returncode == rc, f"berth {' '.join(args)}: rc {r.returncode}, wanted {rc}: {r.stdout}"
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("berth: "), r.stderr
        return lines[0]

    def pod_file(self, name: str, namespace: str = "default", labels: dict[str, str] | None = None) -> str:
        """A crictl pod config (snake_case names, as crictl's examples)."""
        logs = self.base / "logs" / name
        logs.mkdir(parents=True, exist_ok=True)
        doc = {
            "metadata": {"name": name, "namespace": namespace, "uid": uuid.uuid4().hex, "attempt": 1},
            "log_directory": str(logs),
            "labels": labels or {},
            "linux": {},
        }
        path = self.base / f"pod-{name}.json"
        path.write_text(json.dumps(doc))
        return path.name

    def container_file(self, name: str, *command: str, labels: dict[str, str] | None = None) -> str:
        """A container config in camelCase (protobuf JSON), the other spelling the CLI accepts."""
        doc = {
            "metadata": {"name": name},
            "image": {"image": IMAGE},
            "command": list(command),
            "logPath": f"{name}.log",
            "labels": labels or {},
        }
        path = self.base / f"ctr-{name}.json"
        path.write_text(json.dumps(doc))
        return path.name


def _cleanup(node: Node) -> None:
    with contextlib.suppress(Exception):
        node.cli("cri", "rmp", "--all", timeout=120)
    node.d.stop()
    for pid in shim_pids(node.d):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for point in sorted(mount_points_under(node.base), key=len, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True, timeout=30)
    subprocess.run(["ip", "link", "del", node.bridge], capture_output=True)


def _start(base: Path, config: str) -> Berthd:
    d = Berthd(base, config=config).start()

    def ready() -> bool:
        assert d.proc is not None and d.proc.poll() is None, d.log()
        return d.berth("cri", "version").returncode == 0

    wait_for(ready, timeout=30, what="berthd")
    return d


@pytest.fixture(scope="module")
def node() -> Iterator[Node]:
    base = Path(tempfile.mkdtemp(prefix="berth-cc-", dir="/tmp"))
    bridge = "bc" + secrets.token_hex(4)
    subnet = f"10.244.{secrets.randbelow(254) + 1}.0/24"
    (base / "net.d").mkdir()
    conf = {
        "cniVersion": "1.0.0",
        "name": "berth-cli",
        "plugins": [
            {
                "type": "bridge",
                "bridge": bridge,
                "isGateway": False,
                "ipMasq": False,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": subnet}]],
                    "dataDir": str(base / "ipam"),
                },
            }
        ],
    }
    (base / "net.d" / "10-pods.conflist").write_text(json.dumps(conf))
    n = Node(Berthd(base, config=berthd_config(base)), base, bridge)
    try:
        n.d = _start(base, berthd_config(base))
        archive = oci_archive(busybox_image(), base / "bb.tar", image_name=IMAGE)
        n.ok("--namespace", "k8s.io", "images", "import", str(archive))
        yield n
    finally:
        _cleanup(n)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def clean(node: Node) -> Iterator[Node]:
    """The module's node, with every pod (and so every container) removed after the test."""
    try:
        yield node
    finally:
        node.cli("cri", "rmp", "--all", timeout=120)


def _state(node: Node, cid: str) -> dict[str, Any]:
    status: dict[str, Any] = json.loads(node.ok("cri", "inspect", cid))["status"]
    return status


class Lines:
    """A long-running ``berth cri ...`` child whose stdout lines a thread collects."""

    def __init__(self, node: Node, *args: str) -> None:
        self.proc = subprocess.Popen(
            [str(BIN / "berth"), "--address", node.d.address, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self._t = threading.Thread(target=self._read, daemon=True)
        self._t.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._t.join(timeout=5)


def test_round_trip_with_exit_codes(clean: Node) -> None:
    n = clean
    events = Lines(n, "cri", "events")
    try:
        pod = n.ok("cri", "runp", n.pod_file("rt", labels={"app": "rt"})).strip()
        assert re.fullmatch(r"[0-9a-f]{64}", pod)
        table = n.ok("cri", "pods")
        assert pod[:13] in table and "Ready" in table and pod not in table
        assert pod in n.ok("cri", "pods", "--no-trunc")
        inspected = json.loads(n.ok("cri", "inspectp", pod))
        assert inspected["status"]["state"] == "SANDBOX_READY" and inspected["status"]["network"]["ip"]

        script = "echo hello; echo oops >&2; exec sleep 1000"
        cfile = n.container_file("app", "sh", "-c", script, labels={"tier": "web"})
        cid = n.ok("cri", "create", pod, cfile, n.pod_file("rt", labels={"app": "rt"})).strip()
        assert cid not in n.ok("cri", "ps", "-q"), "a created container is not running"
        assert "Created" in n.ok("cri", "ps", "-a")
        assert n.ok("cri", "start", cid).strip() == cid
        assert n.ok("cri", "ps", "-q").split() == [cid]
        status = _state(n, cid)
        assert status["state"] == "CONTAINER_RUNNING" and status["labels"] == {"tier": "web"}

        created = wait_for(
            lambda: [ln for ln in events.lines if cid in ln], what="CRI events of the container"
        )
        assert json.loads(created[0])["containerEventType"] == "CONTAINER_CREATED_EVENT"

        r = n.cli("cri", "exec", "-s", cid, "sh", "-c", "echo out; echo err >&2; exit 3")
        assert (r.returncode, r.stdout, r.stderr) == (3, "out\n", "err\n")
        assert n.ok("cri", "exec", "--sync", cid, "cat", "/etc/hostname").strip()
        r = n.cli("cri", "exec", "-i", cid, "sh", "-c", "cat; exit 5", stdin="through the stream\n")
        assert (r.returncode, r.stdout) == (5, "through the stream\n"), r.stderr

        wait_for(lambda: "oops" in n.cli("cri", "logs", cid).stderr, what="both log lines")
        r = n.cli("cri", "logs", cid)
        assert (r.returncode, r.stdout, r.stderr) == (0, "hello\n", "oops\n")
        assert n.cli("cri", "logs", "--tail", "1", cid).stdout + n.cli(
            "cri", "logs", "--tail", "1", cid
        ).stderr in (
            "oops\n",
            "hello\n",
        )
        stamped = n.ok("cri", "logs", "-t", cid)
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT[\d:.]+Z hello\n", stamped), stamped

        assert "is running" in n.fail("cri", "rm", cid)
        assert n.ok("cri", "stop", "-t", "1", cid).strip() == cid
        assert _state(n, cid)["state"] == "CONTAINER_EXITED"
        assert n.ok("cri", "ps", "--state", "exited", "-q").split() == [cid]
        assert n.ok("cri", "rm", cid).strip() == cid
        assert cid not in n.ok("cri", "ps", "-a", "-q")
        assert n.ok("cri", "stopp", pod).strip() == f"Stopped sandbox {pod}"
        assert "NotReady" in n.ok("cri", "pods")
        assert n.ok("cri", "rmp", pod).strip() == f"Removed sandbox {pod}"
        assert n.ok("cri", "pods", "-q") == ""
    finally:
        events.close()


def test_run_filters_and_json(clean: Node) -> None:
    n = clean
    c1 = n.ok(
        "cri",
        "run",
        n.container_file("one", "sleep", "1000", labels={"k": "1"}),
        n.pod_file("pa", "ns1", {"app": "a"}),
    )
    c2 = n.ok(
        "cri",
        "run",
        n.container_file("two", "sleep", "1000", labels={"k": "2"}),
        n.pod_file("pb", "ns2", {"app": "b"}),
    )
    c1, c2 = c1.strip(), c2.strip()
    pods = json.loads(n.ok("cri", "pods", "-o", "json"))["items"]
    by_name = {p["metadata"]["name"]: p["id"] for p in pods}
    assert set(by_name) == {"pa", "pb"}
    assert n.ok("cri", "pods", "--label", "app=a", "-q").split() == [by_name["pa"]]
    assert n.ok("cri", "pods", "--name", "^p[b]$", "-q").split() == [by_name["pb"]]
    assert n.ok("cri", "pods", "--namespace", "ns1", "-q").split() == [by_name["pa"]]
    assert n.ok("cri", "pods", "--id", by_name["pb"][:10], "-q").split() == [by_name["pb"]]
    assert n.ok("cri", "pods", "--latest", "-q").split() == [by_name["pb"]]
    assert n.ok("cri", "pods", "--state", "notready", "-q") == ""
    assert "Namespace: ns1" in n.ok("cri", "pods", "-v", "--name", "pa")

    assert sorted(n.ok("cri", "ps", "-q").split()) == sorted([c1, c2])
    assert n.ok("cri", "ps", "--pod", by_name["pa"], "-q").split() == [c1]
    assert n.ok("cri", "ps", "--label", "k=2", "-q").split() == [c2]
    assert n.ok("cri", "ps", "--name", "tw", "-q").split() == [c2]
    listed = json.loads(n.ok("cri", "ps", "-o", "json"))["containers"]
    assert {c["id"] for c in listed} == {c1, c2} and all(c["state"] == "CONTAINER_RUNNING" for c in listed)
    table = n.ok("cri", "ps")
    assert "POD ID" in table and " pa" in table and c1[:13] in table

    stats = n.ok("cri", "stats")
    assert c1[:13] in stats and "one" in stats
    assert "pb" in n.ok("cri", "statsp")
    assert "--state" in n.fail("cri", "ps", "--state", "sleeping")
    # rmp --force takes a ready pod down with its containers.
    assert n.ok("cri", "rmp", "-f", by_name["pa"]).strip() == f"Removed sandbox {by_name['pa']}"
    assert n.ok("cri", "ps", "-a", "-q").split() == [c2]


def test_logs_follow_ends_when_the_container_exits(clean: Node) -> None:
    n = clean
    # A 40000-byte line is written as 16 KiB pieces (P) and one F: logs joins them back.
    script = (
        "for i in 1 2 3; do echo line$i; sleep 0.2; done; head -c 40000 /dev/zero | tr '\\0' x; echo; exit 7"
    )
    cfile = n.container_file("talker", "sh", "-c", script)
    pod = n.ok("cri", "runp", n.pod_file("lf")).strip()
    cid = n.ok("cri", "create", pod, cfile, n.pod_file("lf")).strip()
    follow = subprocess.Popen(
        [str(BIN / "berth"), "--address", n.d.address, "cri", "logs", "-f", cid],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        n.ok("cri", "start", cid)
        out, err = follow.communicate(timeout=30)
    finally:
        if follow.poll() is None:
            follow.kill()
            follow.wait()
    assert follow.returncode == 0, err
    assert out == "line1\nline2\nline3\n" + "x" * 40000 + "\n"
    status = _state(n, cid)
    assert (status["state"], status["exitCode"]) == ("CONTAINER_EXITED", 7)
    assert n.ok("cri", "logs", "--tail", "2", cid) == "line3\n" + "x" * 40000 + "\n"


def test_errors_are_one_line_and_exit_1(clean: Node) -> None:
    n = clean
    assert n.fail("cri", "inspect", "nope").startswith("berth: not found:")
    assert n.fail("cri", "inspectp", "nope").startswith("berth: not found:")
    assert "no such file" in n.fail("cri", "runp", "missing.json")
    (n.base / "bad.json").write_text("{not json")
    assert "not valid JSON" in n.fail("cri", "runp", "bad.json")
    (n.base / "list.json").write_text("[]")
    assert "expected a JSON object" in n.fail("cri", "runp", "list.json")
    (n.base / "empty.json").write_text("{}")
    assert n.fail("cri", "runp", "empty.json").startswith("berth: invalid argument:")
    assert "no command" in n.fail("cri", "exec", "abc")
    assert "no such image" in n.fail("cri", "rmi", "docker.io/library/absent:1")
    assert "no such image" in n.fail("cri", "inspecti", "absent:1")
    # Stop and remove of unknown ids are idempotent, as in containerd.
    assert n.ok("cri", "stop", "0123456789ab").strip() == "0123456789ab"
    assert n.ok("cri", "stopp", "0123456789ab").strip() == "Stopped sandbox 0123456789ab"
    info = json.loads(n.ok("cri", "info"))
    assert {c["type"] for c in info["status"]["conditions"]} >= {"RuntimeReady", "NetworkReady"}
    assert "RuntimeApiVersion:  v1" in n.ok("cri", "version")
    gone = subprocess.run(
        [str(BIN / "berth"), "--address", str(n.base / "nothing.sock"), "cri", "ps"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert gone.returncode == 3 and gone.stderr.startswith("berth: cannot connect")


@pytest.fixture(scope="module")
def registry() -> Iterator[Registry]:
    reg = Registry(users={USER: PASSWORD})
    try:
        reg.start()
        push_image_sync(reg.url, "team/tool", "1", busybox_image("gzip", user="1000"), USER, PASSWORD)
        yield reg
    finally:
        reg.stop()


def test_images_pull_rmi(clean: Node, registry: Registry) -> None:
    n = clean
    table = n.ok("cri", "images")
    assert re.search(r"docker\.io/library/busybox\s+latest\s+[0-9a-f]{13}\s+[\d.]+[kM]B", table), table
    ids = n.ok("cri", "images", "-q").split()
    assert ids and all(i.startswith("sha256:") for i in ids)

    ref = f"{registry.address}/team/tool:1"
    assert n.cli("cri", "pull", "--creds", f"{USER}:wrong", ref).returncode == 1
    pulled = n.ok("cri", "pull", "--creds", f"{USER}:{PASSWORD}", ref).strip()
    assert re.fullmatch(r"Image is up to date for sha256:[0-9a-f]{64}", pulled)
    image_id = pulled.rpartition(" ")[2]
    assert image_id in n.ok("cri", "images", "-q").split()
    assert f"{registry.address}/team/tool" in n.ok("cri", "images", "--digests")
    status = json.loads(n.ok("cri", "inspecti", ref))["status"]
    assert status["id"] == image_id and status["repoTags"] == [ref]
    assert n.ok("cri", "rmi", ref).strip() == f"Deleted: {ref}"
    assert image_id not in n.ok("cri", "images", "-q").split()
    assert json.loads(n.ok("cri", "imagefsinfo"))["status"]["imageFilesystems"]


async def test_cri_demo_end_to_end(make_berthd: Callable[..., Berthd], short_tmp: Path) -> None:
    work = short_tmp / "demo"
    work.mkdir()
    d = make_berthd(config=berthd_config(work), name="demo").start()
    await d.wait_ready()
    archive = oci_archive(
        busybox_image(), short_tmp / "bb.tar", image_name="docker.io/library/busybox:latest"
    )
    out = io.StringIO()
    bridge = ""
    try:
        started = time.monotonic()
        result = await run_cri_demo(d.address, work, archive=archive, out=out)
        bridge = result.bridge
        assert SERVED in result.fetcher_log, out.getvalue()
        assert result.fetcher_exit_code == 0
        assert f"fetching http://{result.pod_ip}:8080/" in result.fetcher_log
        assert "serving /www on :8080" in result.server_log
        shown = out.getvalue()
        assert "$ berth cri logs -f" in shown and "$ berth cri rmp" in shown
        assert time.monotonic() - started < 60
        # Everything is gone: pods, containers, the bridge.
        assert d.berth("cri", "pods", "-q").stdout == "" and d.berth("cri", "ps", "-a", "-q").stdout == ""
        assert subprocess.run(["ip", "link", "show", bridge], capture_output=True).returncode != 0
    finally:
        with contextlib.suppress(Exception):
            d.berth("cri", "rmp", "--all", timeout=120)
        d.stop()
        for pid in shim_pids(d):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for point in sorted(mount_points_under(short_tmp), key=len, reverse=True):
            subprocess.run(["umount", "-l", point], capture_output=True, timeout=30)
        for link in [bridge] if bridge else []:
            subprocess.run(["ip", "link", "del", link], capture_output=True)
