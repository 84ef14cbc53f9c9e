"""A plugin author's path: pip-install an out-of-tree snapshotter, run the suite with one command."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon.mount import mount_points_under

REPO = Path(__file__).resolve().parents[2]
FIXTURE = REPO / "tests" / "fixtures" / "examplesnap"

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the suite mounts filesystems: needs root")


@pytest.fixture
def examplesnap_site(tmp_path: Path) -> Iterator[Path]:
    """The example package pip-installed into its own site dir (built from a copy: the repo stays clean)."""
    source = tmp_path / "src"
    shutil.copytree(FIXTURE, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    target = tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation"]
    out = subprocess.run(
        [*pip, "--target", str(target), str(source)],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    yield target


def _suite(*args: str, site: Path | None, scratch: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    if site is not None:
        env["PYTHONPATH"] = str(site)
    return subprocess.run(
        [sys.executable, "-m", "daemon.testsuite", "snapshotter", *args, "--dir", str(scratch)],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
        env=env,
        cwd=REPO,
    )


def test_example_snapshotter_passes_the_suite(examplesnap_site: Path, tmp_path: Path) -> None:
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    out = _suite("copy", site=examplesnap_site, scratch=scratch)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "snapshotter conformance suite: berth.snapshotter.v1.copy"
    assert any(line.startswith("PASS layers_128_mount") for line in lines)
    assert any(line.startswith("SKIP overlay_whiteout_and_opaque") for line in lines)  # bind mounts
    assert lines[-1].endswith(" passed, 0 failed, 1 skipped")
    assert mount_points_under(scratch) == [] and os.listdir(scratch) == []


def test_unknown_plugin_and_failures_exit_non_zero(tmp_path: Path) -> None:
    out = _suite("nosuch", site=None, scratch=tmp_path)
    assert out.returncode == 2
    assert "berth.snapshotter.v1.nosuch: not registered" in out.stderr
    out = _suite("native", "-k", "no_such_case", site=None, scratch=tmp_path)
    assert out.returncode == 2 and "unknown case" in out.stderr
    one = _suite("native", "-k", "basic", "-k", "walk", site=None, scratch=tmp_path)
    assert one.returncode == 0, one.stdout + one.stderr
    assert [line.split()[:2] for line in one.stdout.splitlines()[1:3]] == [
        ["PASS", "basic"],
        ["PASS", "walk"],
    ]


def test_a_failing_case_fails_the_command(examplesnap_site: Path, tmp_path: Path) -> None:
    """The example configured (via --config) with a cp that always fails: cases fail, exit status 1."""
    config = tmp_path / "config.toml"
    config.write_text('version = 1\n[plugins."berth.snapshotter.v1.copy"]\ncp = "false"\n')
    out = _suite(
        "copy",
        "--config",
        str(config),
        "-k",
        "basic",
        "-k",
        "stat_active",
        site=examplesnap_site,
        scratch=tmp_path,
    )
    assert out.returncode == 1, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert lines[1].startswith("FAIL basic") and "copying parent" in lines[1]
    assert lines[2].startswith("PASS stat_active")  # no parent, nothing to copy
    assert lines[-1] == "1 passed, 1 failed, 0 skipped"
