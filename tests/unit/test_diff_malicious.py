"""Hostile layers: nothing outside the snapshot root may change, ever.

Every case runs in both forms (overlay upper dir with a lower layer, bind
source) against a canary directory next to the snapshot. The whole
neighbourhood of the snapshot (canary, lower layer, everything in the test's
temp dir but the root itself) is snapshotted before and after: contents,
types, modes, owners, times, inodes, link counts and xattrs must be equal.

What happens to the entry itself, per case (containerd's behaviour unless
said otherwise):

* names climbing out of the root (``../x``, also via a PAX ``path``), and
  hard link targets doing so: **refused** (containerd clamps them to the
  root; Docker refuses them, and so do we);
* absolute names and absolute or ``..`` symlinks met *on the way* to an
  entry: **confined**, resolved inside the root like a chroot would;
* hard links to anything not already in the layer (a host path, a path
  through a symlink): **refused**; a hard link to a symlink links the symlink;
* writing onto a symlink (a file, a device, a directory of the same name):
  the symlink is **replaced**, never followed;
* whiteouts and opaque markers behind a symlink act inside the root only;
  whiteouts of ``..`` are **refused**; symlink loops are **refused** (ELOOP).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from daemon.errors import InvalidArgument
from daemon.protocols import Descriptor, Mount
from plugins.diff import TarApplier
from tests.unit.tarcraft import (
    MTIME,
    BytesStream,
    E,
    dir_,
    file,
    hardlink,
    make_tree,
    opaque,
    sha256,
    snapshot,
    symlink,
    tar_bytes,
    whiteout,
)


@dataclass
class Case:
    name: str
    #: the entries, given the absolute path of the host canary directory
    entries: Callable[[str], list[E]]
    #: a regex the refusal must match (the entry's name is in it); "" = the apply succeeds
    refused: str = ""
    #: paths (relative to the root; ``{H}`` = canary dir without its leading "/") that must exist after
    inside: list[str] = field(default_factory=list)
    #: content of the parent layer (the overlay's lower dir, or already in the bind source)
    below: Callable[[str], list[E]] = lambda h: []


CASES = [
    Case("dotdot", lambda h: [file("../host/pwned", b"x")], r"entry '../host/pwned': path leads outside"),
    Case(
        "dotdot-deep",
        lambda h: [file("../../../../../../../tmp/pwned")],
        r"entry '../../.*pwned': path leads",
    ),
    Case("dotdot-inside", lambda h: [file("a/../../host/pwned")], r"entry 'a/../../host/pwned': path leads"),
    Case("pax-path", lambda h: [E("innocent", pax={"path": "../host/pwned"})], r"entry '../host/pwned'"),
    Case("absolute", lambda h: [file(h + "/pwned", b"x")], inside=["{H}/pwned"]),
    Case("symlink-abs", lambda h: [symlink("evil", h), file("evil/pwned")], inside=["{H}/pwned"]),
    Case("symlink-rel", lambda h: [symlink("evil", "../host"), file("evil/pwned")], inside=["host/pwned"]),
    Case("symlink-to-root", lambda h: [symlink("r", "/"), file("r" + h + "/pwned")], inside=["{H}/pwned"]),
    Case(
        "symlink-hops", lambda h: [symlink("a", "b"), symlink("b", h), file("a/pwned")], inside=["{H}/pwned"]
    ),
    Case("dotdot-chain", lambda h: [symlink("up", ".."), file("up/up/up/pwned")], inside=["pwned"]),
    Case(
        "dotdot-chain-deep",
        lambda h: [dir_("a"), symlink("a/b", "../../../../.."), file("a/b/host/pwned")],
        inside=["host/pwned"],
    ),
    Case(
        "symlink-loop",
        lambda h: [symlink("a", "b"), symlink("b", "a"), file("a/x")],
        r"entry 'a/x': too many",
    ),
    Case(
        "file-onto-symlink",
        lambda h: [symlink("s", h + "/canary"), file("s", b"overwrite", mode=0o777)],
        inside=["s"],
    ),
    Case(
        "device-onto-symlink",
        lambda h: [symlink("s", h + "/canary"), E("s", "chr", major=1, minor=3)],
        inside=["s"],
    ),
    Case("dir-onto-symlink", lambda h: [symlink("s", h), dir_("s"), file("s/pwned")], inside=["s/pwned"]),
    Case(
        "dir-replaced-by-symlink",
        lambda h: [dir_("d"), file("d/ok"), symlink("d", h), file("d/pwned")],
        inside=["{H}/pwned", "d"],
    ),
    Case(
        "symlink-metadata-not-followed",
        lambda h: [E("s", "symlink", link=h + "/canary", mtime=1, uid=1000, xattrs={"user.x": b"1"})],
        inside=["s"],
    ),
    Case(
        "hardlink-abs", lambda h: [hardlink("l", h + "/canary")], r"entry 'l': hard link target '.*/canary'"
    ),
    Case(
        "hardlink-dotdot",
        lambda h: [hardlink("l", "../host/canary")],
        r"entry 'l': hard link target .*outside",
    ),
    Case(
        "hardlink-through-symlink",
        lambda h: [symlink("evil", h), hardlink("l", "evil/canary")],
        r"entry 'l': hard link target 'evil/canary': not found",
    ),
    Case("hardlink-to-symlink", lambda h: [symlink("s", h + "/canary"), hardlink("l", "s")], inside=["l"]),
    Case(
        "write-through-hardlinked-symlink",
        lambda h: [symlink("s", h + "/canary"), hardlink("l", "s"), file("l/x", b"x")],
        inside=["{H}/canary/x"],
    ),
    Case(
        "hardlink-name-escape", lambda h: [file("f"), hardlink("../host/l", "f")], r"entry '../host/l': path"
    ),
    Case(
        "symlink-name-escape", lambda h: [symlink("../host/s", "/")], r"entry '../host/s': path leads outside"
    ),
    Case("whiteout-dotdot", lambda h: [file("../.wh.host")], r"entry '../.wh.host': path leads outside"),
    Case(
        "whiteout-of-dotdot", lambda h: [file("a/.wh..."), dir_("a")], r"entry 'a/.wh...': whiteout of '..'"
    ),
    Case("whiteout-through-symlink", lambda h: [symlink("evil", h), whiteout("evil/canary")]),
    Case("opaque-through-symlink", lambda h: [symlink("evil", h), opaque("evil")]),
    Case(
        "lower-symlink",
        lambda h: [file("evil/pwned", b"x"), file("evil2/sub/file")],
        inside=["{H}/pwned", "host/sub/file"],
        below=lambda h: [symlink("evil", h), symlink("evil2", "../../host")],
    ),
    Case(
        "lower-symlink-whiteouts",
        lambda h: [whiteout("evil/canary"), opaque("evil"), opaque("evil/sub"), whiteout("evil2/canary")],
        below=lambda h: [symlink("evil", h), symlink("evil2", "../host")],
    ),
    Case(
        "lower-symlink-hardlink",
        lambda h: [hardlink("l", "evil/canary")],
        r"entry 'l': hard link target 'evil/canary': not found",
        below=lambda h: [symlink("evil", h)],
    ),
]


@dataclass
class Site:
    """The snapshot and its neighbourhood, in one form."""

    root: Path
    mounts: list[Mount]
    host: Path
    watched: Path
    skip: list[str]


def make_site(tmp_path: Path, form: str, below: list[E]) -> Site:
    host = tmp_path / "host"
    make_tree(
        str(host),
        [
            E("canary", data=b"canary", mode=0o600, xattrs={"user.canary": b"1"}),
            file("sub/file", b"sub"),
            dir_("sub", mode=0o700, mtime=MTIME),
        ],
    )
    if form == "overlay":
        lower, upper, work = tmp_path / "lower", tmp_path / "upper", tmp_path / "work"
        make_tree(str(lower), below)
        upper.mkdir()
        work.mkdir()
        opts = (f"workdir={work}", f"upperdir={upper}", f"lowerdir={lower}")
        return Site(upper, [Mount("overlay", "overlay", options=opts)], host, tmp_path, [str(upper)])
    root = tmp_path / "rootfs"
    make_tree(str(root), below)
    return Site(root, [Mount("bind", str(root), options=("rbind", "rw"))], host, tmp_path, [str(root)])


@pytest.mark.parametrize("form", ["overlay", "bind"])
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
async def test_nothing_outside_the_root_changes(tmp_path: Path, form: str, case: Case) -> None:
    site_dir = tmp_path / "site"
    site_dir.mkdir()
    h = str(site_dir / "host")
    site = make_site(site_dir, form, case.below(h))
    before = snapshot(str(site.watched), skip=site.skip)
    assert "host/canary" in before
    data = tar_bytes(case.entries(h))
    desc = Descriptor("application/vnd.oci.image.layer.v1.tar", sha256(data), len(data))
    if case.refused:
        with pytest.raises(InvalidArgument, match=f"layer {sha256(data)}: {case.refused}"):
            await TarApplier().apply(desc, site.mounts, BytesStream(data))
    else:
        await TarApplier().apply(desc, site.mounts, BytesStream(data))
    assert snapshot(str(site.watched), skip=site.skip) == before
    for rel in case.inside:
        assert os.path.lexists(site.root / rel.format(H=h.lstrip("/"))), rel


@pytest.mark.parametrize("form", ["overlay", "bind"])
async def test_confined_entries_are_what_the_layer_said(tmp_path: Path, form: str) -> None:
    """Spot checks of what the confined cases left inside the root."""
    h = str(tmp_path / "host")
    site = make_site(tmp_path, form, [])
    entries = [
        symlink("s", h + "/canary"),
        hardlink("l", "s"),
        symlink("t", h + "/canary"),
        file("t", b"overwrite"),
        symlink("evil", h),
        file("evil/pwned", b"confined"),
    ]
    data = tar_bytes(entries)
    await TarApplier().apply(Descriptor("", sha256(data), len(data)), site.mounts, BytesStream(data))
    r = site.root
    s, link = os.lstat(r / "s"), os.lstat(r / "l")
    assert stat.S_ISLNK(link.st_mode) and link.st_ino == s.st_ino  # the symlink itself, linked
    assert os.readlink(r / "l") == h + "/canary"  # its target is only data
    assert not (r / "t").is_symlink() and (r / "t").read_bytes() == b"overwrite"
    assert (r / h.lstrip("/") / "pwned").read_bytes() == b"confined"
    assert (Path(h) / "canary").read_bytes() == b"canary"
    assert not (Path(h) / "pwned").exists()
