"""Generated specs run under the real runc: a busybox rootfs, a user from its /etc/passwd, cgroups, seccomp.

Each test gets its own runc state root and its own parent cgroup; the
``bundle`` fixture removes the container (``runc delete -f``) and every cgroup
directory it made, in every hierarchy, even when the test failed, and checks
runc removed the container's own cgroup.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from daemon.oci import spec

RUNC = shutil.which("runc")
BUSYBOX = Path("/bin/busybox")
CGROUP_ROOT = Path("/sys/fs/cgroup")
APPLETS = ("sh", "echo", "id", "cat", "unshare")
RUN_TIMEOUT = 30

pytestmark = pytest.mark.skipif(
    RUNC is None or not BUSYBOX.exists() or os.geteuid() != 0, reason="needs root, runc and /bin/busybox"
)


@dataclass
class Bundle:
    dir: Path
    rootfs: Path
    state: Path
    container_id: str
    cgroup_parent: str

    @property
    def cgroups_path(self) -> str:
        return f"/{self.cgroup_parent}/{self.container_id}"

    def runc(self, *args: str) -> subprocess.CompletedProcess[str]:
        assert RUNC is not None
        return subprocess.run(
            [RUNC, "--root", str(self.state), *args], capture_output=True, text=True, timeout=RUN_TIMEOUT
        )

    def run(self, *opts: spec.SpecOpt) -> subprocess.CompletedProcess[str]:
        config = spec.generate(
            self.container_id, spec.with_cgroups_path(self.cgroups_path), *opts, namespace="berth-test"
        )
        (self.dir / "config.json").write_text(json.dumps(config))
        return self.runc("run", "--bundle", str(self.dir), self.container_id)


def _cgroup_dirs(name: str) -> list[Path]:
    return [d for d in CGROUP_ROOT.glob(f"*/{name}") if d.is_dir()]


@pytest.fixture
def bundle(tmp_path: Path) -> Iterator[Bundle]:
    rootfs = tmp_path / "bundle" / "rootfs"
    (rootfs / "bin").mkdir(parents=True)
    (rootfs / "etc").mkdir()
    shutil.copy2(BUSYBOX, rootfs / "bin" / "busybox")
    for applet in APPLETS:
        (rootfs / "bin" / applet).symlink_to("busybox")
    (rootfs / "etc" / "passwd").write_text(
        "root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000::/home/user:/bin/sh\n"
    )
    (rootfs / "etc" / "group").write_text("root:x:0:\nuser:x:1000:\nextra:x:2000:user\n")
    state = tmp_path / "runc-state"
    state.mkdir()
    tag = uuid.uuid4().hex[:12]
    b = Bundle(tmp_path / "bundle", rootfs, state, f"berth-ocispec-{tag}", f"berth-test-{tag}")
    try:
        yield b
    finally:
        b.runc("delete", "-f", b.container_id)  # gone already after `run`; this is for failures
        leftovers = _cgroup_dirs(f"{b.cgroup_parent}/{b.container_id}")
        for parent in _cgroup_dirs(b.cgroup_parent):
            for leaf in [p for p in parent.iterdir() if p.is_dir()]:
                leaf.rmdir()
            parent.rmdir()
        assert not _cgroup_dirs(b.cgroup_parent)
    assert not leftovers, f"runc left cgroups behind: {leftovers}"


def test_runs_as_image_user_with_memory_limit(bundle: Bundle) -> None:
    rootfs = str(bundle.rootfs)
    result = bundle.run(
        spec.with_process_args(
            ["/bin/sh", "-c", "echo hello; id -u; id -G; cat /sys/fs/cgroup/memory/memory.limit_in_bytes"]
        ),
        spec.with_user("1000", rootfs),
        spec.with_additional_gids("1000", rootfs),
        spec.with_memory_limit(64 << 20),
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:4] == ["hello", "1000", "1000 2000", str(64 << 20)]
    assert (CGROUP_ROOT / "memory" / bundle.cgroup_parent).is_dir()
    assert not _cgroup_dirs(f"{bundle.cgroup_parent}/{bundle.container_id}")
    assert bundle.container_id not in bundle.runc("list", "-q").stdout


def test_default_seccomp_blocks_what_capabilities_would_allow(bundle: Bundle) -> None:
    script = ["/bin/sh", "-c", "unshare -m true && echo unshared"]
    admin = spec.with_capabilities(add=["CAP_SYS_ADMIN"])
    # profile built for the default capabilities: unshare is not in it, whatever the caps say
    blocked = bundle.run(spec.with_process_args(script), spec.with_default_seccomp(), admin)
    assert blocked.returncode != 0
    assert "Operation not permitted" in blocked.stderr
    assert "unshared" not in blocked.stdout
    # the capability-conditional rule: with CAP_SYS_ADMIN in the bounding set, unshare is allowed
    allowed = bundle.run(spec.with_process_args(script), admin, spec.with_default_seccomp())
    assert allowed.returncode == 0, allowed.stderr
    assert allowed.stdout.strip() == "unshared"
