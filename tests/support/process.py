"""Ending a child process that a test or fixture started, by its PID."""

from __future__ import annotations

import os
import signal
import subprocess


def stop_by_pid(proc: subprocess.Popen[bytes], grace: float) -> None:
    """SIGTERM, then SIGKILL once ``grace`` seconds pass; returns once the child is reaped.

    Signals go to ``proc.pid`` only (never a name match), so parallel test runs
    cannot end each other's processes. A child that already exited is left alone.
    """
    if proc.poll() is not None:
        return
    os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
