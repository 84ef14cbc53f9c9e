"""Running one CNI plugin binary, by the spec's protocol.

A plugin is an executable named by its config's ``type``, looked up in the
bin dirs. It gets the operation in ``CNI_*`` environment variables and its
config on stdin, and answers with JSON on stdout: a result for ADD, nothing
for DEL and CHECK, a version list for VERSION, or an error object
(``code``, ``msg``, ``details``) with a non-zero exit status.

The config a plugin sees is derived from its entry in the list (spec 1.0,
"Deriving execution configuration"): the list's ``name`` and ``cniVersion``
are injected, the previous plugin's result as ``prevResult`` for chained
plugins, and ``runtimeConfig`` carries the capability arguments (for example
``portMappings``) that the plugin declares it wants under ``capabilities``.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from daemon.errors import BerthError, DeadlineExceeded, FailedPrecondition, InvalidArgument

log = structlog.get_logger("berth.cri.cni")

DEFAULT_BIN_DIRS = ("/opt/cni/bin", "/usr/lib/cni")
DEFAULT_TIMEOUT = 60.0
COMMANDS = ("ADD", "DEL", "CHECK", "VERSION")


class CniPluginError(BerthError):
    """A plugin failed; the message has its type, command, error code, msg and details.

    It maps to gRPC UNKNOWN, as containerd's "failed to setup network" does.
    """

    def __init__(self, message: str, *, code: int | None = None, msg: str = "", details: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.msg = msg
        self.details = details


@dataclass(frozen=True)
class Invocation:
    """The per-container part of a call: what goes into ``CNI_*`` besides the command."""

    container_id: str
    netns: str
    ifname: str = "eth0"
    args: tuple[tuple[str, str], ...] = ()

    def cni_args(self) -> str:
        """``CNI_ARGS``: ``K=V`` pairs joined by ``;``; InvalidArgument for a value that would break it."""
        for key, value in self.args:
            if not key or any(c in key + value for c in ";="):
                raise InvalidArgument(f"CNI_ARGS {key}={value!r}: keys and values must not hold ';' or '='")
        return ";".join(f"{k}={v}" for k, v in self.args)


def find_plugin(kind: str, bin_dirs: Sequence[str | os.PathLike[str]]) -> Path:
    """The executable for plugin ``kind``; FailedPrecondition naming it and the dirs searched."""
    for directory in bin_dirs:
        candidate = Path(directory) / kind
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    dirs = ", ".join(os.fspath(d) for d in bin_dirs)
    raise FailedPrecondition(f'CNI plugin binary "{kind}" not found in bin_dirs [{dirs}]')


def plugin_config(
    plugin: Mapping[str, Any],
    *,
    name: str,
    cni_version: str,
    prev_result: Mapping[str, Any] | None = None,
    capability_args: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The stdin config of one plugin of a list, as the spec derives it."""
    conf = dict(plugin)
    conf["name"] = name
    conf["cniVersion"] = cni_version
    if prev_result is not None:
        conf["prevResult"] = dict(prev_result)
    caps = plugin.get("capabilities")
    if isinstance(caps, dict) and capability_args:
        runtime = dict(conf.get("runtimeConfig") or {})
        for cap, wanted in caps.items():
            if wanted is True and cap in capability_args:
                runtime[cap] = capability_args[cap]
        if runtime:
            conf["runtimeConfig"] = runtime
    return conf


def environment(
    command: str, call: Invocation | None, bin_dirs: Sequence[str | os.PathLike[str]]
) -> dict[str, str]:
    """Our environment plus the ``CNI_*`` variables (plugins such as portmap need ``PATH``)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CNI_")}
    env["CNI_COMMAND"] = command
    env["CNI_PATH"] = os.pathsep.join(os.fspath(d) for d in bin_dirs)
    if call is not None:
        env["CNI_CONTAINERID"] = call.container_id
        env["CNI_NETNS"] = call.netns
        env["CNI_IFNAME"] = call.ifname
        env["CNI_ARGS"] = call.cni_args()
    return env


def _error(kind: str, command: str, status: int, stdout: bytes, stderr: bytes) -> CniPluginError:
    where = f"CNI plugin {kind} {command} failed"
    try:
        doc = json.loads(stdout)
    except ValueError:
        doc = None
    if isinstance(doc, dict) and "msg" in doc:
        code = doc.get("code") if isinstance(doc.get("code"), int) else None
        msg, details = str(doc.get("msg", "")), str(doc.get("details", ""))
        text = f"{where} (code {code}): {msg}" + (f": {details}" if details else "")
        return CniPluginError(text, code=code, msg=msg, details=details)
    output = (stderr or stdout).decode(errors="replace").strip()[-2000:]
    return CniPluginError(f"{where} (exit status {status}): {output or 'no output'}", msg=output)


async def run_plugin(
    binary: Path,
    command: str,
    env: Mapping[str, str],
    stdin: bytes,
    *,
    timeout: float = DEFAULT_TIMEOUT,  # noqa: ASYNC109 - the plugin is killed at it
) -> Any:
    """Run ``binary`` once; the parsed stdout JSON (None when it printed nothing).

    CniPluginError for a non-zero exit (the plugin's error object in the
    message) or output that is not JSON; DeadlineExceeded when it runs longer
    than ``timeout`` (it is then killed, by its PID, and reaped).
    """
    kind = binary.name
    try:
        proc = await asyncio.create_subprocess_exec(
            os.fspath(binary),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=dict(env),
            start_new_session=True,
        )
    except OSError as exc:
        raise FailedPrecondition(
            f"CNI plugin {kind} {command}: cannot run {binary}: {exc.strerror}"
        ) from None
    try:
        stdout, stderr = await asyncio.wait_for(proc.communicate(stdin), timeout)
    except TimeoutError:
        raise DeadlineExceeded(f"CNI plugin {kind} {command}: no answer within {timeout:g}s") from None
    finally:
        if proc.returncode is None:
            os.kill(proc.pid, signal.SIGKILL)
            await proc.wait()
    status = proc.returncode if proc.returncode is not None else -1
    log.debug("cni.exec", plugin=kind, command=command, status=status)
    if status != 0:
        raise _error(kind, command, status, stdout, stderr)
    if not stdout.strip():
        return None
    try:
        return json.loads(stdout)
    except ValueError:
        text = stdout.decode(errors="replace")[:500]
        raise CniPluginError(f"CNI plugin {kind} {command}: output is not JSON: {text!r}") from None


async def exec_plugin(
    plugin: Mapping[str, Any],
    command: str,
    call: Invocation,
    *,
    name: str,
    cni_version: str,
    bin_dirs: Sequence[str | os.PathLike[str]] = DEFAULT_BIN_DIRS,
    prev_result: Mapping[str, Any] | None = None,
    capability_args: Mapping[str, Any] | None = None,
    timeout: float = DEFAULT_TIMEOUT,  # noqa: ASYNC109 - the plugin is killed at it
) -> Any:
    """One plugin of a list for ADD, DEL or CHECK: find it, derive its config, run it."""
    if command not in COMMANDS:
        raise InvalidArgument(f"CNI command {command!r}: must be one of {list(COMMANDS)}")
    binary = find_plugin(str(plugin["type"]), bin_dirs)
    conf = plugin_config(
        plugin, name=name, cni_version=cni_version, prev_result=prev_result, capability_args=capability_args
    )
    env = environment(command, call, bin_dirs)
    return await run_plugin(binary, command, env, json.dumps(conf).encode(), timeout=timeout)


async def plugin_versions(
    kind: str,
    bin_dirs: Sequence[str | os.PathLike[str]] = DEFAULT_BIN_DIRS,
    *,
    timeout: float = DEFAULT_TIMEOUT,  # noqa: ASYNC109 - the plugin is killed at it
) -> list[str]:
    """The spec versions plugin ``kind`` supports (the VERSION command)."""
    binary = find_plugin(kind, bin_dirs)
    env = environment("VERSION", None, bin_dirs)
    doc = await run_plugin(
        binary, "VERSION", env, json.dumps({"cniVersion": "1.0.0"}).encode(), timeout=timeout
    )
    versions = doc.get("supportedVersions") if isinstance(doc, dict) else None
    if not isinstance(versions, list):
        raise CniPluginError(f"CNI plugin {kind} VERSION: no supportedVersions in {doc!r}")
    return [str(v) for v in versions]
