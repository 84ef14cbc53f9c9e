"""config.toml as operators meet it, and plugins as their authors ship them."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import BIN, Berthd

REPO = Path(__file__).resolve().parents[2]


def berthd_cmd(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "berthd"), *args], capture_output=True, text=True, timeout=60, env=env, check=False
    )


def test_example_config_is_exactly_the_default() -> None:
    out = berthd_cmd("config", "default")
    assert out.returncode == 0, out.stderr
    assert (REPO / "config.toml.example").read_text() == out.stdout
    data = tomllib.loads(out.stdout)
    assert data["version"] == 1 and data["root"] == "/var/lib/berth"
    assert data["plugins"]["berth.metadata.v1.sqlite"] == {"synchronous": "full", "gc_delay": 1.0}
    # every key carries a comment: no key line is preceded directly by another key line without one
    lines = out.stdout.splitlines()
    for i, line in enumerate(lines):
        if "=" in line and not line.lstrip().startswith(("#", "[")):
            assert lines[i - 1].lstrip().startswith("#"), f"key without comment: {line!r}"


def test_config_check_ok_and_problems(short_tmp: Path) -> None:
    good = short_tmp / "good.toml"
    good.write_text(berthd_cmd("config", "default").stdout)
    ok = berthd_cmd("config", "check", str(good))
    assert ok.returncode == 0 and "ok" in ok.stdout
    bad = short_tmp / "config.toml"
    bad.write_text(
        'version = 1\nroot = "relative/root"\n[grpc]\nadress = "/run/x.sock"\n[debug]\nlevel = "loud"\n'
    )
    out = berthd_cmd("config", "check", str(bad))
    assert out.returncode == 2
    assert f"grpc.adress: unknown key, did you mean address? ({bad}:4)" in out.stderr
    assert "debug.level" in out.stderr and "loud" in out.stderr and "info" in out.stderr
    assert "root" in out.stderr and "absolute" in out.stderr


async def test_daemon_refuses_invalid_config_with_the_same_message(
    make_berthd: Callable[..., Berthd],
) -> None:
    d = make_berthd(config='version = 1\n[plugins."berth.metadata.v1.sqlite"]\n[grpc]\nadress = "x"\n')
    d.start()
    assert d.wait_exit(timeout=30) == 2
    assert f"grpc.adress: unknown key, did you mean address? ({d.config_path}:4)" in d.log()
    assert not Path(d.address).exists()


async def test_malformed_toml_names_file_and_line(make_berthd: Callable[..., Berthd]) -> None:
    d = make_berthd(config="version = 1\n[grpc\naddress = 1\n")
    d.start()
    assert d.wait_exit(timeout=30) == 2
    assert str(d.config_path) in d.log() and "line 2" in d.log()


async def test_imports_merge_drop_ins(make_berthd: Callable[..., Berthd]) -> None:
    d = make_berthd(config='version = 1\nimports = ["conf.d/*.toml"]\n')
    (d.base / "conf.d").mkdir()
    (d.base / "conf.d" / "10-debug.toml").write_text('[debug]\nlevel = "debug"\nformat = "json"\n')
    d.start()
    await d.wait_ready()
    async with d.client() as c:
        await c.version()
    d.stop()
    assert '"event": "grpc.call"' in d.log()


@pytest.fixture
def plugin_site(short_tmp: Path) -> Iterator[Path]:
    """The example third-party plugin, pip-installed into its own site dir."""
    target = short_tmp / "site"
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(target),
            str(REPO / "tests" / "fixtures" / "thirdparty"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    yield target


async def test_third_party_plugin_is_loaded_and_configured(
    make_berthd: Callable[..., Berthd], plugin_site: Path
) -> None:
    env = {"PYTHONPATH": str(plugin_site)}
    default = berthd_cmd("config", "default", env=env)
    assert '[plugins."berth.example.v1.hello"]' in default.stdout
    d = make_berthd(config='version = 1\n[plugins."berth.example.v1.hello"]\ngreeting = "ahoy"\n', env=env)
    d.start()
    await d.wait_ready()
    rows = json.loads(d.berth("--format", "json", "plugins", "ls", check=True).stdout)
    example = next(r for r in rows if r["type"] == "berth.example.v1")
    assert example["status"] == "ok"
    assert example["exports"]["greeting"] == "ahoy"
    assert example["requires"] == ["berth.metadata.v1"]
    assert example["exports"]["root"] == str(d.root / "berth.example.v1.hello")
    # A typo in the third-party table is caught like any built-in's.
    bad = d.base / "bad.toml"
    bad.write_text('version = 1\n[plugins."berth.example.v1.hello"]\ngreting = "x"\n')
    out = berthd_cmd("config", "check", str(bad), env=env)
    assert out.returncode == 2
    assert (
        f'plugins."berth.example.v1.hello".greting: unknown key, did you mean greeting? ({bad}:3)'
        in out.stderr
    )


async def test_failing_plugin_only_fatal_when_required(
    make_berthd: Callable[..., Berthd], plugin_site: Path
) -> None:
    env = {"PYTHONPATH": str(plugin_site)}
    table = '[plugins."berth.example.v1.hello"]\nfail = true\n'
    tolerant = make_berthd(config="version = 1\n" + table, env=env, name="tolerant")
    tolerant.start()
    await tolerant.wait_ready()
    table_out = tolerant.berth("plugins", "ls", check=True).stdout
    row = next(line for line in table_out.splitlines() if line.startswith("berth.example.v1"))
    assert row.split()[:3] == ["berth.example.v1", "hello", "error"]
    assert "configured to fail" in row
    strict = make_berthd(
        config='version = 1\nrequired_plugins = ["berth.example.v1.hello"]\n' + table, env=env, name="strict"
    )
    strict.start()
    assert strict.wait_exit(timeout=30) == 1
    assert "required plugin not loaded: berth.example.v1.hello" in strict.log()
    assert not Path(strict.address).exists()


async def test_disabled_plugin_is_skipped_and_dependents_explain(make_berthd: Callable[..., Berthd]) -> None:
    d = make_berthd(config='version = 1\ndisabled_plugins = ["berth.grpc.v1.leases"]\n')
    d.start()
    await d.wait_ready()
    rows = json.loads(d.berth("--format", "json", "plugins", "ls", check=True).stdout)
    leases = next(r for r in rows if r["id"] == "leases")
    assert leases["status"] == "skip" and "disabled" in leases["error"]


async def test_broken_plugin_package_is_listed_not_fatal(
    make_berthd: Callable[..., Berthd], short_tmp: Path
) -> None:
    site = short_tmp / "broken-site"
    dist = site / "berth_broken_plugin-0.0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: berth-broken-plugin\nVersion: 0.0.1\n")
    (dist / "entry_points.txt").write_text("[berth.plugins]\nbroken = berth_broken_plugin\n")
    (site / "berth_broken_plugin.py").write_text('raise RuntimeError("half-installed package")\n')
    d = make_berthd(env={"PYTHONPATH": str(site)})
    d.start()
    await d.wait_ready()
    rows = json.loads(d.berth("--format", "json", "plugins", "ls", check=True).stdout)
    broken = next(r for r in rows if r["id"] == "berth_broken_plugin")
    assert broken["type"] == "berth.plugins" and broken["status"] == "error"
    assert "half-installed package" in broken["error"]
    assert any(r["id"] == "sqlite" and r["status"] == "ok" for r in rows)
