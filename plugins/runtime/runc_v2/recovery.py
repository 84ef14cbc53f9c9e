"""Restart recovery: find the shims that outlived berthd and take their tasks back.

For every bundle under the plugin's state (``<ns>/<id>/``):

* its shim answers at the recorded ``address``: reconnect (one connection per
  shim, shared by the tasks of a group), ask State, adopt the task with the
  same pid. A task that stopped while berthd was down is recorded with its
  real exit status and its ``/tasks/exit`` is published (held until a
  subscriber is attached; a copy the shim forwards is deduplicated);
* its shim is gone, or does not know the task: run the ``delete`` bootstrap
  (runc container and rootfs mount go), publish an exit (137) and remove the
  bundle;
* a bundle without ``config.json`` (a create cut short) is removed.

A reconnected shim left without tasks is shut down, and so is a shim
prepared for a group that never got a task (``TaskManager.recover_prepared``).
"""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime

import structlog

from daemon.errors import BerthError, NotFound
from daemon.protocols import ExitStatus, TaskIO, TaskStatus
from plugins.runtime.runc_v2.bundle import Bundle, LogReader, walk
from plugins.runtime.runc_v2.manager import STATE_TIMEOUT, TaskManager
from plugins.runtime.runc_v2.process import KILLED_STATUS, Process, Task, when
from plugins.runtime.runc_v2.shimpool import GROUP_ANNOTATIONS
from plugins.runtime.runc_v2.shims import Shim, remove_stale_socket
from protos.containerd.task.v2 import StateRequest, StateResponse

log = structlog.get_logger("berth.runtime.recovery")


def _group(bundle: Bundle) -> str:
    try:
        spec = json.loads((bundle.path / "config.json").read_text())
        annotations = spec.get("annotations") or {}
        return next((str(annotations[a]) for a in GROUP_ANNOTATIONS if annotations.get(a)), bundle.id)
    except (OSError, ValueError, AttributeError):
        return bundle.id


def _init_pid(bundle: Bundle) -> int:
    try:
        return int((bundle.path / "init.pid").read_text().strip())
    except (OSError, ValueError):
        return 0


async def recover(manager: TaskManager) -> tuple[int, int]:
    """Adopt live tasks and clean up dead ones; (adopted, cleaned)."""
    bundles = await asyncio.to_thread(lambda: list(walk(manager.settings.state)))
    shims: dict[str, Shim | None] = {}
    adopted = cleaned = 0
    for bundle in bundles:
        try:
            if await _recover_one(manager, bundle, shims):
                adopted += 1
            else:
                cleaned += 1
        except (BerthError, OSError) as exc:  # one broken bundle must not stop the others
            log.error("recovery.failed", bundle=str(bundle.path), error=str(exc))
    for found in shims.values():
        if found is not None and not found.tasks:
            await manager.release_shim(found)
    cleaned += await manager.recover_prepared()
    return adopted, cleaned


async def _recover_one(manager: TaskManager, bundle: Bundle, shims: dict[str, Shim | None]) -> bool:
    """Adopt ``bundle``'s task (True) or clean it up (False)."""
    if not await asyncio.to_thread(bundle.exists):
        await bundle.remove()
        return False
    address = await asyncio.to_thread(bundle.read_address)
    binary = await asyncio.to_thread(bundle.read_binary) or manager.settings.shim_binary
    shim: Shim | None = None
    if address:
        if address not in shims:
            try:
                found = await Shim.connect(
                    namespace=bundle.namespace, address=address, binary=binary, on_gone=manager.shim_gone
                )
            except BerthError as exc:
                log.info("recovery.shim_dead", bundle=str(bundle.path), address=address, error=str(exc))
                found = None
            shims[address] = found
        shim = shims[address]
    state: StateResponse | None = None
    if shim is not None and not shim.gone.is_set():
        try:
            state = await shim.call("State", StateRequest(id=bundle.id), StateResponse, timeout=STATE_TIMEOUT)
        except NotFound:
            state = None
        except BerthError as exc:
            log.warning("recovery.state_failed", bundle=str(bundle.path), error=str(exc))
            state = None
    if shim is None or state is None:
        await _clean_dead(manager, bundle, binary)
        if shim is None and address:
            await asyncio.to_thread(remove_stale_socket, address)
        return False
    shim.group = shim.group or await asyncio.to_thread(_group, bundle)
    manager.register_shim(shim)
    shim.tasks.add(bundle.id)
    io = TaskIO(stdin=state.stdin, stdout=state.stdout, stderr=state.stderr, terminal=state.terminal)
    proc = Process(bundle.id, "", io, state.pid)
    reader = LogReader(bundle.log_fifo, namespace=bundle.namespace, shim=bundle.id)
    reader.open()
    manager.adopt(Task(bundle.namespace, bundle.id, bundle, shim, proc, log=reader))
    if TaskStatus(int(state.status)) == TaskStatus.STOPPED:
        exit_ = ExitStatus(state.pid, state.exit_status, when(state.exited_at))
        manager.publish_exit(bundle.namespace, bundle.id, "", exit_)
    log.info("recovery.adopted", namespace=bundle.namespace, id=bundle.id, pid=state.pid, shim=shim.pid)
    return True


async def _clean_dead(manager: TaskManager, bundle: Bundle, binary: str) -> None:
    """A task whose shim is gone: ``delete`` bootstrap, an exit (137), and the bundle removed."""
    pid = await asyncio.to_thread(_init_pid, bundle)
    await manager.bootstrap_delete(binary, bundle)
    manager.publish_exit(bundle.namespace, bundle.id, "", ExitStatus(pid, KILLED_STATUS, datetime.now(UTC)))
    try:
        await bundle.remove()
    except OSError as exc:
        log.error("recovery.bundle_not_removed", bundle=str(bundle.path), error=str(exc))
    log.info("recovery.cleaned", namespace=bundle.namespace, id=bundle.id, pid=pid)
