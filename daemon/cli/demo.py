"""``make demo``: start berthd on a temporary root with its embedded defaults,
show what it is through the ``berth`` CLI, import a busybox image, run a
container that prints to the terminal, then a pod through CRI (two containers
talking over the pod network, their logs shown), stop berthd, clean up.

The one setting that is not a default is the CRI plugin's CNI conf dir: it
points into the temporary directory, so the demo never writes a network into
the host's ``/etc/cni/net.d`` (the config file is printed before berthd starts).

It drives the real binaries exactly as an operator would, so it doubles as a
smoke test of a fresh install. There is no network here: the busybox image
is built from the host's ``/bin/busybox`` by the test suite's image builder
(``tests/support/oci.py``), so the demo runs from a source checkout.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from daemon.cli.cridemo import DemoError, berthd_config, run_cri_demo

BIN = Path(sys.executable).parent
DEMO_IMAGE = "docker.io/library/busybox:latest"


def _busybox_archive(tmp: Path) -> Path:
    """An OCI archive of the test busybox image named :data:`DEMO_IMAGE` (built, not downloaded)."""
    try:
        from tests.support.oci import busybox_image, oci_archive
    except ImportError as exc:
        raise SystemExit(
            f"the demo builds its image with tests/support/oci.py: run it from a checkout ({exc})"
        ) from None
    path = tmp / "busybox.tar"
    print(f"\n# building {DEMO_IMAGE} from /bin/busybox into {path}", flush=True)
    return oci_archive(busybox_image("gzip"), path, image_name=DEMO_IMAGE)


def _run(*argv: str) -> None:
    print(f"\n$ {shlex.join(argv)}", flush=True)
    subprocess.run([str(BIN / argv[0]), *argv[1:]], check=True)


def _wait_ready(proc: subprocess.Popen[bytes], address: str, deadline: float) -> None:
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"berthd exited early with code {proc.returncode}")
        probe = subprocess.run(
            [str(BIN / "berth"), "--address", address, "version"], capture_output=True, check=False
        )
        if probe.returncode == 0:
            return
        time.sleep(0.1)
    raise SystemExit("berthd did not become ready within 30 s")


def _namespace_cgroups() -> set[Path]:
    """The per-namespace cgroup parents runc makes for cgroupsPath ``/<namespace>/<id>``."""
    root = Path("/sys/fs/cgroup")
    found = set()
    for hierarchy in root.iterdir() if root.is_dir() else ():
        found |= {hierarchy / ns for ns in ("default", "k8s.io") if (hierarchy / ns).is_dir()}
    return found


def main() -> int:
    cgroups_before = _namespace_cgroups()
    tmp = Path(tempfile.mkdtemp(prefix="berth-demo-"))
    address = str(tmp / "state" / "berth.sock")
    log = open(tmp / "berthd.log", "wb")  # noqa: SIM115 - closed in finally
    config = tmp / "config.toml"
    config.write_text(berthd_config(tmp / "cri"))
    print(f"$ cat {config}\n{config.read_text()}", flush=True)
    argv = [
        str(BIN / "berthd"),
        "--config",
        str(config),
        "--root",
        str(tmp / "root"),
        "--state",
        str(tmp / "state"),
        "--address",
        address,
    ]
    print(f"$ {' '.join(argv)} &", flush=True)
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_ready(proc, address, time.monotonic() + 30)
        _run("berth", "--address", address, "version")
        _run("berth", "--address", address, "plugins", "ls")
        _run("berth", "--address", address, "namespaces", "create", "demo", "team=berth")
        _run("berth", "--address", address, "namespaces", "ls")
        _run("berth", "--address", address, "namespaces", "rm", "demo")
        _run("berth", "--address", address, "images", "ls")
        archive = _busybox_archive(tmp)
        _run("berth", "--address", address, "images", "import", str(archive))
        _run("berth", "--address", address, "images", "ls")
        _run(
            "berth",
            "--address",
            address,
            "run",
            "--rm",
            DEMO_IMAGE,
            "hello",
            "sh",
            "-c",
            'echo "hello from a berth container: $(uname -n), pid $$, as $(id -un)"',
        )
        _run("berth", "--address", address, "containers", "ls")
        _run("berth", "--address", address, "gc")
        print("\n# a pod through CRI: one container serves HTTP, the other fetches it over the pod network")
        (tmp / "cri").mkdir()
        try:
            asyncio.run(run_cri_demo(address, tmp / "cri", archive=archive))
        except DemoError as exc:
            print(f"CRI demo failed: {exc}", file=sys.stderr)
            return 1
        return 0
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()
        lines = (tmp / "berthd.log").read_text(errors="replace").splitlines(keepends=True)
        print(f"\nberthd stopped (exit {proc.returncode}); last 25 of {len(lines)} log lines:", flush=True)
        sys.stdout.writelines(lines[-25:])
        shutil.rmtree(tmp, ignore_errors=True)
        for parent in _namespace_cgroups() - cgroups_before:  # the demo's own, once empty
            with contextlib.suppress(OSError):
                parent.rmdir()


if __name__ == "__main__":
    sys.exit(main())
