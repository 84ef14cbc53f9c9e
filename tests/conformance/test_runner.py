"""``python -m daemon.testsuite``: both suites by one command, against the built-in plugins."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon.mount import mount_points_under
from daemon.testsuite import content, snapshotter

REPO = Path(__file__).resolve().parents[2]
NOBODY = 65534

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounts, or switches to another user: needs root")


def _suite(
    *args: str, scratch: Path, as_nobody: bool = False, cwd: Path = REPO
) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "daemon.testsuite", *args, "--dir", str(scratch)]
    if as_nobody:  # setpriv, not subprocess's user=: only it can exec the venv's python here
        command = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *command]
    return subprocess.run(command, capture_output=True, text=True, check=False, timeout=120, cwd=cwd)


@pytest.fixture
def scratch(tmp_path: Path) -> Iterator[Path]:
    """Where the runner makes its scratch directories; nothing may stay mounted or left behind."""
    path = tmp_path / "scratch"
    path.mkdir()
    yield path
    assert mount_points_under(tmp_path) == []


def test_content_suite_runs_the_chosen_cases(scratch: Path) -> None:
    out = _suite("content", "berth.content.v1.local", "-k", "writer", "-k", "restart", scratch=scratch)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "content conformance suite: berth.content.v1.local"
    assert [line.split()[:2] for line in lines[1:-1]] == [["PASS", "writer"], ["PASS", "restart"]]
    assert lines[-1] == "2 passed, 0 failed, 0 skipped"
    assert os.listdir(scratch) == []  # scratch directories removed without --keep


@needs_root
def test_snapshotter_suite_runs_the_chosen_cases(scratch: Path) -> None:
    out = _suite(
        "snapshotter",
        "overlayfs",
        "-k",
        "view_readonly",
        "-k",
        "overlay_whiteout_and_opaque",
        scratch=scratch,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "snapshotter conformance suite: berth.snapshotter.v1.overlayfs"
    assert [line.split()[:2] for line in lines[1:-1]] == [
        ["PASS", "view_readonly"],
        ["PASS", "overlay_whiteout_and_opaque"],
    ]
    assert lines[-1] == "2 passed, 0 failed, 0 skipped"
    assert os.listdir(scratch) == []


def test_keep_leaves_the_scratch_directories(scratch: Path) -> None:
    out = _suite("content", "local", "-k", "small_blob", "--keep", scratch=scratch)
    assert out.returncode == 0, out.stdout + out.stderr
    (kept,) = scratch.iterdir()
    assert out.stdout.splitlines()[-1] == f"scratch directories kept in {kept}"
    assert (kept / "cases" / "small_blob" / "root").is_dir()


@pytest.mark.parametrize(
    ("suite", "plugin"),
    [("content", "berth.content.v1.nosuch"), ("snapshotter", "berth.snapshotter.v1.nosuch")],
)
def test_unknown_plugin_or_case_is_a_usage_error(suite: str, plugin: str, scratch: Path) -> None:
    out = _suite(suite, plugin.rsplit(".", 1)[-1], scratch=scratch)
    assert out.returncode == 2
    assert f"{plugin}: not registered" in out.stderr
    assert out.stdout == ""
    out = _suite(suite, plugin, "-k", "no_such_case", scratch=scratch)
    assert out.returncode == 2 and "unknown case(s): no_such_case" in out.stderr


@pytest.mark.parametrize("suite", ["content", "snapshotter"])
def test_list_prints_every_case_with_its_summary(suite: str, scratch: Path) -> None:
    if suite == "content":
        expected = [[c.name, c.doc] for c in content.CASES.values()]
    else:
        expected = [[c.name, c.doc] for c in snapshotter.CASES.values()]
    out = _suite(suite, "anything", "--list", scratch=scratch)
    assert out.returncode == 0, out.stderr
    assert [line.split(None, 1) for line in out.stdout.splitlines()] == expected
    assert len(expected) > 20  # a real list, not an empty one


@needs_root
@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv (util-linux)")
def test_only_the_snapshotter_suite_demands_root() -> None:
    """As an unprivileged user the content suite runs; the snapshotter suite refuses before starting."""
    shared = Path(tempfile.mkdtemp(prefix="berth-runner-"))  # tmp_path is private to root
    try:
        shared.chmod(0o777)
        out = _suite("content", "local", "-k", "small_blob", scratch=shared, as_nobody=True, cwd=shared)
        assert out.returncode == 0, out.stdout + out.stderr
        assert out.stdout.splitlines()[1].startswith("PASS small_blob")
        out = _suite("snapshotter", "native", "-k", "basic", scratch=shared, as_nobody=True, cwd=shared)
        assert out.returncode == 2
        assert "the suite mounts filesystems: run it as root" in out.stderr
        assert os.listdir(shared) == []
    finally:
        shutil.rmtree(shared)
