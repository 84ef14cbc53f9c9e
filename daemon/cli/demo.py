"""``make demo``: start berthd on a temporary root with its embedded defaults,
show what it is through the ``berth`` CLI, stop it, clean up.

It drives the real binaries exactly as an operator would, so it doubles as a
smoke test of a fresh install.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent


def _run(*argv: str) -> None:
    print(f"\n$ {' '.join(argv)}", flush=True)
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


def main() -> int:
    tmp = Path(tempfile.mkdtemp(prefix="berth-demo-"))
    address = str(tmp / "state" / "berth.sock")
    log = open(tmp / "berthd.log", "wb")  # noqa: SIM115 - closed in finally
    argv = [
        str(BIN / "berthd"),
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
        _run("berth", "--address", address, "gc")
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
        print(f"\nberthd stopped (exit {proc.returncode}); its log:", flush=True)
        sys.stdout.write((tmp / "berthd.log").read_text(errors="replace"))
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
