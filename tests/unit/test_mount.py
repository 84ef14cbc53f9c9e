"""daemon.mount: real mounts (root), long overlay lowerdirs, rollback, cleanup."""

from __future__ import annotations

import asyncio
import errno
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from daemon.errors import FailedPrecondition, NotFound
from daemon.mount import (
    MS_BIND,
    MS_NODEV,
    MS_NOEXEC,
    MS_NOSUID,
    MS_PRIVATE,
    MS_RDONLY,
    MS_REC,
    PAGE_SIZE,
    compact_lowerdir,
    mount_all,
    mount_points_under,
    mounted,
    mounts_directly,
    split_options,
    unmount,
    unmount_all,
)
from daemon.protocols import Mount

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounting needs root")


@pytest.fixture
async def scratch(tmp_path: Path) -> AsyncIterator[Path]:
    """tmp_path, checked at teardown to have nothing mounted below it (detached if so)."""
    yield tmp_path
    leftover = mount_points_under(tmp_path)
    for point in reversed(leftover):
        await unmount_all(point, detach=True)
    assert leftover == [], f"mounts left behind: {leftover}"


def _dirs(base: Path, *names: str) -> list[Path]:
    out = []
    for n in names:
        (base / n).mkdir(parents=True)
        out.append(base / n)
    return out


# -- option compaction (pure) ---------------------------------------------------


def test_short_options_are_left_alone() -> None:
    opts = ["index=off", "lowerdir=/a/1/fs:/a/2/fs", "upperdir=/a/3/fs"]
    assert compact_lowerdir(opts) == (None, opts)


def test_long_lowerdir_becomes_relative_to_the_common_directory() -> None:
    base = "/var/lib/berth/berth.snapshotter.v1.overlayfs/snapshots"
    lowers = [f"{base}/{i}/fs" for i in range(200, 0, -1)]
    opts = [
        "index=off",
        f"workdir={base}/201/work",
        f"upperdir={base}/201/fs",
        "lowerdir=" + ":".join(lowers),
    ]
    cwd, out = compact_lowerdir(opts)
    assert cwd == base
    assert out[:3] == opts[:3]  # upper and work stay absolute
    assert out[3] == "lowerdir=" + ":".join(f"{i}/fs" for i in range(200, 0, -1))
    assert len(",".join(out)) < PAGE_SIZE


def test_compaction_needs_a_common_directory() -> None:
    opts = ["lowerdir=" + ":".join(f"/x{i}/{'y' * 40}" for i in range(120))]
    assert compact_lowerdir(opts) == (None, opts)
    single = ["lowerdir=/" + "z" * 5000]
    assert compact_lowerdir(single) == (None, single)
    assert compact_lowerdir(["lowerdir=/a/b:/a/c"], limit=5) == ("/a", ["lowerdir=b:c"])


# -- real mounts ------------------------------------------------------------------


async def test_bind_rw_and_ro(scratch: Path) -> None:
    src, rw, ro = _dirs(scratch, "src", "rw", "ro")
    (src / "f").write_text("hello")
    await mount_all([Mount("bind", str(src), options=("rw", "rbind"))], rw)
    await mount_all([Mount("bind", str(src), options=("ro", "rbind"))], ro)
    try:
        assert mount_points_under(scratch) == [str(rw), str(ro)]
        (rw / "g").write_text("through rw")
        assert (src / "g").read_text() == "through rw"
        assert (ro / "f").read_text() == "hello"
        with pytest.raises(OSError) as info:
            (ro / "h").write_text("no")
        assert info.value.errno == errno.EROFS
    finally:
        await unmount(ro)
        await unmount(rw)
    assert mount_points_under(scratch) == []


async def test_overlay_with_200_layers_in_a_long_path(scratch: Path) -> None:
    """Absolute lowerdirs would need ~24 KiB of options; compaction makes them fit one page."""
    deep = scratch / ("d" * 60) / ("e" * 60) / "snapshots"
    layers = _dirs(deep, *(f"{i}/fs" for i in range(1, 201)))
    for i, layer in enumerate(layers, 1):
        (layer / f"file-{i}").write_text(str(i))
        (layer / "top").write_text(str(i))
    upper, work, target = _dirs(deep, "201/fs", "201/work", "merged")
    lowerdir = "lowerdir=" + ":".join(str(p) for p in reversed(layers))
    assert len(lowerdir) > 4 * PAGE_SIZE
    cwd = os.getcwd()
    await mount_all(
        [Mount("overlay", "overlay", options=(f"upperdir={upper}", f"workdir={work}", lowerdir))], target
    )
    try:
        assert os.getcwd() == cwd  # the daemon's own cwd is never touched
        assert (target / "top").read_text() == "200"  # newest layer first
        assert (target / "file-1").read_text() == "1"
        assert len(os.listdir(target)) == 201
        (target / "new").write_text("x")
        assert (upper / "new").read_text() == "x"
    finally:
        await unmount(target)


async def test_failed_mount_names_the_target_and_rolls_back(scratch: Path) -> None:
    src, target = _dirs(scratch, "src", "target")
    good = Mount("bind", str(src), options=("rbind",))
    bad = Mount("overlay", "overlay", options=(f"lowerdir={scratch / 'missing'}",))
    with pytest.raises(FailedPrecondition, match=f"mount overlay overlay on {target}"):
        await mount_all([good, bad], target)
    assert mount_points_under(scratch) == []  # the bind mount made first was undone


async def test_unmount_of_a_plain_directory_is_not_found(scratch: Path) -> None:
    (plain,) = _dirs(scratch, "plain")
    with pytest.raises(NotFound, match="not a mount point"):
        await unmount(plain)
    with pytest.raises(NotFound):
        await unmount(scratch / "does-not-exist")
    await unmount_all(plain)  # quiet when nothing is mounted


async def test_unmount_all_takes_every_stacked_mount(scratch: Path) -> None:
    a, b, target = _dirs(scratch, "a", "b", "target")
    (a / "from-a").touch()
    (b / "from-b").touch()
    await mount_all([Mount("bind", str(a)), Mount("bind", str(b))], target)
    assert os.listdir(target) == ["from-b"]  # later mounts stack on earlier ones
    assert mount_points_under(scratch) == [str(target), str(target)]
    await unmount_all(target)
    assert mount_points_under(scratch) == []


async def test_busy_target_needs_detach(scratch: Path) -> None:
    src, target = _dirs(scratch, "src", "target")
    await mount_all([Mount("bind", str(src))], target)
    fd = os.open(target, os.O_RDONLY)  # an open directory keeps the mount busy
    try:
        await unmount(target, detach=True)
        assert mount_points_under(scratch) == []
    finally:
        os.close(fd)


async def test_mounted_cleans_up_even_when_the_body_fails(scratch: Path) -> None:
    (src,) = _dirs(scratch, "src")
    (src / "f").write_text("x")
    seen: list[Path] = []
    with pytest.raises(RuntimeError, match="boom"):
        async with mounted([Mount("bind", str(src), options=("ro", "rbind"))], dir=scratch) as path:
            seen.append(path)
            assert (path / "f").read_text() == "x"
            assert mount_points_under(scratch) == [str(path)]
            raise RuntimeError("boom")
    assert not seen[0].exists()
    assert (src / "f").read_text() == "x"  # only the mount point went, never the source's files


async def test_mounted_cleans_up_when_cancelled(scratch: Path) -> None:
    (src,) = _dirs(scratch, "src")
    entered = asyncio.Event()
    paths: list[Path] = []

    async def hold() -> None:
        async with mounted([Mount("bind", str(src))], dir=scratch) as path:
            paths.append(path)
            entered.set()
            await asyncio.Event().wait()

    task = asyncio.create_task(hold())
    await asyncio.wait_for(entered.wait(), 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert mount_points_under(scratch) == []
    assert not paths[0].exists()


async def test_mount_points_with_spaces_are_unescaped(scratch: Path) -> None:
    src, target = _dirs(scratch, "src", "a dir\twith blanks")
    await mount_all([Mount("bind", str(src))], target)
    try:
        assert mount_points_under(scratch) == [str(target)]
    finally:
        await unmount(target)


# -- mount(2) in-process, mount(8) for the rest -----------------------------------


def test_kernel_kinds_mount_directly_the_rest_through_mount8() -> None:
    assert mounts_directly(Mount("bind", "/a", options=("rbind", "ro")))
    assert mounts_directly(Mount("tmpfs", "shm", options=("nosuid", "size=65536k")))
    assert mounts_directly(
        Mount("overlay", "overlay", options=("lowerdir=/a:/b", "upperdir=/c", "workdir=/d"))
    )
    assert not mounts_directly(Mount("ext4", "/dev/vdb"))
    assert not mounts_directly(Mount("bind", "/a", options=("rbind", "x-berth.note=1")))
    assert not mounts_directly(Mount("tmpfs", "t", options=("nofail",)))
    long_lower = "lowerdir=" + ":".join(f"/var/lib/berth/snapshots/{i}/fs" for i in range(200))
    assert not mounts_directly(Mount("overlay", "overlay", options=(long_lower,)))  # compaction needs a cwd


def test_options_split_into_flags_and_data() -> None:
    flags, data = split_options(["rbind", "ro", "nosuid", "nodev", "index=off", "", "rprivate"])
    assert flags & MS_BIND and flags & MS_REC and flags & MS_RDONLY and flags & MS_NOSUID and flags & MS_NODEV
    assert flags & MS_PRIVATE
    assert data == "index=off"
    assert split_options(["ro", "rw", "exec", "noexec"]) == (MS_NOEXEC, "")  # later words win


def _mountinfo(target: Path) -> tuple[set[str], set[str], str]:
    """(per-mount options, super options, optional fields) of the top mount on ``target``."""
    found = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == str(target):
                found = fields
    assert found is not None, f"{target} is not mounted"
    sep = found.index("-")
    return set(found[5].split(",")), set(found[sep + 3].split(",")), " ".join(found[6:sep])


async def test_direct_mounts_apply_flags_data_and_propagation(scratch: Path) -> None:
    src, ro, tmp = _dirs(scratch, "src", "ro", "tmp")
    (src / "f").write_text("x")
    await mount_all([Mount("bind", str(src), options=("rbind", "ro", "nosuid", "rprivate"))], ro)
    await mount_all(
        [Mount("tmpfs", "shm", options=("nosuid", "nodev", "noexec", "mode=0700", "size=1m"))], tmp
    )
    try:
        options, _, optional = _mountinfo(ro)
        assert {"ro", "nosuid"} <= options  # the read-only remount of the bind took
        assert "shared:" not in optional  # rprivate
        assert (ro / "f").read_text() == "x"
        options, super_options, _ = _mountinfo(tmp)
        assert {"rw", "nosuid", "nodev", "noexec"} <= options
        assert {"size=1024k", "mode=700"} <= super_options  # data reached the kernel
    finally:
        await unmount(tmp)
        await unmount(ro)


async def test_direct_mount_failure_names_the_error(scratch: Path) -> None:
    (target,) = _dirs(scratch, "target")
    with pytest.raises(
        FailedPrecondition, match=f"mount bind {scratch / 'missing'} on {target}: No such file"
    ):
        await mount_all([Mount("bind", str(scratch / "missing"), options=("rbind",))], target)
    with pytest.raises(FailedPrecondition, match=r"mount tmpfs t on .*: Invalid argument"):
        await mount_all([Mount("tmpfs", "t", options=("size=lots",))], target)
    assert mount_points_under(scratch) == []
