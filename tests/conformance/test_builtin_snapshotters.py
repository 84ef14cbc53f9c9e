"""What the built-in snapshotters promise beyond the common suite: mount shapes, config, init checks."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from daemon.config import load_config
from daemon.errors import NotFound
from daemon.mount import mount_all, mount_points_under, mounted, unmount_all
from daemon.protocols import Mount, Snapshotter
from daemon.registry import Registry
from daemon.testsuite.loader import PluginSkipped, plugin_instance
from plugins.snapshotters.native.config import NativeConfig
from plugins.snapshotters.native.snapshotter import NativeSnapshotter
from plugins.snapshotters.overlayfs.config import OverlayConfig
from plugins.snapshotters.overlayfs.snapshotter import UPPERDIR_LABEL, OverlaySnapshotter

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounting needs root")


async def _overlay(root: Path, **config: object) -> OverlaySnapshotter:
    return await OverlaySnapshotter.open(root, OverlayConfig(**config))  # type: ignore[arg-type]


def _fs(root: Path, sid: int) -> str:
    return str(root / "snapshots" / str(sid) / "fs")


# -- overlayfs -------------------------------------------------------------------


async def test_overlay_mount_shapes(base: Path) -> None:
    root = base / "root"
    sn = await _overlay(root)
    try:
        assert await sn.prepare("a1", "") == [Mount("bind", _fs(root, 1), options=("rw", "rbind"))]
        await sn.commit("c1", "a1")
        assert await sn.view("v1", "c1") == [Mount("bind", _fs(root, 1), options=("ro", "rbind"))]
        await sn.prepare("a2", "c1")
        await sn.commit("c2", "a2")
        (active,) = await sn.prepare("a3", "c2")
        assert active.type == "overlay"
        assert active.options == (
            "index=off",
            f"workdir={root}/snapshots/4/work",
            f"upperdir={_fs(root, 4)}",
            f"lowerdir={_fs(root, 3)}:{_fs(root, 1)}",  # direct parent first
        )
        (view,) = await sn.view("v2", "c2")
        assert view.type == "overlay" and view.options == (
            "index=off",
            f"lowerdir={_fs(root, 3)}:{_fs(root, 1)}",
        )
        assert await sn.view("v0", "") == [Mount("bind", _fs(root, 6), options=("ro", "rbind"))]
    finally:
        await sn.close()


async def test_overlay_config_options_and_upperdir_label(base: Path) -> None:
    root = base / "root"
    sn = await _overlay(root, mount_options=["redirect_dir=off"], upperdir_label=True)
    try:
        await sn.prepare("a", "", {"x": "1"})
        await sn.commit("c", "a", {"x": "1"})
        (m,) = await sn.prepare("b", "c")
        assert m.options[:2] == ("index=off", "redirect_dir=off")
        async with mounted([m]) as target:  # the option reaches the kernel and is accepted
            (target / "f").touch()
        assert (await sn.stat("c")).labels == {"x": "1", UPPERDIR_LABEL: _fs(root, 1)}
        walked = {i.name: i.labels.get(UPPERDIR_LABEL) async for i in sn.walk()}
        assert walked == {"c": _fs(root, 1), "b": _fs(root, 2)}
        info = await sn.stat("b")
        info.labels = {"y": "2"}
        assert (await sn.update(info)).labels == {"y": "2", UPPERDIR_LABEL: _fs(root, 2)}
    finally:
        await sn.close()


def test_overlay_config_refuses_the_snapshotters_own_options() -> None:
    with pytest.raises(ValueError, match="mount_options: lowerdir is set by the snapshotter"):
        OverlayConfig(mount_options=["lowerdir=/x"]).validate()
    with pytest.raises(ValueError, match="one option per list item"):
        OverlayConfig(mount_options=["ro,nosuid"]).validate()
    OverlayConfig(mount_options=["volatile"]).validate()


async def test_sync_remove_deletes_at_once(base: Path) -> None:
    for sn in (
        await _overlay(base / "o", sync_remove=True),
        await NativeSnapshotter.open(base / "n", NativeConfig(sync_remove=True)),
    ):
        try:
            await sn.prepare("a", "")
            snapshots = sn.root / "snapshots"
            assert os.listdir(snapshots) == ["1"]
            await sn.remove("a")
            assert os.listdir(snapshots) == []
        finally:
            await sn.close()


async def test_overlay_skips_where_overlay_cannot_mount(base: Path) -> None:
    """A root on an overlay filesystem cannot hold upper dirs: the plugin is skipped, with the reason."""
    lower, upper, work, merged = (base / n for n in ("l", "u", "w", "m"))
    for d in (lower, upper, work, merged):
        d.mkdir()
    await mount_all(
        [Mount("overlay", "overlay", options=(f"lowerdir={lower}", f"upperdir={upper}", f"workdir={work}"))],
        merged,
    )
    try:
        with pytest.raises(PluginSkipped, match="overlay cannot be mounted on"):
            async with plugin_instance("berth.snapshotter.v1.overlayfs", merged):
                pass
        assert mount_points_under(base) == [str(merged)]  # its probe mount is gone again
    finally:
        await unmount_all(merged)


# -- native ------------------------------------------------------------------------


async def test_native_copies_keep_everything_but_share_no_inode(base: Path) -> None:
    sn = await NativeSnapshotter.open(base / "root")
    try:
        assert sn.reflink is False  # ext4 under /tmp: plain copies
        (m,) = await sn.prepare("a", "")
        src = Path(m.source)
        (src / "one").write_text("linked")
        os.link(src / "one", src / "two")
        os.setxattr(src / "one", "user.berth", b"kept")
        os.mknod(src / "null", 0o600 | stat.S_IFCHR, os.makedev(1, 3))
        os.chown(src / "one", 123, 456)
        await sn.commit("c", "a")
        (child,) = await sn.prepare("b", "c")
        dst = Path(child.source)
        assert child.options == ("rw", "rbind") and dst != src
        one, two = (dst / "one").stat(), (dst / "two").stat()
        assert one.st_ino == two.st_ino  # hard links inside the layer stay hard links
        assert one.st_ino != (src / "one").stat().st_ino  # ...but nothing is shared with the parent
        assert (one.st_uid, one.st_gid) == (123, 456)
        assert os.getxattr(dst / "one", "user.berth") == b"kept"
        assert os.stat(dst / "null").st_rdev == os.makedev(1, 3)
        (view,) = await sn.view("v", "c")
        assert view == Mount("bind", str(src), options=("ro", "rbind"))  # views copy nothing
    finally:
        await sn.close()


async def test_native_refuses_before_copying(base: Path) -> None:
    sn = await NativeSnapshotter.open(base / "root")
    try:
        with pytest.raises(NotFound, match="parent 'nope' not found"):
            await sn.prepare("a", "nope")
        assert os.listdir(base / "root" / "staging") == []
    finally:
        await sn.close()


# -- registration ------------------------------------------------------------------------


async def test_both_register_through_entry_points_with_their_config(base: Path) -> None:
    reg = Registry()
    reg.load_entrypoints()
    schemas = reg.schemas()
    assert schemas["berth.snapshotter.v1.overlayfs"] is OverlayConfig
    assert schemas["berth.snapshotter.v1.native"] is NativeConfig
    config_file = base / "config.toml"
    config_file.write_text('version = 1\n[plugins."berth.snapshotter.v1.native"]\nreflink = false\n')
    config = load_config(config_file, schemas, plugin_names=[r.full_name for r in reg.registrations])
    assert config.plugins["berth.snapshotter.v1.native"] == NativeConfig(reflink=False)
    async with plugin_instance("berth.snapshotter.v1.native", base / "d", config_path=config_file) as sn:
        assert isinstance(sn, NativeSnapshotter) and isinstance(sn, Snapshotter)
        assert sn.config.reflink is False
        assert sn.root == base / "d" / "root" / "berth.snapshotter.v1.native"
