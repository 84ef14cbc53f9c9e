"""What a shim process imports: lean.trim keeps ssl, importlib.metadata and dateutil out, behaviour kept.

Each check runs in a fresh interpreter (the point is what gets imported, and
trim must never touch the test process's own modules).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _run(code: str) -> dict[str, object]:
    """Run ``code`` in a fresh interpreter; it prints one JSON object as its last line."""
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stderr
    result: dict[str, object] = json.loads(proc.stdout.splitlines()[-1])
    return result


def test_trim_keeps_unused_libraries_out_and_betterproto_whole() -> None:
    out = _run(
        """
import json, sys
from plugins.runtime.runc_v2.shim import lean
lean.trim()
import asyncio, hashlib, betterproto
from datetime import datetime, timezone
from protos.containerd.events import TaskExit
loaded = {m: m in sys.modules and sys.modules[m] is not None
          for m in ("ssl", "_hashlib", "importlib.metadata", "email", "dateutil.parser")}
try:
    import ssl
    ssl_import = "ok"
except ImportError:
    ssl_import = "ImportError"
version = betterproto.__version__
exited = TaskExit().from_dict({"exitedAt": "2024-01-02T03:04:05Z"}).exited_at
import dateutil.parser
from importlib.metadata import version as dist_version
print(json.dumps({
    "loaded": loaded,
    "ssl_import": ssl_import,
    "asyncio_ssl": asyncio.base_events.ssl is None,
    "sha256": hashlib.sha256(b"berth").hexdigest(),
    "version": version,
    "dist_version": dist_version("betterproto"),
    "exited": exited == datetime(2024, 1, 2, 3, 4, 5, tzinfo=timezone.utc),
    "real_parser": hasattr(dateutil.parser, "parse"),
}))
"""
    )
    assert out["loaded"] == {
        "ssl": False,
        "_hashlib": False,
        "importlib.metadata": False,
        "email": False,
        # betterproto's stand-in is gone again; the real one comes with the first JSON timestamp.
        "dateutil.parser": False,
    }
    assert out["ssl_import"] == "ImportError"
    assert out["asyncio_ssl"] is True
    assert out["sha256"] == hashlib.sha256(b"berth").hexdigest()  # builtin sha256, same digest
    assert out["version"] == out["dist_version"]
    assert out["exited"] is True
    assert out["real_parser"] is True


def test_zygote_preloads_no_grpc_server_tls_or_metadata() -> None:
    """The zygote's heap is every forked shim's RSS: none of these may creep back into it."""
    out = _run(
        """
import importlib, json, sys
from plugins.runtime.runc_v2.shim import lean
lean.trim()
from plugins.runtime.runc_v2.shim.zygote import SHIM_MODULES, warm_messages
for name in SHIM_MODULES:
    importlib.import_module(name)
warmed = warm_messages()
print(json.dumps({"modules": sorted(m for m, v in sys.modules.items() if v is not None), "warmed": warmed}))
"""
    )
    modules = set(out["modules"])  # type: ignore[call-overload]
    unwanted = {"ssl", "_ssl", "_hashlib", "grpclib.server", "h2", "importlib.metadata", "dateutil", "email"}
    assert not modules & unwanted
    assert {"plugins.runtime.runc_v2.shim.service", "protos.containerd.task.v2"} <= modules
    assert isinstance(out["warmed"], int) and out["warmed"] > 50


def test_protos_load_grpclib_server_only_for_service_bases() -> None:
    out = _run(
        """
import json, sys
import protos.containerd.task.v2 as task
from protos.containerd.task.v2 import CreateTaskRequest, TaskStub
before = "grpclib.server" in sys.modules
from protos.containerd.task.v2 import TaskBase
try:
    task.NoSuchThing
    missing = "found"
except AttributeError as exc:
    missing = str(exc)
print(json.dumps({
    "before": before,
    "after": "grpclib.server" in sys.modules,
    "paths": sorted(TaskBase().__mapping__())[:2],
    "request": CreateTaskRequest.__module__,
    "missing": missing,
}))
"""
    )
    assert out["before"] is False
    assert out["after"] is True
    assert out["paths"] == ["/containerd.task.v2.Task/Checkpoint", "/containerd.task.v2.Task/CloseIO"]
    assert out["request"] == "protos.containerd.task.v2"
    assert out["missing"] == "module 'protos.containerd.task.v2' has no attribute 'NoSuchThing'"
