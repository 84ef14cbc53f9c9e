"""The ``berth`` CLI's lean start-up: the command table, what a command imports.

The users files ``berth run`` reads without mounting are tested with their
reader, in test_oci_userfiles.py.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from daemon.cli import berth
from daemon.cli.commands import CliError, parse_pairs
from daemon.cli.commands.run import stdin_is_devnull
from daemon.cli.imagetree import Platform, host_platform, image_defaults

ROOT = Path(__file__).resolve().parents[2]


def _subparsers(p: argparse.ArgumentParser) -> argparse._SubParsersAction[argparse.ArgumentParser]:
    actions = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
    assert len(actions) == 1
    return actions[0]


# -- the command table -------------------------------------------------------------------


def test_table_names_and_help_match_what_each_module_registers() -> None:
    full = _subparsers(berth.build_parser(berth.GROUPS))
    stub = _subparsers(berth.build_parser([]))
    assert set(stub.choices) == set(full.choices) == set(berth.GROUP_OF)
    helps = {a.dest: a.help for a in full._choices_actions}
    table = {c.name: c.help for g in berth.GROUPS for c in g.commands}
    assert helps == table
    assert {a.dest: a.help for a in stub._choices_actions} == table
    # every name the table routes to a module has its handler once that module registered
    assert set(berth.COMMANDS) >= set(berth.GROUP_OF)


def test_default_address_is_berthds() -> None:
    from daemon.config import DEFAULT_GRPC_ADDRESS

    assert berth.DEFAULT_ADDRESS == DEFAULT_GRPC_ADDRESS


@pytest.mark.parametrize(
    ("argv", "word"),
    [
        (["run", "--rm", "img", "id", "true"], "run"),
        (["--address", "/s", "-n", "ns", "run", "-h"], "run"),
        (["-a/s", "--namespace=x", "--format", "json", "images", "ls"], "images"),
        (["--addr", "/s", "c", "ls"], "c"),  # an abbreviated option, as the real parser takes it
        (["--timeout", "3", "--", "tasks"], "tasks"),
        (["-h"], None),
        ([], None),
        (["--address"], None),  # left for the real parser to report
    ],
)
def test_command_word_skips_global_options(argv: list[str], word: str | None) -> None:
    assert berth.command_word(argv) == word


def _startup(argv: list[str]) -> dict[str, Any]:
    """Run berth's start-up for ``argv`` in a fresh interpreter; its exit status and loaded modules."""
    code = (
        "import json, sys\n"
        "from daemon.cli import berth\n"
        f"rc = berth._run({argv!r}, trim=True)\n"
        "loaded = sorted(k for k, v in sys.modules.items() if v is not None)\n"
        "print(json.dumps({'rc': rc, 'modules': loaded}))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60, check=True
    )
    result: dict[str, Any] = json.loads(proc.stdout.splitlines()[-1])
    return result


def test_run_imports_only_what_it_needs(tmp_path: Path) -> None:
    got = _startup(["--address", str(tmp_path / "absent.sock"), "run", "--rm", "img", "id", "true"])
    assert got["rc"] == 3  # the daemon cannot be reached: after every import the command needs
    loaded = set(got["modules"])
    assert {"daemon.cli.commands.run", "grpclib.client", "daemon.oci.spec"} <= loaded
    unwanted = {
        "structlog",  # nothing on run's path logs
        "daemon.mount",  # the users files are read from the layers
        "daemon.config",
        "importlib.metadata",  # betterproto's version, from its dist-info name
        "dateutil.parser",
        "aiohttp",
        "protos.runtime.v1",  # CRI
        "protos.berth.services.images.v1",  # services run does not call
        "protos.containerd.services.namespaces.v1",
        "daemon.cli.commands.images",
        "ssl",  # unix sockets only
    }
    assert loaded & unwanted == set()


def test_cri_keeps_ssl_and_quiets_structlog(tmp_path: Path) -> None:
    got = _startup(["--address", str(tmp_path / "absent.sock"), "cri", "version"])
    assert got["rc"] == 3
    assert {"ssl", "structlog", "protos.runtime.v1"} <= set(got["modules"])


def test_program_exit_statuses(tmp_path: Path) -> None:
    exe = Path(sys.executable).parent / "berth"
    absent = str(tmp_path / "absent.sock")

    def status(*argv: str) -> tuple[int, str, str]:
        proc = subprocess.run([str(exe), *argv], capture_output=True, text=True, timeout=60, check=False)
        return proc.returncode, proc.stdout, proc.stderr

    rc, out, err = status("--address", absent, "version")
    assert (rc, out) == (3, "") and "cannot connect to berthd" in err
    rc, out, err = status("bogus")
    assert rc == 2 and "invalid choice: 'bogus'" in err
    rc, out, err = status("--help")
    assert rc == 0 and "run a container from an image" in out
    rc, out, err = status("run", "--help")
    assert rc == 0 and "--snapshotter" in out


def test_exit_status_of_system_exit(capsys: pytest.CaptureFixture[str]) -> None:
    assert berth._exit_status(SystemExit()) == 0
    assert berth._exit_status(SystemExit(7)) == 7
    # a message: printed on stderr, status 1, as the interpreter does
    assert berth._exit_status(SystemExit("berth: label 'x': expected KEY=VALUE")) == 1
    assert capsys.readouterr().err == "berth: label 'x': expected KEY=VALUE\n"


def test_parse_pairs_later_keys_win_and_a_bare_word_names_its_flag() -> None:
    # one parser for `run --label` and `namespaces create/label`
    assert parse_pairs(["a=1", "b=", "a=x=y"], "label") == {"a": "x=y", "b": ""}
    for bad in ("x", "=v"):
        with pytest.raises(CliError, match=f"label '{bad}': expected KEY=VALUE"):
            parse_pairs([bad], "label")


# -- run's helpers -----------------------------------------------------------------------


def test_stdin_is_devnull() -> None:
    null = os.open(os.devnull, os.O_RDONLY)
    r, w = os.pipe()
    try:
        assert stdin_is_devnull(null)
        assert not stdin_is_devnull(r)
        os.close(w)
        assert not stdin_is_devnull(w)  # closed: not known to be /dev/null
    finally:
        os.close(null)
        os.close(r)


class _Exports:
    def __init__(self, exports: dict[str, str]) -> None:
        self.exports = exports
        self.calls = 0

    async def plugin_exports(self, type_: str) -> dict[str, str]:
        assert type_ == "berth.images.v1"
        self.calls += 1
        return self.exports


async def test_image_defaults_asks_the_daemon_once_at_most() -> None:
    c = _Exports({"platform": "linux/arm64", "snapshotter": "native"})
    assert await image_defaults(c, "", "") == (Platform("linux", "arm64", "v8"), "native")  # type: ignore[arg-type]
    assert c.calls == 1
    assert await image_defaults(c, "linux/amd64", "x") == (Platform("linux", "amd64"), "x")  # type: ignore[arg-type]
    assert c.calls == 1
    empty = _Exports({})
    assert await image_defaults(empty) == (host_platform(), "overlayfs")  # type: ignore[arg-type]
