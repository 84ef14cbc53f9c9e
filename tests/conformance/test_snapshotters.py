"""Every case of daemon.testsuite.snapshotter against both built-in snapshotters, real mounts.

Each snapshotter is built through the plugin registry from its entry point,
exactly as berthd builds it. The second half checks that the suite itself
can fail: snapshotters broken on purpose must not pass.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path

import pytest

from daemon.errors import FailedPrecondition, InvalidArgument
from daemon.mount import mount_all, mount_points_under
from daemon.protocols import Mount
from daemon.testsuite import snapshotter as suite
from daemon.testsuite.loader import PluginSkipped, plugin_factory
from plugins.snapshotters.native.snapshotter import NativeSnapshotter

PLUGINS = ("berth.snapshotter.v1.overlayfs", "berth.snapshotter.v1.native")

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the suite mounts filesystems: needs root")


#: Cases that do not apply to a plugin, and why (never a missing feature).
NOT_APPLICABLE = {
    # native mounts are bind mounts: its layers carry whiteouts as deletions,
    # which tests/unit/test_diff_apply.py checks in the bind form.
    ("berth.snapshotter.v1.native", "overlay_whiteout_and_opaque"),
}


@pytest.mark.parametrize(
    ("plugin", "case"),
    [
        pytest.param(p, c, id=f"{c}-{p.rsplit('.', 1)[-1]}")
        for c in suite.CASES
        for p in PLUGINS
        if (p, c) not in NOT_APPLICABLE
    ],
)
async def test_conformance(plugin: str, case: str, base: Path) -> None:
    try:
        await suite.run_case(case, plugin_factory(plugin), base)
    except suite.CaseSkipped as exc:
        pytest.skip(str(exc))
    except PluginSkipped as exc:
        pytest.skip(str(exc))


# -- the suite can fail -----------------------------------------------------------


class HardLinkingNative(NativeSnapshotter):
    """Copies parents with hard links: fast, and not copy-on-write."""

    async def _copy(self, source: Path, staged: Path, key: str, parent: str) -> None:
        await asyncio.to_thread(staged.mkdir)
        proc = await asyncio.create_subprocess_exec("cp", "-al", str(source), str(staged / "fs"))
        assert await proc.wait() == 0


class WritableViews(NativeSnapshotter):
    async def view(self, key: str, parent: str = "", labels: Mapping[str, str] | None = None) -> list[Mount]:
        mounts = await super().view(key, parent, labels)
        return [dataclasses.replace(m, options=("rw", "rbind")) for m in mounts]


class WrongErrors(NativeSnapshotter):
    async def remove(self, key: str) -> None:
        try:
            await super().remove(key)
        except FailedPrecondition as exc:
            raise InvalidArgument(str(exc)) from exc


@pytest.mark.parametrize(
    ("cls", "case", "complaint"),
    [
        (HardLinkingNative, "copy_on_write_isolation", "directory differs"),
        (WritableViews, "view_readonly", "views must be read-only"),
        (WrongErrors, "remove_intermediate_snapshot", "expected FailedPrecondition, got InvalidArgument"),
    ],
)
async def test_suite_catches_a_broken_snapshotter(
    cls: type[NativeSnapshotter], case: str, complaint: str, base: Path
) -> None:
    async def make(root: Path) -> NativeSnapshotter:  # the plain-coroutine form of a factory
        sn = await cls.open(root)
        assert isinstance(sn, cls)
        return sn

    with pytest.raises(suite.SuiteFailure, match=complaint):
        await suite.run_case(case, make, base)
    await suite.run_case("stat_committed", make, base / "ok")  # and they are not broken everywhere


async def test_a_case_that_leaves_a_mount_fails_and_is_cleaned_up(
    base: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def leaky(env: suite.Env) -> None:
        mounts = await env.sn.prepare("leak", "")
        target = env.work / "left-mounted"
        target.mkdir()
        await mount_all(mounts, target)

    monkeypatch.setitem(suite.CASES, "leaky", suite.Case("leaky", leaky, "leaves a mount"))

    async def make(root: Path) -> NativeSnapshotter:
        return await NativeSnapshotter.open(root)

    with pytest.raises(suite.SuiteFailure, match="left mounts behind"):
        await suite.run_case("leaky", make, base)
    assert mount_points_under(base) == []


async def test_run_suite_reports_each_case(base: Path) -> None:
    results: list[suite.Result] = []

    async def make(root: Path) -> NativeSnapshotter:
        return await HardLinkingNative.open(root)

    out = await suite.run_suite(
        make,
        base,
        names=["stat_active", "copy_on_write_isolation", "overlay_whiteout_and_opaque"],
        report=results.append,
    )
    assert out == results
    assert [(r.name, r.status) for r in out] == [
        ("stat_active", "pass"),
        ("copy_on_write_isolation", "fail"),
        ("overlay_whiteout_and_opaque", "skip"),
    ]
    assert "SuiteFailure" in out[1].message and "not overlay" in out[2].message
