"""CreateContainer's copy of an image's /etc/passwd and /etc/group answers user lookups as the rootfs does."""

from __future__ import annotations

import os
from pathlib import Path

from daemon.oci import users
from plugins.cri.container.manager import copy_user_files


def rootfs(tmp_path: Path) -> Path:
    root = tmp_path / "rootfs"
    (root / "etc").mkdir(parents=True)
    (root / "usr/lib").mkdir(parents=True)
    (root / "usr/lib/passwd").write_text("root:x:0:0:root:/root:/bin/sh\nweb:x:33:44:web:/srv:/bin/sh\n")
    os.symlink("/usr/lib/passwd", root / "etc/passwd")  # scoped: the rootfs's file, not the host's
    (root / "etc/group").write_text("root:x:0:\nwww:x:44:web\nextra:x:55:web\n")
    return root


def test_copy_answers_the_same_lookups(tmp_path: Path) -> None:
    root = rootfs(tmp_path)
    target = tmp_path / "users" / "sha256-abc"
    assert copy_user_files(str(root), target)
    for spec in ("", "web", "33", "web:www", "1000", "root:extra"):
        got, want = users.resolve_user(str(target), spec), users.resolve_user(str(root), spec)
        assert (got.uid, got.gid, got.additional_gids, got.home) == (
            want.uid,
            want.gid,
            want.additional_gids,
            want.home,
        )
    assert copy_user_files(str(root), target)  # a second copy keeps the first
    assert sorted(p.name for p in target.parent.iterdir()) == ["sha256-abc"]


def test_missing_file_stays_missing_and_bad_file_is_not_kept(tmp_path: Path) -> None:
    root = rootfs(tmp_path)
    (root / "etc/group").unlink()
    target = tmp_path / "users" / "a"
    assert copy_user_files(str(root), target)
    assert not (target / "etc/group").exists()
    assert users.resolve_user(str(target), "web").additional_gids == (44,)

    os.mkfifo(root / "etc/group")  # not a regular file: the lookup must fail on the real rootfs
    other = tmp_path / "users" / "b"
    assert not copy_user_files(str(root), other)
    assert not other.exists()
