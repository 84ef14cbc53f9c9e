"""An image's /etc/passwd and /etc/group read from a snapshot's mounts answer lookups as the mounted rootfs.

The overlay reader (:mod:`daemon.oci.userfiles`) is checked against the
kernel: layers with whiteouts, opaque directories, shadowed files and
symlinks are mounted as an overlay and every answer must match what the
mount shows (root only, like the mounts it replaces).
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest

from daemon.errors import BerthError, FailedPrecondition, NotFound
from daemon.oci import spec as ocispec
from daemon.oci import users
from daemon.oci.userfiles import NeedsMount, _NotRegular, overlay_layers, read_merged, read_user_files
from daemon.pathsafe import open_in_root
from daemon.protocols import Mount
from protos.containerd.types import Mount as WireMount

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="whiteouts, trusted xattrs and mounts need root")

PASSWD = "root:x:0:0:root:/root:/bin/sh\nweb:x:33:44:web:/srv:/bin/sh\n"
GROUP = "root:x:0:\nwww:x:44:web\nextra:x:55:web\n"
LOOKUPS = ("", "web", "33", "web:www", "1000", "root:extra", "33:55")


def _rootfs(tmp_path: Path) -> Path:
    """A plain rootfs whose /etc/passwd is a symlink (absolute: resolved inside the rootfs)."""
    root = tmp_path / "rootfs"
    (root / "etc").mkdir(parents=True)
    (root / "usr/lib").mkdir(parents=True)
    (root / "usr/lib/passwd").write_text(PASSWD)
    os.symlink("/usr/lib/passwd", root / "etc/passwd")
    (root / "etc/group").write_text(GROUP)
    return root


def _outcome(rootfs: str, spec: str) -> users.User | str:
    try:
        return users.resolve_user(rootfs, spec)
    except BerthError as exc:
        return type(exc).__name__


def _same_answers(files: users.UserFiles, root: str) -> None:
    for spec in LOOKUPS:
        assert _outcome(files, spec) == _outcome(root, spec), spec


def _overlay(*layers: Path, upper: Path | None = None, extra: tuple[str, ...] = ()) -> Mount:
    options = [*extra, f"lowerdir={':'.join(map(str, layers))}"]
    if upper is not None:
        options += [f"upperdir={upper}", f"workdir={upper.parent / 'work'}"]
    return Mount("overlay", "overlay", "", tuple(options))


# -- UserFiles: the two files as a rootfs -----------------------------------------------


def test_files_from_a_rootfs_answer_the_same_lookups(tmp_path: Path) -> None:
    root = _rootfs(tmp_path)
    files = users.UserFiles.from_root(str(root), "image x")
    assert files == "image x" and files.data("/etc/passwd") == PASSWD.encode()
    _same_answers(files, str(root))
    assert users.resolve_user(files, "web") == users.User(33, 44, (44, 55), "/srv", "web")
    with pytest.raises(NotFound, match="rootfs 'image x'"):
        users.resolve_user(files, "nobody")
    # the spec builders take it wherever they take a rootfs path
    spec: ocispec.Spec = {}
    ocispec.with_user("web", files)(spec)
    ocispec.with_additional_gids("33", files)(spec)
    assert spec["process"]["user"] == {"uid": 33, "gid": 44, "additionalGids": [44, 55]}
    assert pickle.loads(pickle.dumps(files)).files == files.files
    assert users.UserFiles.from_root(files) is files
    with pytest.raises(ValueError, match="holds only"):
        files.data("/etc/shadow")


def test_missing_file_stays_missing_and_a_bad_one_fails_only_the_lookup_that_reads_it(tmp_path: Path) -> None:
    root = _rootfs(tmp_path)
    (root / "etc/group").unlink()
    files = users.UserFiles.from_root(str(root))
    assert files.data("etc/group") is None
    assert users.resolve_user(files, "web").additional_gids == (44,)

    os.mkfifo(root / "etc/group")  # not a regular file: a lookup reading it fails, on the rootfs too
    files = users.UserFiles.from_root(str(root))
    _same_answers(files, str(root))
    with pytest.raises(FailedPrecondition, match="not a regular file"):
        users.resolve_user(files, "web")
    assert users.resolve_user(files, "1000") == users.User(1000, 0, (0,), "/", "")  # group not needed


# -- which mounts the reader takes --------------------------------------------------------


def test_overlay_layers_from_mount_options() -> None:
    m = WireMount(
        type="overlay",
        source="overlay",
        options=["index=off", "workdir=/s/9/work", "upperdir=/s/9/fs", "lowerdir=/s/2/fs:/s/1/fs"],
    )
    assert overlay_layers(m) == (["/s/9/fs", "/s/2/fs", "/s/1/fs"], "trusted.overlay.")
    m.options.append("userxattr")
    assert overlay_layers(m)[1] == "user.overlay."
    for odd in (["metacopy=on"], ["redirect_dir=on"], ["lowerdir+=/c"]):
        with pytest.raises(NeedsMount):
            overlay_layers(Mount("overlay", "overlay", "", ("lowerdir=/a:/b", *odd)))
    for lower in ("lowerdir=a:/b", "lowerdir=/a\\:b:/c", "lowerdir="):
        with pytest.raises(NeedsMount):
            overlay_layers(Mount("overlay", "overlay", "", (lower,)))


def test_a_bind_mount_is_read_from_its_source_and_other_mounts_need_mounting(tmp_path: Path) -> None:
    root = _rootfs(tmp_path)
    for m in (Mount("bind", str(root), "", ("ro", "rbind")), WireMount("none", str(root), options=["rbind"])):
        files = read_user_files([m])
        assert files == str(root)
        _same_answers(files, str(root))
    for mounts in (
        [Mount("tmpfs", "tmpfs", "", ("size=1m",))],
        [Mount("bind", str(root), "", ("rbind",))] * 2,
        [],
    ):
        with pytest.raises(NeedsMount):
            read_user_files(mounts)


# -- the merged view, without the kernel --------------------------------------------------


def test_symlinks_resolve_inside_the_merged_snapshot(tmp_path: Path) -> None:
    top, low = tmp_path / "top", tmp_path / "low"
    (low / "usr/etc").mkdir(parents=True)
    (low / "usr/etc/passwd").write_text(PASSWD)
    (low / "etc").mkdir()
    (low / "etc/passwd").write_text("shadowed by the top layer's etc symlink\n")
    (low / "secret").write_text("root:x:0:0::/in-snapshot:/bin/sh\n")
    top.mkdir()
    (top / "etc").symlink_to("usr/etc")  # a non-directory over a directory: the symlink wins
    (top / "usr/etc").mkdir(parents=True)
    # an escape attempt: .. stops at the snapshot's root, / is the snapshot's
    (top / "usr/etc/group").symlink_to("../../../../../../secret")
    layers = [str(top), str(low)]
    assert read_merged(layers, "/etc/passwd") == PASSWD.encode()
    assert read_merged(layers, "/etc/group") == b"root:x:0:0::/in-snapshot:/bin/sh\n"
    (top / "usr/etc/group").unlink()
    (top / "usr/etc/group").symlink_to("/etc/../../secret")  # /etc is usr/etc: .. goes to /usr, as in open(2)
    assert read_merged(layers, "/etc/group") == b"root:x:0:0::/in-snapshot:/bin/sh\n"
    (top / "usr/etc/group").unlink()
    (top / "usr/etc/group").symlink_to("/nowhere/group")
    assert read_merged(layers, "/etc/group") is None


def test_files_the_rootfs_read_refuses_are_kept_as_errors(tmp_path: Path) -> None:
    top, low = tmp_path / "top", tmp_path / "low"
    (top / "etc").mkdir(parents=True)
    (top / "etc/passwd").symlink_to("passwd")  # a loop
    (top / "etc/group").mkdir()
    (low / "etc").mkdir(parents=True)
    (low / "etc/group").write_text(GROUP)
    files = read_user_files([_overlay(top, low)], "img")
    with pytest.raises(FailedPrecondition, match="rootfs 'img': /etc/passwd: too many levels"):
        files.data("/etc/passwd")
    with pytest.raises(FailedPrecondition, match="/etc/group: not a regular file"):
        files.data("/etc/group")
    (top / "etc/passwd").unlink()
    (top / "etc/passwd").write_bytes(b"x" * (users.MAX_FILE_BYTES + 1))
    with pytest.raises(FailedPrecondition, match="larger than"):
        read_user_files([_overlay(top, low)]).data("/etc/passwd")
    # a regular file where a directory should be: ENOTDIR, as open(2) in the mount says
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat/etc").write_text("")
    with pytest.raises(FailedPrecondition, match="Not a directory"):
        read_user_files([_overlay(tmp_path / "flat", low)]).data("/etc/group")


def test_what_the_reader_does_not_model_needs_a_mount(tmp_path: Path) -> None:
    top, low = tmp_path / "top", tmp_path / "low"
    (top / "etc").mkdir(parents=True)
    (low / "etc").mkdir(parents=True)
    (low / "etc/passwd").write_text(PASSWD)
    mount = _overlay(top, low, extra=("userxattr",))
    assert read_user_files([mount]).data("/etc/passwd") == PASSWD.encode()
    (top / "etc/.wh.passwd").write_text("")  # a layer unpacked in the tar form: left to the kernel
    with pytest.raises(NeedsMount, match=r"\.wh\."):
        read_user_files([mount])
    (top / "etc/.wh.passwd").unlink()
    os.setxattr(top / "etc", "user.overlay.opaque", b"x")
    with pytest.raises(NeedsMount, match="opaque"):
        read_user_files([mount])
    os.removexattr(top / "etc", "user.overlay.opaque")
    os.setxattr(low / "etc/passwd", "user.overlay.metacopy", b"")
    with pytest.raises(NeedsMount, match="metacopy"):
        read_user_files([mount])
    os.setxattr(top, "user.overlay.opaque", b"y")
    with pytest.raises(NeedsMount, match="opaque root"):
        read_user_files([mount])
    with pytest.raises(NeedsMount, match="layer"):
        read_user_files([_overlay(tmp_path / "absent", low)])


# -- against the kernel's overlay -----------------------------------------------------------


def _whiteout(path: Path) -> None:
    os.mknod(path, 0o600 | 0o020000, os.makedev(0, 0))


def _layers(base: Path) -> list[Path]:
    """Four layers, top first, covering what the reader resolves itself."""
    l1, l2, l3, l4 = (base / f"l{i}" for i in range(1, 5))
    for d in (l1, l2, l3, l4):
        d.mkdir(parents=True)
    # l4 (bottom): both files
    (l4 / "etc").mkdir()
    (l4 / "etc/passwd").write_text("root:x:0:0::/root:/bin/sh\nold:x:5:5::/:/bin/sh\n")
    (l4 / "etc/group").write_text("root:x:0:\nold:x:5:\n")
    (l4 / "etc/shadowed").write_text("bottom\n")
    (l4 / "usr/lib").mkdir(parents=True)
    (l4 / "usr/lib/os-release").write_text("lib\n")
    # l3: passwd replaced; a directory replaced by a file; a relative link through a merged dir
    (l3 / "etc").mkdir()
    (l3 / "etc/passwd").write_text("root:x:0:0::/root:/bin/sh\napp:x:1000:1000::/home:/bin/sh\n")
    (l3 / "usr").mkdir()
    (l3 / "usr/lib").write_text("a file over the directory below\n")
    (l3 / "etc/os-release").symlink_to("../usr/lib/os-release")
    (l3 / "etc/abs").symlink_to("/etc/shadowed")
    (l3 / "etc/up").symlink_to("../../../../etc/shadowed")
    # l2: group whited out, an opaque dir that hides l3/l4's etc/sub
    (l2 / "etc").mkdir()
    _whiteout(l2 / "etc/group")
    (l4 / "etc/sub").mkdir()
    (l4 / "etc/sub/f").write_text("hidden\n")
    (l2 / "etc/sub").mkdir()
    os.setxattr(l2 / "etc/sub", "trusted.overlay.opaque", b"y")
    (l2 / "etc/sub/g").write_text("visible\n")
    (l2 / "etc/fifo").mkdir()
    os.mkfifo(l2 / "etc/pipe")
    # l1 (top): a new group file over the whiteout
    (l1 / "etc").mkdir()
    (l1 / "etc/group").write_text("root:x:0:\napp:x:1000:\n")
    return [l1, l2, l3, l4]


PATHS = [
    "/etc/passwd",
    "/etc/group",
    "/etc/shadowed",
    "/etc/sub/f",
    "/etc/sub/g",
    "/etc/none",
    "/none/x",
    "/etc/os-release",
    "/etc/abs",
    "/etc/up",
    "/usr/lib/os-release",
    "/etc/fifo",
    "/etc/pipe",
    "/etc/passwd/x",
]


def _ours(layers: list[str], path: str) -> bytes | str | None:
    try:
        return read_merged(layers, path)
    except (OSError, _NotRegular):
        return "error"


def _kernels(root: str, path: str) -> bytes | str | None:
    try:
        fd = open_in_root(root, path)
    except FileNotFoundError:
        return None
    except OSError:
        return "error"
    try:
        if not os.path.isfile(f"/proc/self/fd/{fd}") or os.fstat(fd).st_size > users.MAX_FILE_BYTES:
            return "error"
        return os.read(fd, users.MAX_FILE_BYTES + 1)
    finally:
        os.close(fd)


@needs_root
async def test_merged_reads_match_the_kernels_overlay(tmp_path: Path) -> None:
    from daemon.mount import mounted

    dirs = [str(d) for d in _layers(tmp_path)]
    ours = {path: _ours(dirs, path) for path in PATHS}
    async with mounted([_overlay(*map(Path, dirs), extra=("ro",))]) as root:
        kernel = {path: _kernels(str(root), path) for path in PATHS}
    assert ours == kernel
    assert ours["/etc/group"] == b"root:x:0:\napp:x:1000:\n" and ours["/etc/sub/f"] is None
    assert ours["/etc/abs"] == ours["/etc/up"] == b"bottom\n" and ours["/etc/os-release"] == "error"


@needs_root
async def test_user_files_of_an_active_snapshot_match_the_mounted_view(tmp_path: Path) -> None:
    from daemon.mount import mounted

    layers = _layers(tmp_path / "layers")
    (layers[0] / "etc/group").unlink()  # the whiteout below now hides the bottom group: there is none
    upper = tmp_path / "upper"
    upper.mkdir()
    (tmp_path / "work").mkdir()
    mount = _overlay(*layers, upper=upper, extra=("index=off",))
    files = read_user_files([mount], "ctr")
    assert files.data("/etc/group") is None
    assert (files.data("/etc/passwd") or b"").endswith(b"app:x:1000:1000::/home:/bin/sh\n")
    async with mounted([mount]) as root:
        _same_answers(files, str(root))
        assert files.files == users.UserFiles.from_root(str(root), "ctr").files


@needs_root
async def test_the_cri_mounts_only_when_the_reader_says_so(tmp_path: Path) -> None:
    from plugins.cri.container.create import image_user_files

    root = _rootfs(tmp_path)
    scratch = tmp_path / "scratch"
    files = await image_user_files([Mount("bind", str(root), "", ("rbind", "ro"))], scratch, "img")
    assert files.data("/etc/group") == GROUP.encode() and not scratch.exists()
    files = await image_user_files([Mount("tmpfs", "tmpfs", "", ("size=64k",))], scratch, "img")
    assert files.files == {"/etc/passwd": None, "/etc/group": None}
    assert list(scratch.iterdir()) == []  # unmounted and removed
