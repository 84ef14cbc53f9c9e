"""containerd's own client against berthd's runtime: ``ctr run --rm IMAGE ID echo hi`` prints "hi".

``ctr`` does everything client-side as it does against containerd: the
container record, the snapshot, the stdio FIFOs, Tasks.Create/Start/Wait/
Delete, and the container removal (``--rm``). Run over both shims.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from daemon.mount import mount_points_under
from tests.integration.conftest import Berthd, ctr, ok
from tests.integration.test_tasks_api import IMAGE, RUNTIMES, poll, rig
from tests.integration.test_tasks_api import pytestmark as tasks_marks

pytestmark = tasks_marks


@pytest.mark.parametrize("runtime_binary", RUNTIMES, ids=["berth-shim", "containerd-shim"])
async def test_ctr_run_rm_prints_and_leaves_nothing(
    make_berthd: Callable[..., Berthd], runtime_binary: str
) -> None:
    async with rig(make_berthd, runtime_binary) as r:
        cid = r.cid("ctr")
        done = ctr(r.d, "run", "--rm", IMAGE, cid, "echo", "hi", ns=r.ns)
        assert done.returncode == 0, done.stderr
        assert done.stdout == "hi\n"
        failed = ctr(r.d, "run", "--rm", IMAGE, r.cid("ctrfail"), "sh", "-c", "exit 4", ns=r.ns)
        assert failed.returncode == 4, failed.stderr
        assert ok(ctr(r.d, "containers", "ls", "-q", ns=r.ns)).split() == []
        assert ok(ctr(r.d, "tasks", "ls", "-q", ns=r.ns)).split() == []
        assert r.runc_containers() == [] and r.cgroups() == []
        assert mount_points_under(r.d.state) == []
        await poll(lambda: not r.shim_pids(), what="the shims to exit")
