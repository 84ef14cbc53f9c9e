"""Restart recovery: ``kill -9`` berthd under 21 running tasks, restart it, get them all back.

The shims outlive berthd; the restarted runtime plugin reconnects to them
from the bundles under its state, reports the same pids, reports the task
that exited while berthd was down with its real exit code and publishes its
``/tasks/exit`` to a subscriber that attached after the restart. Then
everything is deleted and nothing (runc container, mount, cgroup, shim) may
remain. Run over both shims, like the Tasks API tests.
"""

from __future__ import annotations

import signal
from collections.abc import Callable

import pytest

from daemon.mount import mount_points_under
from protos.containerd.services.tasks.v1 import (
    DeleteTaskRequest,
    KillRequest,
    ListTasksRequest,
    WaitRequest,
)
from protos.containerd.v1.types import Status
from tests.integration.conftest import Berthd, Subscribed
from tests.integration.test_tasks_api import RUNTIMES, alive, exit_of, poll, rig
from tests.integration.test_tasks_api import pytestmark as tasks_marks

pytestmark = tasks_marks
SLEEPERS = 20


@pytest.mark.parametrize("runtime_binary", RUNTIMES, ids=["berth-shim", "containerd-shim"])
async def test_kill9_restart_recovers_tasks_and_replays_exit(
    make_berthd: Callable[..., Berthd], runtime_binary: str
) -> None:
    async with rig(make_berthd, runtime_binary) as r:
        pids: dict[str, int] = {}
        for i in range(SLEEPERS):
            cid, pid, _ = await r.run(f"s{i}", "sleep", "1000")
            pids[cid] = pid
        gated, gated_pid, _ = await r.run(
            "gated", "sh", "-c", "while [ ! -e /gate ]; do sleep 0.05; done; exit 7"
        )
        gate = r.plugin_state / r.ns / gated / "rootfs" / "gate"
        assert gate.parent.is_dir()

        r.d.signal(signal.SIGKILL)
        r.d.wait_exit(timeout=30)
        assert all(alive(pid) for pid in [*pids.values(), gated_pid])
        gate.write_text("")  # the gated task exits while berthd is down
        await poll(lambda: not alive(gated_pid), what="the gated task to exit")

        r.d.start()
        await r.d.wait_ready()
        r.channel.close()
        r.channel = r.d.channel()
        events = Subscribed(r.channel, "^/tasks/exit")
        try:
            seen = await events.wait_for(1, r.ns, timeout=30)
            replayed = exit_of(seen[0])
            assert (replayed.container_id, replayed.pid, replayed.exit_status) == (gated, gated_pid, 7)

            listed = {t.container_id: t for t in (await r.tasks.list(ListTasksRequest())).tasks}
            assert {cid: (t.pid, t.status) for cid, t in listed.items() if cid != gated} == {
                cid: (pid, Status.RUNNING) for cid, pid in pids.items()
            }
            assert (listed[gated].status, listed[gated].exit_status) == (Status.STOPPED, 7)
            waited = await r.tasks.wait(WaitRequest(container_id=gated))
            assert waited.exit_status == 7

            for cid in pids:
                await r.tasks.kill(KillRequest(container_id=cid, signal=signal.SIGKILL))
            for cid in [*pids, gated]:
                await r.tasks.wait(WaitRequest(container_id=cid))
                await r.tasks.delete(DeleteTaskRequest(container_id=cid))
            assert (await r.tasks.list(ListTasksRequest())).tasks == []
            # only one exit for the gated task, whoever delivered it (the shim's queue or recovery)
            exits = [exit_of(e).container_id for e in events.got if e.namespace == r.ns]
            assert exits.count(gated) == 1, exits
            assert r.runc_containers() == [] and r.cgroups() == []
            assert mount_points_under(r.d.state) == []
            await poll(lambda: not r.shim_pids(), what="every shim to exit")
            assert not any(alive(pid) for pid in pids.values())
        finally:
            await events.close()
