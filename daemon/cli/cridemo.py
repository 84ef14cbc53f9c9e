"""The CRI part of ``make demo``: a pod with two containers talking over the pod network.

Driven through ``berth cri`` exactly as an operator would drive crictl: a CNI
network of its own (a bridge with a unique name, host-local addresses from a
/24 of 10.244.0.0/16, no gateway, no masquerade, no routes, so nothing leaves
the machine), the busybox image imported into ``k8s.io``, a pod from a
crictl-style JSON file, a ``server`` container serving a page with busybox
httpd and a ``fetcher`` container fetching it from the pod's IP, then the
logs of both. Everything made is taken down at the end, even after a failure:
containers, pod (CNI DEL with it), bridge.

The berthd it talks to must read CNI configurations from ``<workdir>/net.d``:
start it with ``--config`` pointing at a file holding :func:`berthd_config`.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shlex
import sys
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from daemon.cli import podnet

BIN = Path(sys.executable).parent
DEMO_IMAGE = "docker.io/library/busybox:latest"
SERVED = "hello from the server container, over the pod network"
CNI_BIN_DIRS = ("/usr/lib/cni", "/opt/cni/bin")
PORT = 8080
#: Bound on each CLI call, and on the fetcher's run (followed with ``logs -f``).
STEP_TIMEOUT = 60.0


class DemoError(Exception):
    """A step of the demo failed; the message names the command and what it printed."""


def berthd_config(workdir: Path) -> str:
    """The config.toml a demo berthd needs: the CRI plugin's CNI conf dir inside ``workdir``."""
    dirs = ", ".join(json.dumps(d) for d in CNI_BIN_DIRS)
    return f'version = 1\n[plugins."berth.cri.v1.cri"]\nconf_dir = "{workdir}/net.d"\nbin_dirs = [{dirs}]\n'


@dataclass(frozen=True)
class CriDemoResult:
    pod_id: str
    pod_ip: str
    bridge: str
    server_id: str
    fetcher_id: str
    fetcher_exit_code: int
    server_log: str
    fetcher_log: str


class _Shell:
    """Runs ``berth`` commands in ``workdir``, echoing each with its output to ``out``."""

    def __init__(self, address: str, workdir: Path, out: TextIO, berth: Sequence[str]) -> None:
        self.workdir = workdir
        self.out = out
        self.berth = list(berth)
        self.env = {**os.environ, "BERTH_ADDRESS": address}

    def say(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()

    async def run(self, *args: str, check: bool = True, echo: bool = True) -> str:
        if echo:
            self.say(f"\n$ berth {shlex.join(args)}")
        proc = await asyncio.create_subprocess_exec(
            *self.berth,
            *args,
            cwd=self.workdir,
            env=self.env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            stdout, stderr = await asyncio.wait_for(proc.communicate(), STEP_TIMEOUT)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise DemoError(f"berth {shlex.join(args)}: no answer within {STEP_TIMEOUT:.0f}s") from None
        text = stdout.decode(errors="replace")
        errors = stderr.decode(errors="replace")
        if echo:
            self.out.write(text + errors)
            self.out.flush()
        if check and proc.returncode != 0:
            raise DemoError(f"berth {shlex.join(args)} exited {proc.returncode}: {errors.strip()}")
        return text


def _conflist(workdir: Path, bridge: str, subnet: str) -> dict[str, Any]:
    return podnet.conflist("berth-demo", bridge, subnet, workdir / "cni-ipam")


def _container(name: str, command: list[str]) -> dict[str, Any]:
    """A ContainerConfig in crictl's JSON shape."""
    return {
        "metadata": {"name": name},
        "image": {"image": DEMO_IMAGE},
        "command": command,
        "log_path": f"{name}.log",
        "linux": {"security_context": {"namespace_options": {"pid": 1}}},
    }


def _write_json(path: Path, doc: dict[str, Any]) -> Path:
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return path


def _build_archive(workdir: Path) -> Path:
    """busybox from the host's ``/bin/busybox`` (tests/support/oci.py), named :data:`DEMO_IMAGE`."""
    try:
        from tests.support.oci import busybox_image, oci_archive
    except ImportError as exc:
        raise DemoError(f"the demo builds its image with tests/support/oci.py (a checkout): {exc}") from None
    return oci_archive(busybox_image("gzip"), workdir / "busybox.tar", image_name=DEMO_IMAGE)


async def _delete_link(name: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        "ip", "link", "del", name, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
    )
    await proc.wait()


async def run_cri_demo(
    address: str,
    workdir: Path,
    *,
    archive: Path | None = None,
    out: TextIO | None = None,
    berth: Sequence[str] | None = None,
) -> CriDemoResult:
    """Run the demo against the berthd at ``address``; what it showed, for callers that check it.

    ``archive``: an OCI archive naming :data:`DEMO_IMAGE` (built into
    ``workdir`` when not given). ``out``: where commands and their output are
    echoed (stdout by default). ``berth``: the CLI's argv prefix. Raises
    :class:`DemoError` when a step fails, after cleaning up.
    """
    sh = _Shell(address, workdir, out or sys.stdout, berth or [str(BIN / "berth")])
    bridge = "bd" + secrets.token_hex(4)
    subnet = f"10.244.{secrets.randbelow(254) + 1}.0/24"
    (workdir / "net.d").mkdir(parents=True, exist_ok=True)
    _write_json(workdir / "net.d" / "10-berth-demo.conflist", _conflist(workdir, bridge, subnet))
    logs = workdir / "pod-logs"
    logs.mkdir(parents=True, exist_ok=True)
    pod_id = ""
    try:
        sh.say(f"\n# CRI demo: export BERTH_ADDRESS={address}")
        sh.say(f"# pod network: CNI bridge {bridge}, host-local {subnet}, no gateway, no routes out")
        await sh.run("cri", "version")
        if archive is None:
            archive = _build_archive(workdir)
        await sh.run("--namespace", "k8s.io", "images", "import", str(archive))
        await sh.run("cri", "images")

        _write_json(
            workdir / "pod.json",
            {
                "metadata": {"name": "web", "namespace": "demo", "uid": uuid.uuid4().hex, "attempt": 0},
                "hostname": "web",
                "log_directory": str(logs),
                "labels": {"app": "web"},
                # kubelet's default: a PID namespace per container (no infra process needed)
                "linux": {"security_context": {"namespace_options": {"pid": 1}}},
            },
        )
        pod_id = (await sh.run("cri", "runp", "pod.json")).strip()
        status = json.loads(await sh.run("cri", "inspectp", pod_id, echo=False))["status"]
        pod_ip = status["network"]["ip"]
        sh.say(f"# the pod's IP, from `berth cri inspectp`: {pod_ip}")
        await sh.run("cri", "pods")

        serve = (
            f"mkdir -p /www && echo '{SERVED}' > /www/index.html && echo 'serving /www on :{PORT}' "
            f"&& exec httpd -f -v -p {PORT} -h /www"
        )
        _write_json(workdir / "server.json", _container("server", ["sh", "-c", serve]))
        server_id = (await sh.run("cri", "create", pod_id, "server.json", "pod.json")).strip()
        await sh.run("cri", "start", server_id)

        url = f"http://{pod_ip}:{PORT}/"
        fetch = (
            f"echo 'fetching {url}'; "
            f"for i in $(seq 1 100); do wget -qO- {url} && exit 0; sleep 0.1; done; "
            "echo 'no answer' >&2; exit 1"
        )
        _write_json(workdir / "fetcher.json", _container("fetcher", ["sh", "-c", fetch]))
        fetcher_id = (await sh.run("cri", "create", pod_id, "fetcher.json", "pod.json")).strip()
        await sh.run("cri", "start", fetcher_id)
        await sh.run("cri", "logs", "-f", fetcher_id)  # ends when the fetcher exits
        await sh.run("cri", "ps", "-a", "--pod", pod_id)
        # Stopped first, so that its log holds every line it wrote (httpd logs after answering).
        await sh.run("cri", "stop", server_id)
        fetcher_log = await sh.run("cri", "logs", fetcher_id)
        server_log = await sh.run("cri", "logs", server_id)
        fetched = json.loads(await sh.run("cri", "inspect", fetcher_id, echo=False))["status"]
        await sh.run("cri", "rm", server_id, fetcher_id)
        await sh.run("cri", "stopp", pod_id)
        await sh.run("cri", "rmp", pod_id)
        pod_id = ""
        return CriDemoResult(
            pod_id=status["id"],
            pod_ip=pod_ip,
            bridge=bridge,
            server_id=server_id,
            fetcher_id=fetcher_id,
            fetcher_exit_code=int(fetched["exitCode"]),
            server_log=server_log,
            fetcher_log=fetcher_log,
        )
    finally:
        if pod_id:
            await sh.run("cri", "rmp", "--force", pod_id, check=False)
        await _delete_link(bridge)


def main(argv: list[str] | None = None) -> int:
    """``python -m daemon.cli.cridemo ADDRESS WORKDIR``: the demo against a berthd already running."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m daemon.cli.cridemo ADDRESS WORKDIR", file=sys.stderr)
        return 2
    try:
        asyncio.run(run_cri_demo(args[0], Path(args[1])))
    except DemoError as exc:
        print(f"demo failed: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["DEMO_IMAGE", "SERVED", "CriDemoResult", "DemoError", "berthd_config", "run_cri_demo"]
