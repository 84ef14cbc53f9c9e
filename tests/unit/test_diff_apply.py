"""The tar applier: compression, diff ids, metadata, whiteouts in both forms, streaming, errors."""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
import subprocess
import threading
import time
import tracemalloc
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import pytest

import plugins.diff
from daemon.errors import FailedPrecondition, InvalidArgument, Unimplemented
from daemon.protocols import Applier, Descriptor, Mount
from daemon.registry import InitContext, Registry
from plugins.diff import TarApplier
from plugins.diff.decompress import ZstdFrames
from plugins.diff.pipe import Pipe, SourceClosed
from tests.unit.tarcraft import (
    MTIME,
    BytesStream,
    E,
    GenStream,
    big_file_tar,
    dir_,
    file,
    gzip_bytes,
    hardlink,
    make_tree,
    opaque,
    sha256,
    snapshot,
    symlink,
    tar_bytes,
    whiteout,
    zstd_bytes,
)

OCI_TAR = "application/vnd.oci.image.layer.v1.tar"
OCI_GZIP = OCI_TAR + "+gzip"
OCI_ZSTD = OCI_TAR + "+zstd"
DOCKER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
OPAQUE = "trusted.overlay.opaque"


@dataclass
class Snap:
    """An active snapshot as a snapshotter would hand it out, in one of the two forms."""

    form: str
    root: Path  # where this layer's files land: the upper dir or the bind source
    mounts: list[Mount]
    lower: Path | None = None
    work: Path | None = None


def make_snap(tmp_path: Path, form: str, below: Sequence[E] = ()) -> Snap:
    """``below`` is the parent's content: the lower dir (overlay) or already in the copy (bind)."""
    if form == "overlay":
        lower, upper, work = tmp_path / "lower", tmp_path / "upper", tmp_path / "work"
        make_tree(str(lower), below)
        upper.mkdir()
        work.mkdir()
        opts = (f"workdir={work}", f"upperdir={upper}", f"lowerdir={lower}")
        return Snap(form, upper, [Mount("overlay", "overlay", options=opts)], lower, work)
    root = tmp_path / "rootfs"
    make_tree(str(root), below)
    return Snap(form, root, [Mount("bind", str(root), options=("rbind", "rw"))])


async def apply(
    snap: Snap, data: bytes, media_type: str = OCI_TAR, applier: TarApplier | None = None
) -> Descriptor:
    desc = Descriptor(media_type=media_type, digest=sha256(data), size=len(data))
    return await (applier or TarApplier()).apply(desc, snap.mounts, BytesStream(data))


@contextlib.contextmanager
def overlay_mounted(snap: Snap, target: Path) -> Iterator[Path]:
    assert snap.lower is not None and snap.work is not None
    target.mkdir()
    opts = f"lowerdir={snap.lower},upperdir={snap.root},workdir={snap.work}"
    res = subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, str(target)], capture_output=True)
    if res.returncode:
        pytest.skip(f"cannot mount overlay here: {res.stderr.decode().strip()}")
    try:
        yield target
    finally:
        subprocess.run(["umount", str(target)], check=True)


def fds_under(path: Path) -> list[str]:
    """Open fds of this process pointing into ``path`` (the worker must have closed its own)."""
    out = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target == str(path) or target.startswith(f"{path}/"):
                out.append(target)
    return out


FORMS = pytest.mark.parametrize("form", ["overlay", "bind"])


# -- the plugin ------------------------------------------------------------------


async def test_registers_as_berth_diff_v1_tar() -> None:
    reg = Registry()
    reg.register_module(plugins.diff)
    regs = [r for r in reg.registrations if r.type == "berth.diff.v1"]
    assert [r.full_name for r in regs] == ["berth.diff.v1.tar"]
    instance = await regs[0].init(cast(InitContext, None))
    assert isinstance(instance, Applier)


# -- compression and the diff id --------------------------------------------------


LAYER = [dir_("etc"), file("etc/hostname", b"berth\n"), file("bin/sh", b"\x7fELF" * 1000, mode=0o755)]


@pytest.mark.parametrize(
    ("compress", "media_type"),
    [
        (lambda b: b, OCI_TAR),
        (gzip_bytes, OCI_GZIP),
        (zstd_bytes, OCI_ZSTD),
        (gzip_bytes, DOCKER_GZIP),
        (lambda b: b, DOCKER_GZIP),  # Docker's "tar.gzip" that is not compressed: the bytes decide
        (zstd_bytes, OCI_TAR),
        (gzip_bytes, ""),
    ],
    ids=["tar", "gzip", "zstd", "docker-gzip", "docker-plain", "zstd-as-tar", "gzip-no-type"],
)
async def test_layer_applies_and_returns_uncompressed_diff_id(
    tmp_path: Path, compress: Callable[[bytes], bytes], media_type: str
) -> None:
    raw = tar_bytes(LAYER)
    snap = make_snap(tmp_path, "bind")
    desc = await apply(snap, compress(raw), media_type)
    assert desc == Descriptor(media_type=OCI_TAR, digest=sha256(raw), size=len(raw))
    assert (snap.root / "etc/hostname").read_bytes() == b"berth\n"
    assert (snap.root / "bin/sh").read_bytes() == b"\x7fELF" * 1000


async def test_multi_member_gzip_and_multi_frame_zstd(tmp_path: Path) -> None:
    raw = tar_bytes([file(f"f{i}", os.urandom(3000)) for i in range(20)])
    cut = len(raw) // 3
    gz = gzip_bytes(raw[:cut]) + gzip_bytes(raw[cut:]) + b"\0" * 100  # pigz-style members, zero padding
    zs = zstd_bytes(raw[:cut]) + zstd_bytes(raw[cut:])
    for i, (data, media_type) in enumerate([(gz, OCI_GZIP), (zs, OCI_ZSTD)]):
        snap = make_snap(tmp_path / str(i), "bind")
        desc = await apply(snap, data, media_type)
        assert desc.digest == sha256(raw)
        assert sorted(os.listdir(snap.root)) == sorted(f"f{i}" for i in range(20))


async def test_empty_layers(tmp_path: Path) -> None:
    for i, data in enumerate([b"", b"\0" * 1024, gzip_bytes(b""), gzip_bytes(b"\0" * 10240)]):
        snap = make_snap(tmp_path / str(i), "bind")
        desc = await apply(snap, data)
        assert desc.size in (0, 1024, 10240)
        assert os.listdir(snap.root) == []


def test_zstd_frame_tracker_knows_complete_from_cut() -> None:
    data = zstd_bytes(os.urandom(300_000)) + zstd_bytes(b"tail")
    whole = ZstdFrames("l")
    for i in range(0, len(data), 777):
        whole.feed(data[i : i + 777])
    whole.finish()
    assert whole.frames == 2
    for cut in (3, 10, len(data) // 2, len(data) - 1):
        part = ZstdFrames("l")
        part.feed(data[:cut])
        with pytest.raises(InvalidArgument, match="truncated"):
            part.finish()


# -- errors -----------------------------------------------------------------------


async def test_unknown_media_type_and_compression_are_refused(tmp_path: Path) -> None:
    snap = make_snap(tmp_path, "bind")
    raw = tar_bytes(LAYER)
    with pytest.raises(InvalidArgument, match=r"sha256:[0-9a-f]{64}: media type .*tar\+bzip2"):
        await apply(snap, raw, OCI_TAR + "+bzip2")
    xz = b"\xfd7zXZ\x00" + b"\0" * 100
    with pytest.raises(InvalidArgument, match=f"{sha256(xz)}: xz compression is not supported"):
        await apply(snap, xz)


@pytest.mark.parametrize(
    ("compress", "media_type", "message"),
    [
        (gzip_bytes, OCI_GZIP, "gzip stream truncated"),
        (zstd_bytes, OCI_ZSTD, "zstd stream truncated"),
        (lambda b: b, OCI_TAR, "entry 'big': .*unexpected end of data"),
    ],
    ids=["gzip", "zstd", "tar"],
)
async def test_truncated_layer_fails_naming_the_layer_and_keeps_what_was_written(
    tmp_path: Path, compress: Callable[[bytes], bytes], media_type: str, message: str
) -> None:
    raw = tar_bytes([file("first", b"1"), file("big", os.urandom(400_000))])
    data = compress(raw)
    cut = data[: len(data) * 3 // 4]
    snap = make_snap(tmp_path, "bind")
    with pytest.raises(InvalidArgument, match=f"layer {sha256(cut)}: {message}"):
        await apply(snap, cut, media_type)
    assert (snap.root / "first").read_bytes() == b"1"  # left in the active snapshot, for the caller to remove


async def test_corrupt_streams_are_refused(tmp_path: Path) -> None:
    raw = tar_bytes([file("a", b"a" * 5000), file("b", b"b" * 5000)])
    bad_header = bytearray(raw)
    second = raw.index(b"b" * 10) - 512  # the header of "b"
    bad_header[second + 148 : second + 156] = b"0000000\0"  # wrong checksum
    gz = gzip_bytes(raw)
    mangled = gz[:20] + bytes(b ^ 0x55 for b in gz[20:60]) + gz[60:]
    cases = [
        (bytes(bad_header), OCI_TAR, "not a valid tar archive"),
        (mangled, OCI_GZIP, "corrupt gzip stream"),
        (gz + b"garbage", OCI_GZIP, "trailing data after the gzip stream"),
        (zstd_bytes(raw) + b"garbage", OCI_ZSTD, "zstd"),
    ]
    for i, (data, media_type, message) in enumerate(cases):
        snap = make_snap(tmp_path / str(i), "bind")
        with pytest.raises(InvalidArgument, match=f"layer {sha256(data)}: .*{message}"):
            await apply(snap, data, media_type)


async def test_unsupported_entry_type_is_refused(tmp_path: Path) -> None:
    raw = bytearray(tar_bytes([file("vol")]))
    hdr = raw.index(b"vol")
    raw[hdr + 156 : hdr + 157] = b"V"  # GNU volume header type
    chk = sum(raw[hdr : hdr + 148]) + 8 * 32 + sum(raw[hdr + 156 : hdr + 512])
    raw[hdr + 148 : hdr + 156] = b"%06o\0 " % chk
    snap = make_snap(tmp_path, "bind")
    with pytest.raises(InvalidArgument, match="entry 'vol': unsupported tar entry type b'V'"):
        await apply(snap, bytes(raw))


async def test_mounts_the_applier_cannot_use(tmp_path: Path) -> None:
    applier = TarApplier()
    desc = Descriptor(OCI_TAR, sha256(b""), 0)
    cases: list[tuple[list[Mount], type[Exception], str]] = [
        ([], InvalidArgument, "mounts: empty"),
        ([Mount("bind", str(tmp_path))] * 2, Unimplemented, "2 mounts"),
        ([Mount("erofs", "/dev/loop0")], Unimplemented, "mount type 'erofs'"),
        ([Mount("overlay", "overlay", options=(f"lowerdir={tmp_path}",))], FailedPrecondition, "upperdir"),
        ([Mount("bind", str(tmp_path), options=("rbind", "ro"))], FailedPrecondition, "read-only"),
        ([Mount("bind", "relative/dir")], InvalidArgument, "absolute"),
    ]
    for mounts, exc, message in cases:
        with pytest.raises(exc, match=message):
            await applier.apply(desc, mounts, BytesStream(b""))


# -- entries and metadata ----------------------------------------------------------


@FORMS
async def test_entries_keep_types_owners_modes_times_and_xattrs(tmp_path: Path, form: str) -> None:
    entries = [
        dir_("d", mode=0o750, uid=1000, gid=1000, mtime=MTIME + 10),
        file("d/f", b"hello", mode=0o640, uid=1000, gid=1001, mtime=MTIME + 20, xattrs={"user.k": b"v"}),
        file("d/bin", b"\xff", xattrs={"user.bin": b"\xff\x00\x01"}),
        file("d/suid", b"#!/bin/sh\n", mode=0o4755),
        file("d/sgid", b"", mode=0o2711, uid=1000),
        E("d/precise", data=b"x", pax={"mtime": "1600000000.123456789"}),
        E("d/sl", "symlink", link="f", uid=1000, gid=1000, mtime=MTIME + 40),
        hardlink("d/hl", "d/f"),
        E("d/null", "chr", major=1, minor=3, mode=0o666),
        E("d/loop", "blk", major=7, minor=0, mode=0o660, uid=1000),
        E("d/fifo", "fifo", mode=0o620),
        dir_("d/sub", mtime=MTIME + 30, xattrs={"user.dir": b"1"}),
        file("d/sub/x", b"x"),
        file("/abs/file", b"abs"),  # leading "/" stripped, as containerd does
    ]
    snap = make_snap(tmp_path, form)
    await apply(snap, tar_bytes(entries))
    r = snap.root
    st = os.lstat(r / "d")
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o750, 1000, 1000)
    assert st.st_mtime == MTIME + 10  # set after its entries were created
    st = os.lstat(r / "d/f")
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime) == (0o640, 1000, 1001, MTIME + 20)
    assert (r / "d/f").read_bytes() == b"hello"
    assert os.getxattr(r / "d/f", "user.k") == b"v"
    assert os.getxattr(r / "d/bin", "user.bin") == b"\xff\x00\x01"
    assert stat.S_IMODE(os.lstat(r / "d/suid").st_mode) == 0o4755
    st = os.lstat(r / "d/sgid")
    assert (stat.S_IMODE(st.st_mode), st.st_uid) == (0o2711, 1000)
    assert os.lstat(r / "d/precise").st_mtime_ns == 1_600_000_000_123_456_789
    st = os.lstat(r / "d/sl")
    assert stat.S_ISLNK(st.st_mode) and os.readlink(r / "d/sl") == "f"
    assert (st.st_uid, st.st_mtime) == (1000, MTIME + 40)
    f, hl = os.lstat(r / "d/f"), os.lstat(r / "d/hl")
    assert (hl.st_ino, hl.st_nlink) == (f.st_ino, 2)
    st = os.lstat(r / "d/null")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 3) and stat.S_IMODE(st.st_mode) == 0o666
    st = os.lstat(r / "d/loop")
    assert stat.S_ISBLK(st.st_mode) and st.st_rdev == os.makedev(7, 0) and st.st_uid == 1000
    st = os.lstat(r / "d/fifo")
    assert stat.S_ISFIFO(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o620
    assert os.lstat(r / "d/sub").st_mtime == MTIME + 30
    assert os.getxattr(r / "d/sub", "user.dir") == b"1"
    assert (r / "abs/file").read_bytes() == b"abs"


@FORMS
async def test_entries_replace_what_is_there(tmp_path: Path, form: str) -> None:
    below = [dir_("x"), file("x/old", b"old"), file("z", b"z"), symlink("s", "/etc")]
    snap = make_snap(tmp_path, form, below)
    entries = [
        file("x", b"file now"),  # a directory replaced by a file
        dir_("z"),  # a file replaced by a directory
        file("z/w", b"w"),
        file("s", b"not a link"),  # a symlink replaced, never followed
        file("dup", b"1"),
        file("dup", b"2"),  # the last one wins
    ]
    await apply(snap, tar_bytes(entries))
    r = snap.root
    assert (r / "x").read_bytes() == b"file now"
    assert (r / "z/w").read_bytes() == b"w"
    assert not (r / "s").is_symlink() and (r / "s").read_bytes() == b"not a link"
    assert (r / "dup").read_bytes() == b"2"


async def test_xattrs_of_overlay_itself_are_never_taken_from_a_layer(tmp_path: Path) -> None:
    snap = make_snap(tmp_path, "overlay", [dir_("t"), file("t/lower")])
    await apply(snap, tar_bytes([dir_("t", xattrs={OPAQUE: b"y", "trusted.overlay.redirect": b"/x"})]))
    assert os.listxattr(snap.root / "t") == []


@FORMS
async def test_parents_resolve_through_symlinks_inside_the_tree(tmp_path: Path, form: str) -> None:
    """``lib -> usr/lib`` (usrmerge) from a lower layer: ``lib/x`` lands in usr/lib, like containerd."""
    below = [
        dir_("usr"),
        dir_("usr/lib", mode=0o700),
        symlink("lib", "usr/lib"),
        symlink("lib64", "/usr/lib"),
    ]
    snap = make_snap(tmp_path, form, below)
    await apply(snap, tar_bytes([file("lib/libfoo.so", b"so"), file("lib64/ld.so", b"ld")]))
    r = snap.root
    assert (r / "usr/lib/libfoo.so").read_bytes() == b"so"
    assert (r / "usr/lib/ld.so").read_bytes() == b"ld"
    if form == "overlay":
        assert not os.path.lexists(r / "lib")  # the lower's symlink is not copied up
        assert stat.S_IMODE(os.lstat(r / "usr/lib").st_mode) == 0o700  # copied up from the lower


async def test_overlay_copies_up_parent_directories(tmp_path: Path) -> None:
    below = [
        file("etc/passwd", b"root"),
        dir_("etc", mode=0o751, uid=1000, gid=1002, mtime=MTIME + 5, xattrs={"user.c": b"1"}),
    ]
    snap = make_snap(tmp_path, "overlay", below)
    await apply(snap, tar_bytes([file("etc/new", b"n")]))
    st = os.lstat(snap.root / "etc")
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime) == (0o751, 1000, 1002, MTIME + 5)
    assert os.getxattr(snap.root / "etc", "user.c") == b"1"
    assert os.listdir(snap.root / "etc") == ["new"]  # no file copied up


# -- whiteouts --------------------------------------------------------------------

BELOW = [
    file("a", b"a"),
    dir_("d"),
    file("d/x"),
    dir_("o"),
    file("o/p"),
    dir_("o/sub"),
    file("o/sub/q"),
    file("keep"),
]
WHITEOUTS = [
    whiteout("a"),
    whiteout("d"),
    dir_("o"),
    file("o/early", b"e"),  # before the marker: kept (containerd's rule)
    opaque("o"),
    file("o/late", b"l"),
    whiteout("missingdir/x"),  # nothing there: no directory created for it
    dir_("r"),
    whiteout("r"),  # deleted, then
    dir_("r"),  # created again in the same layer
    file("r/new"),
]


async def test_whiteouts_delete_form(tmp_path: Path) -> None:
    snap = make_snap(tmp_path, "bind", [*BELOW, dir_("r"), file("r/old")])
    await apply(snap, tar_bytes(WHITEOUTS))
    r = snap.root
    assert sorted(os.listdir(r)) == ["keep", "o", "r"]
    assert sorted(os.listdir(r / "o")) == ["early", "late"]
    assert os.listdir(r / "r") == ["new"]


async def test_whiteouts_overlay_form_and_the_merged_view(tmp_path: Path) -> None:
    snap = make_snap(tmp_path, "overlay", [*BELOW, dir_("r"), file("r/old")])
    assert snap.lower is not None
    before = snapshot(str(snap.lower))
    await apply(snap, tar_bytes(WHITEOUTS))
    u = snap.root
    for name in ("a", "d"):
        st = os.lstat(u / name)
        assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0, name
    assert os.getxattr(u / "o", OPAQUE) == b"y"
    assert os.getxattr(u / "r", OPAQUE) == b"y"  # re-created after a whiteout: nothing below shows
    assert not os.path.lexists(u / "missingdir")
    assert not os.path.lexists(u / "keep")
    assert snapshot(str(snap.lower)) == before  # lower layers are never modified
    with overlay_mounted(snap, tmp_path / "merged") as merged:
        assert sorted(os.listdir(merged)) == ["keep", "o", "r"]
        assert sorted(os.listdir(merged / "o")) == ["early", "late"]
        assert os.listdir(merged / "r") == ["new"]
        assert (merged / "keep").read_bytes() == b""


@FORMS
async def test_bad_whiteout_names_are_refused(tmp_path: Path, form: str) -> None:
    snap = make_snap(tmp_path, form, [file("x")])
    for name in (".wh...", "d/.wh..", ".wh."):
        with pytest.raises(InvalidArgument, match="is not a name"):
            await apply(snap, tar_bytes([file(name)]))


# -- streaming ----------------------------------------------------------------------


async def test_big_layer_streams_with_bounded_memory_and_backpressure(tmp_path: Path) -> None:
    size = 64 << 20
    block = os.urandom(1 << 20)
    snap = make_snap(tmp_path, "bind")
    applier = TarApplier(chunk_size=64 * 1024, queue_bytes=1 << 20)
    target = snap.root / "big"
    ahead = 0

    class Watched(GenStream):
        async def read(self, n: int = -1) -> bytes:
            nonlocal ahead
            written = target.stat().st_size if target.exists() else 0
            ahead = max(ahead, self.given - written)
            return await super().read(n)

    stream = Watched(big_file_tar("big", size, block))
    tracemalloc.start()
    try:
        desc = await applier.apply(Descriptor(OCI_TAR, "sha256:big", 0), snap.mounts, stream)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert desc.size == stream.given
    assert target.stat().st_size == size
    # what was read but not yet on disk: the pipe (1 MiB) plus the parser's and the copy's buffers
    assert ahead < (1 << 20) + (3 << 20), ahead
    assert peak < 16 << 20, peak


async def test_decompression_runs_off_the_event_loop(tmp_path: Path) -> None:
    """64 MiB of zeros gzip to ~64 KiB: the loop reads that at once, the worker does the rest."""
    size = 64 << 20
    comp = zlib.compressobj(1, zlib.DEFLATED, 31)
    gz = b"".join([*(comp.compress(p) for p in big_file_tar("zeros", size, bytes(1 << 20))), comp.flush()])
    snap = make_snap(tmp_path, "bind")
    ticks = 0
    max_gap = 0.0
    running = True

    async def ticker() -> None:
        nonlocal ticks, max_gap
        last = time.monotonic()
        while running:
            await asyncio.sleep(0.002)
            now = time.monotonic()
            max_gap, last, ticks = max(max_gap, now - last), now, ticks + 1

    task = asyncio.create_task(ticker())
    started = time.monotonic()
    tracemalloc.start()
    try:
        desc = await apply(snap, gz, OCI_GZIP)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        running = False
        await task
    took = time.monotonic() - started
    assert desc.size > size and (snap.root / "zeros").stat().st_size == size
    assert ticks > 0
    assert max_gap < max(took / 2, 0.05), (max_gap, took)
    assert peak < 16 << 20, peak  # a decompression bomb does not blow memory up


class Blocking(BytesStream):
    """Gives ``data``, then fails or hangs instead of ending."""

    def __init__(self, data: bytes, fail: BaseException | None = None) -> None:
        super().__init__(data, chunk=4096)
        self.fail = fail
        self.blocked = asyncio.Event()

    async def read(self, n: int = -1) -> bytes:
        out = await super().read(n)
        if out:
            return out
        if self.fail is not None:
            raise self.fail
        self.blocked.set()
        await asyncio.Event().wait()
        raise AssertionError("unreachable")


@FORMS
async def test_stream_error_propagates_and_the_worker_stops(tmp_path: Path, form: str) -> None:
    raw = tar_bytes([file("a", b"a" * 100_000), file("b", b"b" * 100_000)])
    snap = make_snap(tmp_path, form)
    stream = Blocking(raw[:150_000], fail=ConnectionResetError("registry went away"))
    with pytest.raises(ConnectionResetError, match="registry went away"):
        await TarApplier().apply(Descriptor(OCI_TAR, sha256(raw), len(raw)), snap.mounts, stream)
    assert fds_under(snap.root) == []  # the worker closed the tree before apply returned


async def test_cancel_stops_the_worker_before_returning(tmp_path: Path) -> None:
    raw = tar_bytes([file("a", b"a" * 100_000), file("b", b"b" * 100_000)])
    snap = make_snap(tmp_path, "bind")
    stream = Blocking(raw[:150_000])
    task = asyncio.create_task(TarApplier().apply(Descriptor(OCI_TAR, "sha256:x", 0), snap.mounts, stream))
    await asyncio.wait_for(stream.blocked.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert fds_under(snap.root) == []
    for t in threading.enumerate():
        if t.name == "berth-diff-apply":  # settled its result last thing: ends right after
            t.join(5)
            assert not t.is_alive()


async def test_a_refused_entry_stops_reading_the_stream(tmp_path: Path) -> None:
    raw = tar_bytes([file("../escape", b"x"), file("big", b"\0" * (8 << 20))])
    snap = make_snap(tmp_path, "bind")
    stream = BytesStream(raw, chunk=64 * 1024)
    applier = TarApplier(chunk_size=64 * 1024, queue_bytes=256 * 1024)
    with pytest.raises(InvalidArgument, match=r"entry '\.\./escape': path leads outside"):
        await applier.apply(Descriptor(OCI_TAR, "sha256:x", 0), snap.mounts, stream)
    assert stream.given < 2 << 20  # the pump stopped soon after the worker failed


async def test_pipe_holds_at_most_its_limit_and_stops_both_ways() -> None:
    loop = asyncio.get_running_loop()
    pipe = Pipe(loop, limit=10)
    assert await pipe.put(b"0123456789")
    blocked = asyncio.create_task(pipe.put(b"abc"))  # full: waits for the reader
    await asyncio.sleep(0)
    assert not blocked.done()
    assert await asyncio.to_thread(pipe.read, 4) == b"0123"
    assert await asyncio.wait_for(blocked, 5)  # room again: the reader woke it
    assert pipe.high_water == 10
    assert await asyncio.to_thread(pipe.read, 100) == b"456789"
    pipe.close()
    assert await asyncio.to_thread(pipe.read, 100) == b"abc"
    assert await asyncio.to_thread(pipe.read, 100) == b""

    failed = Pipe(loop, limit=10)
    await failed.put(b"data")
    failed.close(failure="stream broke")
    with pytest.raises(SourceClosed, match="stream broke"):
        await asyncio.to_thread(failed.read, 100)  # even with data left: stop now

    gone = Pipe(loop, limit=4)
    await gone.put(b"1234")
    waiting = asyncio.create_task(gone.put(b"5678"))
    await asyncio.sleep(0)
    await asyncio.to_thread(gone.stop_reading)
    assert await asyncio.wait_for(waiting, 5) is False
    assert await gone.put(b"more") is False
