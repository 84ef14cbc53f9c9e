"""The snapshotter conformance suite: what every :class:`daemon.protocols.Snapshotter` must do.

It has every case of containerd's ``snapshots/testsuite`` (same names, in
snake case) and berth's own additions (error vocabulary, copy-on-write
isolation, usage, cleanup, reopen, concurrency, overlay whiteouts). Cases
do real mounts with :mod:`daemon.mount`, so the suite needs root.

Run it against a plugin, built through the plugin registry exactly as berthd
builds it::

    python -m daemon.testsuite snapshotter berth.snapshotter.v1.overlayfs

or from code with any *factory*: an ``async`` function that takes a fresh
root directory and returns a snapshotter, or an async context manager
yielding one (to clean up more than the snapshotter)::

    from daemon.testsuite import snapshotter as suite

    async def make(root: Path) -> Snapshotter:
        return await MySnapshotter.open(root)

    for name in suite.CASES:
        await suite.run_case(name, make, tmp_path / name)   # raises on failure

A failed case raises :class:`SuiteFailure` (an ``AssertionError``) saying
what differed; a case that does not apply raises :class:`CaseSkipped` with
the reason. Each case gets its own root, closes its snapshotter, and leaves
nothing mounted (it fails if it had to detach a leftover mount).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import os
import shutil
import stat
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

from daemon.errors import AlreadyExists, BerthError, FailedPrecondition, InvalidArgument, NotFound
from daemon.mount import mount_points_under, mounted, unmount_all
from daemon.protocols import Kind, Mount, SnapshotInfo, Snapshotter, Usage
from daemon.testsuite.runner import Result, run_cases

E = TypeVar("E", bound=BerthError)

#: ``async (root) -> Snapshotter`` or ``(root) -> async context manager of a Snapshotter``.
Factory = Callable[[Path], Awaitable[Snapshotter] | AbstractAsyncContextManager[Snapshotter]]

#: containerd's testsuite labels every snapshot so its GC keeps them; harmless elsewhere.
GC_ROOT = {"containerd.io/gc.root": "berth-testsuite"}


class SuiteFailure(AssertionError):
    """A conformance case found the snapshotter misbehaving."""


class CaseSkipped(Exception):
    """A case that does not apply to this snapshotter (the message says why)."""


# -- expectations -------------------------------------------------------------


def expect(condition: bool, message: str) -> None:
    if not condition:
        raise SuiteFailure(message)


def expect_equal(actual: object, expected: object, what: str) -> None:
    if actual != expected:
        raise SuiteFailure(f"{what}: got {actual!r}, expected {expected!r}")


async def expect_error(kind: type[E], awaitable: Awaitable[object], what: str) -> E:
    """The error ``awaitable`` raises, which must be a ``kind`` (from daemon.errors)."""
    try:
        await awaitable
    except kind as exc:
        return exc
    except Exception as exc:
        raise SuiteFailure(f"{what}: expected {kind.__name__}, got {type(exc).__name__}: {exc}") from exc
    raise SuiteFailure(f"{what}: expected {kind.__name__}, but it succeeded")


# -- filesystem trees: build them, compare them -----------------------------------

#: A change to a directory tree (sync; the suite runs it in a thread).
Applier = Callable[[Path], None]


def _at(root: Path, name: str) -> Path:
    return root / name.lstrip("/")


def create_file(name: str, content: bytes, mode: int) -> Applier:
    def apply(root: Path) -> None:
        path = _at(root, name)
        path.write_bytes(content)
        os.chmod(path, mode)

    return apply


def create_dir(name: str, mode: int) -> Applier:
    def apply(root: Path) -> None:
        path = _at(root, name)
        path.mkdir(parents=True, exist_ok=True)
        os.chmod(path, mode)

    return apply


def remove_all(name: str) -> Applier:
    def apply(root: Path) -> None:
        path = _at(root, name)
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)

    return apply


def chown(name: str, uid: int, gid: int) -> Applier:
    return lambda root: os.lchown(_at(root, name), uid, gid)


def link(old: str, new: str) -> Applier:
    return lambda root: os.link(_at(root, old), _at(root, new))


def symlink(target: str, name: str) -> Applier:
    return lambda root: os.symlink(target, _at(root, name))


def rename(old: str, new: str) -> Applier:
    return lambda root: os.rename(_at(root, old), _at(root, new))


def apply_all(*appliers: Applier) -> Applier:
    def apply(root: Path) -> None:
        for a in appliers:
            a(root)

    return apply


def tree(root: Path) -> dict[str, tuple[str, int, int, int, object]]:
    """Every entry below ``root``: path -> (type, permission bits, uid, gid, content).

    Content is a digest for files, the target for symlinks, the device
    number for devices. Times and directory sizes are not compared: they
    differ between any two correct snapshotters.
    """
    out: dict[str, tuple[str, int, int, int, object]] = {}
    stack = [root]
    while stack:
        current = stack.pop()
        for entry in os.scandir(current):
            st = entry.stat(follow_symlinks=False)
            rel = "/" + os.path.relpath(entry.path, root)
            content: object = None
            if stat.S_ISDIR(st.st_mode):
                kind = "dir"
                stack.append(Path(entry.path))
            elif stat.S_ISREG(st.st_mode):
                kind = "file"
                with open(entry.path, "rb") as f:
                    content = hashlib.sha256(f.read()).hexdigest()[:16]
            elif stat.S_ISLNK(st.st_mode):
                kind, content = "symlink", os.readlink(entry.path)
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                kind, content = "device", st.st_rdev
            else:
                kind = "other"
            out[rel] = (kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, content)
    return out


def differences(expected: Path, actual: Path) -> list[str]:
    want, got = tree(expected), tree(actual)
    diffs = [f"missing {p}" for p in sorted(want.keys() - got.keys())]
    diffs += [f"unexpected {p}" for p in sorted(got.keys() - want.keys())]
    for p in sorted(want.keys() & got.keys()):
        if want[p] != got[p]:
            shown = [(*x[:1], oct(x[1]), *x[2:]) for x in (got[p], want[p])]
            diffs.append(f"{p}: (type, mode, uid, gid, content) {shown[0]} != expected {shown[1]}")
    return diffs


async def check_equal(expected: Path, actual: Path, what: str) -> None:
    diffs = await asyncio.to_thread(differences, expected, actual)
    if diffs:
        shown = "; ".join(diffs[:8]) + (f"; ... {len(diffs) - 8} more" if len(diffs) > 8 else "")
        raise SuiteFailure(f"{what}: directory differs: {shown}")


# -- the environment of one case -----------------------------------------------


class Env:
    """What a case works with: the snapshotter, a scratch ``work`` directory, mounts."""

    def __init__(self, factory: Factory, root: Path, work: Path) -> None:
        self.factory = factory
        self.root = root
        self.work = work
        self._stack = AsyncExitStack()
        self._sn: Snapshotter | None = None
        self._chains = 0

    @property
    def sn(self) -> Snapshotter:
        if self._sn is None:
            raise SuiteFailure("the snapshotter is not open")
        return self._sn

    async def open(self) -> Snapshotter:
        result = self.factory(self.root)
        if isinstance(result, AbstractAsyncContextManager) or hasattr(result, "__aenter__"):
            sn = await self._stack.enter_async_context(result)  # type: ignore[arg-type]
        else:
            sn = await result
            self._stack.push_async_callback(sn.close)
        if not isinstance(sn, Snapshotter):
            raise SuiteFailure(f"the factory returned {type(sn).__name__}, not a Snapshotter")
        self._sn = sn
        return sn

    async def close(self) -> None:
        self._sn = None
        await self._stack.aclose()
        self._stack = AsyncExitStack()

    async def reopen(self) -> Snapshotter:
        """Close the snapshotter and build a new one on the same root (a daemon restart)."""
        await self.close()
        return await self.open()

    def mounted(self, mounts: Sequence[Mount]) -> AbstractAsyncContextManager[Path]:
        """The mounts on a temporary directory under ``work``, unmounted and removed afterwards."""
        return mounted(mounts, dir=self.work)

    async def apply(self, mounts: Sequence[Mount], applier: Applier) -> None:
        async with self.mounted(mounts) as target:
            await asyncio.to_thread(applier, target)

    async def check_mounts(self, mounts: Sequence[Mount], expected: Path, what: str) -> None:
        async with self.mounted(mounts) as target:
            await check_equal(expected, target, what)

    def flat(self, name: str) -> Path:
        """A plain directory under ``work`` to apply the same changes to, for comparison."""
        path = self.work / f"flat-{name}"
        path.mkdir(mode=0o755)
        return path

    async def walk(self, *filters: str) -> list[SnapshotInfo]:
        return [info async for info in self.sn.walk(list(filters))]

    async def create(self, parent: str, applier: Applier, name: str) -> str:
        """containerd's createSnapshot: prepare on ``parent``, apply, commit as ``name``."""
        prepare = f"{name}-prepare"
        mounts = await self.sn.prepare(prepare, parent, labels=GC_ROOT)
        await self.apply(mounts, applier)
        await self.sn.commit(name, prepare, labels=GC_ROOT)
        return name

    async def check_snapshot(self, name: str, expected: Path) -> None:
        """containerd's checkSnapshot: a view of ``name`` looks exactly like ``expected``."""
        view = f"{name}-view"
        mounts = await self.sn.view(view, name, labels=GC_ROOT)
        try:
            await self.check_mounts(mounts, expected, f"view of {name}")
        finally:
            await self.sn.remove(view)

    async def check_snapshots(self, *appliers: Applier) -> list[str]:
        """containerd's checkSnapshots: a chain, each layer checked against a flat directory."""
        self._chains += 1
        flat = self.flat(f"chain-{self._chains}")
        parent = ""
        names = []
        for i, applier in enumerate(appliers, 1):
            name = await self.create(parent, applier, f"{flat.name}-layer-{i}")
            await asyncio.to_thread(applier, flat)
            await self.check_snapshot(name, flat)
            names.append(name)
            parent = name
        return names


CaseFunc = Callable[[Env], Awaitable[None]]


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    func: CaseFunc
    doc: str


#: Every case, by name, in the order they run.
CASES: dict[str, Case] = {}


def case(func: CaseFunc) -> CaseFunc:
    name = func.__name__.removeprefix("case_")
    CASES[name] = Case(name, func, (func.__doc__ or "").strip().splitlines()[0])
    return func


async def run_case(name: str, factory: Factory, base: Path) -> None:
    """Run case ``name`` with a snapshotter built by ``factory`` on ``base/root``.

    ``base`` must not exist or be empty; it is left in place (the caller
    owns it) but nothing under it stays mounted.
    """
    try:
        entry = CASES[name]
    except KeyError:
        raise KeyError(f"no snapshotter conformance case {name!r}; cases: {', '.join(CASES)}") from None
    root, work = base / "root", base / "work"
    for d in (root, work):
        d.mkdir(parents=True, exist_ok=True)
    env = Env(factory, root, work)
    try:
        await env.open()
        await entry.func(env)
    finally:
        try:
            await env.close()
        finally:
            leftover = mount_points_under(base)
            for point in reversed(leftover):
                with contextlib.suppress(Exception):
                    await unmount_all(point, detach=True)
    if leftover:
        raise SuiteFailure(f"case {name} left mounts behind (detached now): {leftover}")


async def run_suite(
    factory: Factory,
    base: Path,
    *,
    names: Sequence[str] = (),
    report: Callable[[Result], None] | None = None,
) -> list[Result]:
    """Run the cases ``names`` (all by default), each in ``base/<name>``; never raises for a case."""
    return await run_cases(
        run_case, names or list(CASES), factory, base, skipped=(CaseSkipped,), report=report
    )


# -- helpers of the cases ---------------------------------------------------------


def _is_overlay(mounts: Sequence[Mount]) -> bool:
    return any(m.type == "overlay" for m in mounts)


def _option(mounts: Sequence[Mount], name: str) -> str:
    for m in mounts:
        for option in m.options:
            if option.startswith(name + "="):
                return option[len(name) + 1 :]
    return ""


def _now() -> datetime:
    return datetime.now(UTC)


async def _make_chain(env: Env, prefix: str) -> None:
    """containerd's baseTestSnapshots: c1 <- c2 committed, a1 on c2, a2 alone, v1 on c2, v2 alone."""
    sn = env.sn
    await sn.prepare(f"{prefix}c1-a", "", GC_ROOT)
    await sn.commit(f"{prefix}c1", f"{prefix}c1-a", GC_ROOT)
    await sn.prepare(f"{prefix}c2-a", f"{prefix}c1", GC_ROOT)
    await sn.commit(f"{prefix}c2", f"{prefix}c2-a", GC_ROOT)
    await sn.prepare(f"{prefix}a1", f"{prefix}c2", GC_ROOT)
    await sn.prepare(f"{prefix}a2", "", GC_ROOT)
    await sn.view(f"{prefix}v1", f"{prefix}c2", GC_ROOT)
    await sn.view(f"{prefix}v2", "", GC_ROOT)


async def _du(path: Path) -> int:
    def run() -> int:
        total = 0
        for dirpath, dirnames, filenames in os.walk(path):
            for n in dirnames + filenames:
                with contextlib.suppress(FileNotFoundError):
                    total += os.lstat(os.path.join(dirpath, n)).st_blocks * 512
        return total

    return await asyncio.to_thread(run)


# -- containerd's cases -------------------------------------------------------------


@case
async def case_basic(env: Env) -> None:
    """Prepare, write, commit, prepare on it, commit again, view the chain, remove in order."""
    sn = env.sn
    initial = apply_all(
        create_file("/foo", b"foo\n", 0o777),
        create_dir("/a", 0o755),
        create_dir("/a/b", 0o755),
        create_dir("/a/b/c", 0o755),
    )
    diff = apply_all(
        create_file("/bar", b"bar\n", 0o777),
        create_file("/foo", b"bar\n", 0o777),
        remove_all("/a/b"),
    )
    preparing = str(env.work / "preparing")
    mounts = await sn.prepare(preparing, "", GC_ROOT)
    expect(len(mounts) >= 1, "prepare returned no mounts")
    await env.apply(mounts, initial)
    committed = str(env.work / "committed")
    await sn.commit(committed, preparing, GC_ROOT)
    si = await sn.stat(committed)
    expect_equal(si.parent, "", "parent of the first committed layer")
    expect_equal(si.kind, Kind.COMMITTED, "kind after commit")
    await expect_error(NotFound, sn.stat(preparing), "stat of the active key after commit")

    nxt = str(env.work / "nextlayer")
    mounts = await sn.prepare(nxt, committed, GC_ROOT)
    flat = env.flat("basic")
    await asyncio.to_thread(initial, flat)
    await env.check_mounts(mounts, flat, "new layer on the committed one")
    await env.apply(mounts, diff)
    ni = await sn.stat(nxt)
    expect_equal(ni.parent, committed, "parent of the second layer")
    expect_equal(ni.kind, Kind.ACTIVE, "kind of a prepared snapshot")

    next_committed = str(env.work / "committed-next")
    await sn.commit(next_committed, nxt, GC_ROOT)
    si2 = await sn.stat(next_committed)
    expect_equal(si2.parent, committed, "parent of the second committed layer")
    expect_equal(si2.kind, Kind.COMMITTED, "kind of the second committed layer")
    await expect_error(NotFound, sn.stat(nxt), "stat of the second active key after commit")

    walked = {info.name: info for info in await env.walk()}
    for expected in (si, si2):
        expect_equal(walked.get(expected.name), expected, f"walk's info of {expected.name}")

    nextnext = str(env.work / "nextnextlayer")
    mounts = await sn.view(nextnext, next_committed, GC_ROOT)
    await asyncio.to_thread(diff, flat)
    await env.check_mounts(mounts, flat, "view of the two-layer chain")
    await sn.remove(nextnext)

    err = await expect_error(FailedPrecondition, sn.remove(committed), "removing a parent")
    expect("remove" in str(err), f"the error of removing a parent should say 'remove': {err}")
    await sn.remove(next_committed)
    await sn.remove(committed)


@case
async def case_stat_active(env: Env) -> None:
    """Stat of a prepared (and written) snapshot says ACTIVE, no parent, its key as name."""
    preparing = str(env.work / "preparing")
    mounts = await env.sn.prepare(preparing, "", GC_ROOT)
    expect(len(mounts) >= 1, "prepare returned no mounts")
    await env.apply(mounts, create_file("/foo", b"foo\n", 0o777))
    si = await env.sn.stat(preparing)
    expect_equal(si.name, preparing, "name")
    expect_equal(si.kind, Kind.ACTIVE, "kind")
    expect_equal(si.parent, "", "parent")


@case
async def case_stat_committed(env: Env) -> None:
    """Stat of a committed snapshot says COMMITTED, no parent, the commit name."""
    preparing = str(env.work / "preparing")
    mounts = await env.sn.prepare(preparing, "", GC_ROOT)
    await env.apply(mounts, create_file("/foo", b"foo\n", 0o777))
    committed = str(env.work / "committed")
    await env.sn.commit(committed, preparing, GC_ROOT)
    si = await env.sn.stat(committed)
    expect_equal(si.name, committed, "name")
    expect_equal(si.kind, Kind.COMMITTED, "kind")
    expect_equal(si.parent, "", "parent")


@case
async def case_transitivity(env: Env) -> None:
    """A <- B: B's parent is A, and the parent of B's parent has none."""
    sn = env.sn
    snap_a = await env.create("", create_file("/foo", b"foo\n", 0o777), str(env.work / "snapA"))
    snap_b = await env.create(snap_a, create_file("/foo", b"foo bar\n", 0o777), str(env.work / "snapB"))
    si_a, si_b = await sn.stat(snap_a), await sn.stat(snap_b)
    si_parent_b = await sn.stat(si_b.parent)
    expect_equal(si_a.parent, "", "parent of A")
    expect_equal(si_b.parent, snap_a, "parent of B")
    expect_equal(si_parent_b.parent, "", "parent of B's parent")


@case
async def case_prepare_view_same_key(env: Env) -> None:
    """A key is taken once: prepare then view, prepare twice, view twice all fail with AlreadyExists."""
    sn = env.sn
    snap_a = await env.create("", create_dir("/d", 0o755), str(env.work / "snapA"))
    new_layer = str(env.work / "newlayer")
    await sn.prepare(new_layer, snap_a, GC_ROOT)
    await expect_error(AlreadyExists, sn.view(new_layer, snap_a, GC_ROOT), "view with a prepared key")
    prep = str(env.work / "prepLayer")
    await sn.prepare(prep, snap_a, GC_ROOT)
    await expect_error(AlreadyExists, sn.prepare(prep, snap_a, GC_ROOT), "prepare twice")
    view = str(env.work / "viewLayer")
    await sn.view(view, snap_a, GC_ROOT)
    await expect_error(AlreadyExists, sn.view(view, snap_a, GC_ROOT), "view twice")


@case
async def case_update(env: Env) -> None:
    """Update changes labels only (all, or labels.<k>), bumps updated_at, refuses other fields."""
    sn = env.sn
    t1 = _now()
    await _make_chain(env, "")
    t2 = _now()
    cases = [
        ("c1", Kind.COMMITTED, ""),
        ("c2", Kind.COMMITTED, "c1"),
        ("a1", Kind.ACTIVE, "c2"),
        ("a2", Kind.ACTIVE, ""),
        ("v1", Kind.VIEW, "c2"),
        ("v2", Kind.VIEW, ""),
    ]
    for name, kind, parent in cases:
        st = await sn.stat(name)
        expect(st.created_at is not None and st.updated_at is not None, f"{name}: times must be set")
        assert st.created_at is not None and st.updated_at is not None
        expect(t1 <= st.created_at <= t2, f"{name}: created {st.created_at} not between {t1} and {t2}")
        expect_equal(st.updated_at, st.created_at, f"{name}: updated time of a new snapshot")
        expect_equal((st.kind, st.parent, st.name), (kind, parent, name), f"{name}: (kind, parent, name)")
        created = st.created_at
        root_time = _now().isoformat()
        expected = {"l1": "v1", "l2": "v2", "l3": "v3", "containerd.io/gc.root": root_time}
        st.parent = "doesnotexist"
        st.labels = dict(expected)
        u1 = _now()
        st = await sn.update(st)
        u2 = _now()
        expect_equal(st.created_at, created, f"{name}: created time after update")
        assert st.updated_at is not None
        expect(u1 <= st.updated_at <= u2, f"{name}: updated {st.updated_at} not between {u1} and {u2}")
        expect_equal((st.kind, st.parent, st.name), (kind, parent, name), f"{name}: (kind, parent, name)")
        expect_equal(st.labels, expected, f"{name}: labels after a full update")

        st.labels = {"l1": "updated", "l4": "v4"}
        st = await sn.update(st, ["labels.l1", "labels.l2"])
        expected = {"l1": "updated", "l3": "v3", "containerd.io/gc.root": root_time}
        expect_equal(st.labels, expected, f"{name}: labels after updating labels.l1 and labels.l2")

        expected = {"l4": "v4", "containerd.io/gc.root": root_time}
        st.labels = dict(expected)
        st = await sn.update(st, ["labels"])
        expect_equal(st.labels, expected, f"{name}: labels after updating 'labels'")
        expect_equal((await sn.stat(name)).labels, expected, f"{name}: labels as stat sees them")

        st.parent = "doesnotexist"
        await expect_error(InvalidArgument, sn.update(st, ["parent"]), f"{name}: updating the parent")


@case
async def case_remove(env: Env) -> None:
    """Keys are reusable once removed, across kinds, and a removed parent frees its commit name."""
    sn = env.sn
    await sn.prepare("committed-a", "", GC_ROOT)
    await sn.commit("committed-1", "committed-a", GC_ROOT)
    await sn.prepare("reuse-1", "committed-1", GC_ROOT)
    await sn.remove("reuse-1")
    await sn.view("reuse-1", "committed-1", GC_ROOT)
    await sn.remove("reuse-1")
    await sn.prepare("reuse-1", "", GC_ROOT)
    await sn.remove("committed-1")
    await sn.commit("committed-1", "reuse-1", GC_ROOT)


@case
async def case_walk(env: Env) -> None:
    """Walk with containerd's filters: kind, name, parent, labels (presence and value), OR of strings."""
    sn = env.sn
    root = {"containerd.io/gc.root": "check-walk"}
    await sn.prepare("a-np", "", root)
    await sn.prepare("p-tmp", "", root)
    await sn.commit("p", "p-tmp", root)
    await sn.prepare("a", "p", root)
    await sn.view("v", "p", root)
    await sn.prepare("p-wl-tmp", "", root)
    await sn.commit("p-wl", "p-wl-tmp", {"l": "1", **root})
    await sn.prepare("a-wl", "p-wl", {"l": "2", **root})
    await sn.view("v-wl", "p-wl", {"l": "3", **root})
    await sn.prepare("a-np-wl", "", {"l": "2", **root})
    gc = 'labels."containerd.io/gc.root"==check-walk'
    table: list[tuple[list[str], list[str]]] = [
        (["a-np", "p", "a", "v", "p-wl", "a-wl", "v-wl", "a-np-wl"], [gc]),
        (["a-np", "a", "a-wl", "a-np-wl"], [f"kind==active,{gc}"]),
        (["v", "v-wl"], [f"kind==view,{gc}"]),
        (["p", "p-wl"], [f"kind==committed,{gc}"]),
        (["p", "a-np-wl"], ["name==p", "name==a-np-wl"]),
        (["a-wl"], ["name==a-wl,labels.l"]),
        (["a", "v"], ["parent==p"]),
        (["a", "v", "a-wl", "v-wl"], [f'parent!="",{gc}']),
        (["p-wl", "a-wl", "v-wl", "a-np-wl"], ["labels.l"]),
        (["a-wl", "a-np-wl"], ["labels.l==2"]),
    ]
    for matches, flt in table:
        names = sorted(info.name for info in await env.walk(*flt))
        expect_equal(names, sorted(matches), f"walk {flt}")
    await expect_error(InvalidArgument, env.walk("labels.=="), "walk with a malformed filter")


@case
async def case_layer_file_update(env: Env) -> None:
    """A file updated in an upper layer shows its new content and mode (docker#21555)."""
    l1 = apply_all(
        create_dir("/etc", 0o700),
        create_file("/etc/hosts", b"mydomain 10.0.0.1", 0o644),
        create_file("/etc/profile", b"PATH=/usr/bin", 0o644),
    )
    l2 = apply_all(
        create_file("/etc/hosts", b"mydomain 10.0.0.2", 0o644),
        create_file("/etc/profile", b"PATH=/usr/bin", 0o666),
        create_dir("/root", 0o700),
        create_file("/root/.bashrc", b"PATH=/usr/sbin:/usr/bin", 0o644),
    )
    for _ in range(3):  # containerd repeats it: the original bug was sporadic
        await env.check_snapshots(l1, l2)


@case
async def case_remove_directory_in_lower_layer(env: Env) -> None:
    """A directory removed and re-created above hides the lower one's files (docker#25244)."""
    await env.check_snapshots(
        apply_all(create_dir("/lib", 0o700), create_file("/lib/hidden", b"", 0o644)),
        apply_all(remove_all("/lib"), create_dir("/lib", 0o700), create_file("/lib/not-hidden", b"", 0o644)),
        create_file("/lib/newfile", b"", 0o644),
    )


@case
async def case_chown(env: Env) -> None:
    """Ownership changed in an upper layer shows through (docker#20240, #24913, #28391)."""
    await env.check_snapshots(
        apply_all(
            create_dir("/opt", 0o700),
            create_dir("/opt/a", 0o700),
            create_dir("/opt/a/b", 0o700),
            create_file("/opt/a/b/file.txt", b"hello", 0o644),
        ),
        apply_all(
            chown("/opt", 1, 1),
            chown("/opt/a", 1, 1),
            chown("/opt/a/b", 1, 1),
            chown("/opt/a/b/file.txt", 1, 1),
        ),
    )


@case
async def case_directory_permission_on_commit(env: Env) -> None:
    """Directory owners survive commits, removals and re-creation (docker#27298)."""
    await env.check_snapshots(
        apply_all(
            create_dir("/dir1", 0o700),
            create_dir("/dir2", 0o700),
            create_dir("/dir3", 0o700),
            create_dir("/dir4", 0o700),
            create_file("/dir4/f1", b"...", 0o644),
            create_dir("/dir5", 0o700),
            create_file("/dir5/f1", b"...", 0o644),
            chown("/dir1", 1, 1),
            chown("/dir2", 1, 1),
            chown("/dir3", 1, 1),
            chown("/dir5", 1, 1),
            chown("/dir5/f1", 1, 1),
        ),
        apply_all(
            chown("/dir2", 0, 0),
            remove_all("/dir3"),
            chown("/dir4", 1, 1),
            chown("/dir4/f1", 1, 1),
        ),
        apply_all(
            create_dir("/dir3", 0o700),
            chown("/dir3", 1, 1),
            remove_all("/dir5"),
            create_dir("/dir5", 0o700),
            chown("/dir5", 1, 1),
        ),
    )


@case
async def case_remove_intermediate_snapshot(env: Env) -> None:
    """A snapshot with children cannot be removed (FailedPrecondition); top-down removal works."""
    sn = env.sn
    base = str(env.work / "base")
    await sn.prepare(base, "", GC_ROOT)
    committed_base = str(env.work / "committed-base")
    await sn.commit(committed_base, base, GC_ROOT)
    intermediate = str(env.work / "intermediate")
    await sn.prepare(intermediate, committed_base, GC_ROOT)
    committed_inter = str(env.work / "committed-inter")
    await sn.commit(committed_inter, intermediate, GC_ROOT)
    top = str(env.work / "toplayer")
    await sn.prepare(top, committed_inter, GC_ROOT)
    await expect_error(FailedPrecondition, sn.remove(committed_inter), "removing the intermediate layer")
    await expect_error(FailedPrecondition, sn.remove(committed_base), "removing the base layer")
    await sn.remove(top)
    await sn.remove(committed_inter)
    await sn.remove(committed_base)


@case
async def case_deleted_files_in_child_snapshot(env: Env) -> None:
    """A file deleted in a child stays deleted in the child's children."""
    await env.check_snapshots(
        apply_all(create_file("/foo", b"foo\n", 0o777), create_file("/foobar", b"foobar\n", 0o777)),
        remove_all("/foobar"),
        apply_all(),
    )


@case
async def case_move_file_from_lower_layer(env: Env) -> None:
    """Files moved (hard link + remove) out of a lower directory, which is then removed."""
    await env.check_snapshots(
        apply_all(
            create_dir("/dir1", 0o700),
            create_file("/dir1/f1", b"Hello", 0o644),
            create_dir("dir2", 0o700),
            create_file("dir2/f2", b"...", 0o644),
        ),
        apply_all(
            create_dir("/dir3", 0o700),
            create_file("/dir3/f1", b"Hello", 0o644),
            remove_all("/dir1"),
            link("dir2/f2", "dir3/f2"),
            remove_all("dir2/f2"),
        ),
    )


@case
async def case_view_readonly(env: Env) -> None:
    """The mounts of a view are read-only for real: a write through them fails."""
    sn = env.sn
    preparing = str(env.work / "preparing")
    await sn.prepare(preparing, "", GC_ROOT)
    committed = str(env.work / "committed")
    await sn.commit(committed, preparing, GC_ROOT)
    view = str(env.work / "view")
    mounts = await sn.view(view, committed, GC_ROOT)
    async with env.mounted(mounts) as target:
        try:
            await asyncio.to_thread((target / "testfile").write_bytes, b"testcontent")
        except OSError:
            pass  # EROFS expected, any refusal will do
        else:
            raise SuiteFailure("writing into a view's mounts succeeded; views must be read-only")
    await sn.remove(view)
    await sn.remove(committed)


@case
async def case_stat_in_walk(env: Env) -> None:
    """Stat may be called while a walk is being iterated, and agrees with it."""
    prefix = "stats-in-walk-"
    await _make_chain(env, prefix)
    seen = 0
    async for info in env.sn.walk():
        if not info.name.startswith(prefix):
            continue
        expect_equal(await env.sn.stat(info.name), info, f"stat of {info.name} during walk")
        seen += 1
    expect_equal(seen, 6, "snapshots walked")


@case
async def case_close_twice(env: Env) -> None:
    """close is idempotent."""
    sn = env.sn
    await sn.prepare("close-twice-prepare", "", GC_ROOT)
    await sn.commit("close-twice", "close-twice-prepare", GC_ROOT)
    await sn.remove("close-twice")
    await sn.close()
    await sn.close()


@case
async def case_root_permission(env: Env) -> None:
    """The root of a new snapshot is a directory with mode 0755."""
    mounts = await env.sn.prepare(str(env.work / "preparing"), "", GC_ROOT)
    async with env.mounted(mounts) as target:
        mode = stat.S_IMODE((await asyncio.to_thread(os.stat, target)).st_mode)
    expect_equal(oct(mode), oct(0o755), "mode of a new snapshot's root")


@case
async def case_rename(env: Env) -> None:
    """Renames in an upper layer (docker#25409); a lower directory's rename is left out on overlay.

    Overlay without ``redirect_dir`` refuses to rename a directory that comes
    from a lower layer (EXDEV; tools copy instead), as containerd's suite
    notes, so that one step only runs for snapshotters whose mounts are not
    overlay.
    """
    l1 = apply_all(
        create_dir("/dir1", 0o700),
        create_dir("/somefiles", 0o700),
        create_file("/somefiles/f1", b"was here first!", 0o644),
        create_file("/somefiles/f2", b"nothing interesting", 0o644),
    )
    probe = await env.sn.prepare("rename-probe", "", GC_ROOT)
    await env.sn.commit("rename-probe-base", "rename-probe", GC_ROOT)
    child = await env.sn.prepare("rename-probe-child", "rename-probe-base", GC_ROOT)
    steps: list[Applier] = [] if _is_overlay(probe) or _is_overlay(child) else [rename("/dir1", "/dir2")]
    steps += [
        create_file("/somefiles/f1-overwrite", b"new content 1", 0o644),
        rename("/somefiles/f1-overwrite", "/somefiles/f1"),
        rename("/somefiles/f2", "/somefiles/f3"),
    ]
    await env.check_snapshots(l1, apply_all(*steps))


@case
async def case_layers_128_mount(env: Env) -> None:
    """A chain of 128 layers mounts, and each step looks exactly like the same changes made flat."""
    sn = env.sn
    appliers = [
        apply_all(
            create_file("/bottom", b"way at the bottom\n", 0o777),
            create_file("/overwriteme", b"FIRST!\n", 0o777),
            create_dir("/addhere", 0o755),
            create_dir("/onlyme", 0o755),
            create_file("/onlyme/bottom", b"bye!\n", 0o777),
        )
    ]
    for i in range(1, 128):
        appliers.append(
            apply_all(
                create_file("/overwriteme", f"{i} WAS HERE!\n".encode(), 0o777),
                create_file(f"/addhere/file-{i}", b"same\n", 0o755),
                remove_all("/onlyme"),
                create_dir("/onlyme", 0o755),
                create_file(f"/onlyme/file-{i}", b"only me!\n", 0o777),
            )
        )
    flat = env.flat("128")
    parent = ""
    for i, applier in enumerate(appliers):
        preparing = f"prepare-layer-{i}"
        mounts = await sn.prepare(preparing, parent, GC_ROOT)
        async with env.mounted(mounts) as target:
            await check_equal(flat, target, f"layer {i} before applying")
            await asyncio.to_thread(applier, flat)
            await asyncio.to_thread(applier, target)
            await check_equal(flat, target, f"layer {i} after applying")
        parent = f"committed-{i}"
        await sn.commit(parent, preparing, GC_ROOT)
    mounts = await sn.view("fullview", parent, GC_ROOT)
    await env.check_mounts(mounts, flat, "view of the 128-layer chain")


# -- berth's additions ---------------------------------------------------------------


@case
async def case_error_vocabulary(env: Env) -> None:
    """Each misuse raises its error of daemon.errors (NotFound, AlreadyExists, FailedPrecondition ...)."""
    sn = env.sn
    await expect_error(NotFound, sn.stat("missing"), "stat of a missing key")
    await expect_error(NotFound, sn.mounts("missing"), "mounts of a missing key")
    await expect_error(NotFound, sn.usage("missing"), "usage of a missing key")
    await expect_error(NotFound, sn.remove("missing"), "remove of a missing key")
    await expect_error(NotFound, sn.commit("x", "missing"), "commit of a missing key")
    await expect_error(NotFound, sn.prepare("orphan", "missing-parent"), "prepare on a missing parent")
    await expect_error(NotFound, sn.view("orphan-view", "missing-parent"), "view on a missing parent")
    await expect_error(
        NotFound,
        sn.update(SnapshotInfo(kind=Kind.ACTIVE, name="missing", labels={"a": "b"})),
        "update missing",
    )
    await sn.prepare("active", "")
    await sn.view("a-view", "")
    await expect_error(FailedPrecondition, sn.prepare("child", "active"), "prepare on an active parent")
    await expect_error(FailedPrecondition, sn.view("child-view", "a-view"), "view on a view parent")
    await expect_error(FailedPrecondition, sn.commit("from-view", "a-view"), "commit of a view")
    await expect_error(AlreadyExists, sn.prepare("active", ""), "prepare of an existing key")
    await sn.prepare("other", "")
    await sn.commit("done", "other")
    await expect_error(AlreadyExists, sn.commit("done", "active"), "commit to an existing name")
    await expect_error(AlreadyExists, sn.prepare("done", ""), "prepare with a committed name")
    await expect_error(FailedPrecondition, sn.mounts("done"), "mounts of a committed snapshot")
    await expect_error(FailedPrecondition, sn.commit("done-again", "done"), "commit of a committed snapshot")
    await sn.prepare("on-done", "done")
    await expect_error(FailedPrecondition, sn.remove("done"), "remove of a parent")
    expect_equal((await sn.stat("active")).kind, Kind.ACTIVE, "the active snapshot after failed commits")
    await expect_error(InvalidArgument, sn.prepare("", ""), "prepare with an empty key")
    await expect_error(
        InvalidArgument, sn.prepare("big-label", "", {"k": "v" * 5000}), "a label over 4096 bytes"
    )
    await expect_error(NotFound, sn.stat("big-label"), "a refused prepare leaves no snapshot")


@case
async def case_commit_then_prepare_same_key(env: Env) -> None:
    """After commit the active key is free again: a new prepare with it starts from its own parent."""
    sn = env.sn
    mounts = await sn.prepare("work-key", "", GC_ROOT)
    await env.apply(mounts, create_file("/first", b"1", 0o644))
    await sn.commit("layer-1", "work-key", GC_ROOT)
    mounts = await sn.prepare("work-key", "layer-1", GC_ROOT)
    expect_equal((await sn.stat("work-key")).parent, "layer-1", "parent of the re-prepared key")
    await env.apply(mounts, create_file("/second", b"2", 0o644))
    await sn.commit("layer-2", "work-key", GC_ROOT)
    flat = env.flat("reuse")
    await asyncio.to_thread(
        apply_all(create_file("/first", b"1", 0o644), create_file("/second", b"2", 0o644)), flat
    )
    await env.check_snapshot("layer-2", flat)


@case
async def case_mounts_again(env: Env) -> None:
    """mounts() of an active or view key gives its mounts again; what was written stays."""
    sn = env.sn
    first = await sn.prepare("again", "", GC_ROOT)
    expect_equal(await sn.mounts("again"), first, "mounts() of a prepared key")
    await env.apply(first, create_file("/kept", b"kept", 0o600))
    flat = env.flat("again")
    await asyncio.to_thread(create_file("/kept", b"kept", 0o600), flat)
    await env.check_mounts(await sn.mounts("again"), flat, "remount of the active snapshot")
    await sn.commit("again-c", "again", GC_ROOT)
    view = await sn.view("again-v", "again-c", GC_ROOT)
    expect_equal(await sn.mounts("again-v"), view, "mounts() of a view key")
    await env.check_mounts(view, flat, "view of the committed snapshot")


@case
async def case_copy_on_write_isolation(env: Env) -> None:
    """Writing in a child (in place, truncating, chmod, unlink) never changes its parent or a sibling."""
    sn = env.sn
    base = apply_all(
        create_file("/data", b"parent data\n", 0o644),
        create_file("/hard1", b"linked\n", 0o644),
        link("/hard1", "/hard2"),
        create_dir("/dir", 0o755),
        create_file("/dir/file", b"in dir\n", 0o600),
        symlink("data", "/sym"),
    )
    parent = await env.create("", base, "cow-parent")

    def scribble(root: Path) -> None:
        with open(root / "data", "r+b") as f:  # in place: the write a hard-linked copy would leak
            f.write(b"CHILD")
        (root / "dir" / "file").write_bytes(b"")
        os.chmod(root / "dir", 0o700)
        os.unlink(root / "sym")
        (root / "new").write_bytes(b"new\n")

    child = await sn.prepare("cow-child", parent, GC_ROOT)
    sibling = await sn.prepare("cow-sibling", parent, GC_ROOT)
    await env.apply(child, scribble)
    flat = env.flat("cow")
    await asyncio.to_thread(base, flat)
    await env.check_snapshot(parent, flat)
    await env.check_mounts(sibling, flat, "a sibling of the written child")
    scribbled = env.flat("cow-scribbled")
    await asyncio.to_thread(apply_all(base, scribble), scribbled)
    await env.check_mounts(child, scribbled, "the written child")


@case
async def case_usage(env: Env) -> None:
    """Usage counts what a snapshot holds: measured for active ones, recorded at commit."""
    sn = env.sn
    mounts = await sn.prepare("usage-a", "", GC_ROOT)
    empty = await sn.usage("usage-a")
    mib = 1 << 20
    await env.apply(
        mounts, apply_all(create_dir("/d", 0o755), create_file("/d/blob", os.urandom(mib), 0o644))
    )
    grown = await sn.usage("usage-a")
    expect(grown.size - empty.size >= mib, f"usage grew by {grown.size - empty.size} bytes, wrote {mib}")
    expect(grown.inodes - empty.inodes >= 2, f"usage grew by {grown.inodes - empty.inodes} inodes, made 2")
    await sn.commit("usage-c", "usage-a", GC_ROOT)
    committed = await sn.usage("usage-c")
    expect_equal(committed, grown, "usage recorded at commit")
    child = await sn.prepare("usage-child", "usage-c", GC_ROOT)
    await env.apply(child, create_file("/small", b"x" * 10, 0o644))
    child_usage = await sn.usage("usage-child")
    expect(isinstance(child_usage, Usage), "usage returns a Usage")
    expect(child_usage.inodes >= 1, f"usage of a child with one new file: {child_usage}")


@case
async def case_labels(env: Env) -> None:
    """Labels given to prepare and commit are kept; the committed snapshot has commit's labels."""
    sn = env.sn
    await sn.prepare("lab-a", "", {"stage": "active", "keep": "1"})
    expect_equal((await sn.stat("lab-a")).labels, {"stage": "active", "keep": "1"}, "labels of prepare")
    await sn.commit("lab-c", "lab-a", {"stage": "committed"})
    expect_equal((await sn.stat("lab-c")).labels, {"stage": "committed"}, "labels of commit")
    await sn.view("lab-v", "lab-c")
    expect_equal((await sn.stat("lab-v")).labels, {}, "labels of a view made without labels")
    walked = {i.name: i.labels for i in await env.walk("labels.stage")}
    expect_equal(walked, {"lab-c": {"stage": "committed"}}, "walk by label")


@case
async def case_cleanup(env: Env) -> None:
    """Remove then cleanup gives the disk space back; what remains is untouched."""
    sn = env.sn
    await sn.cleanup()  # nothing to do is fine
    keep = await env.create("", create_file("/keep", b"keep me\n", 0o644), "cleanup-keep")
    before = await _du(env.root)
    size = 4 << 20
    mounts = await sn.prepare("cleanup-big", keep, GC_ROOT)
    await env.apply(mounts, create_file("/big", os.urandom(size), 0o644))
    await sn.commit("cleanup-big-c", "cleanup-big", GC_ROOT)
    grown = await _du(env.root)
    expect(grown - before >= size, f"root grew by {grown - before} bytes after writing {size}")
    await sn.remove("cleanup-big-c")
    await sn.cleanup()
    after = await _du(env.root)
    # 90%: the snapshotter's own bookkeeping (a database journal, say) may grow meanwhile
    expect(grown - after >= size * 9 // 10, f"cleanup gave back {grown - after} bytes of the {size} removed")
    flat = env.flat("cleanup")
    await asyncio.to_thread(create_file("/keep", b"keep me\n", 0o644), flat)
    await env.check_snapshot(keep, flat)
    await sn.cleanup()


@case
async def case_reopen(env: Env) -> None:
    """Closed and built again on the same root (a restart), a snapshotter has everything it had."""
    sn = env.sn
    base = create_file("/persist", b"across restarts\n", 0o644)
    committed = await env.create("", base, "reopen-c")
    active = await sn.prepare("reopen-a", committed, {"x": "y"})
    await env.apply(active, create_file("/more", b"more\n", 0o644))
    await sn.view("reopen-v", committed)
    before = {i.name: i for i in await env.walk()}
    sn = await env.reopen()
    after = {i.name: i for i in await env.walk()}
    expect_equal(after, before, "snapshots after reopening")
    flat = env.flat("reopen")
    await asyncio.to_thread(base, flat)
    await env.check_snapshot(committed, flat)
    await asyncio.to_thread(create_file("/more", b"more\n", 0o644), flat)
    await env.check_mounts(await sn.mounts("reopen-a"), flat, "the active snapshot after reopening")
    await sn.commit("reopen-c2", "reopen-a")
    await sn.prepare("reopen-new", "reopen-c2")
    expect_equal((await sn.stat("reopen-new")).parent, "reopen-c2", "a new snapshot after reopening")


@case
async def case_concurrent(env: Env) -> None:
    """Concurrent calls: many prepares on one parent all work; one key prepared at once wins once."""
    sn = env.sn
    parent = await env.create("", create_file("/shared", b"shared\n", 0o644), "conc-parent")
    await asyncio.gather(*(sn.prepare(f"conc-{i}", parent, GC_ROOT) for i in range(8)))
    expect_equal(
        sorted(i.name for i in await env.walk(f"parent=={parent}")),
        sorted(f"conc-{i}" for i in range(8)),
        "children after concurrent prepares",
    )
    results = await asyncio.gather(
        *(sn.prepare("conc-same", parent) for _ in range(4)), return_exceptions=True
    )
    ok = [r for r in results if not isinstance(r, BaseException)]
    errors = [r for r in results if isinstance(r, BaseException)]
    expect_equal(len(ok), 1, "prepares of one key that succeeded")
    expect(all(isinstance(e, AlreadyExists) for e in errors), f"the others must be AlreadyExists: {errors}")


@case
async def case_view_without_parent(env: Env) -> None:
    """A view of nothing is an empty, read-only directory."""
    mounts = await env.sn.view("empty-view", "")
    async with env.mounted(mounts) as target:
        expect_equal(await asyncio.to_thread(os.listdir, target), [], "entries of an empty view")
        try:
            await asyncio.to_thread((target / "x").write_bytes, b"x")
        except OSError:
            pass
        else:
            raise SuiteFailure("writing into an empty view succeeded; views must be read-only")


@case
async def case_overlay_whiteout_and_opaque(env: Env) -> None:
    """Overlay-form whiteouts (char 0/0) and opaque dirs in an upper dir hide lower entries.

    Only for snapshotters whose mounts are overlay: it writes straight into
    the ``upperdir`` the mounts name. Others are skipped; that is not a
    missing feature (their diff applier writes deletions in their own form).
    """
    sn = env.sn
    base = apply_all(
        create_file("/gone", b"whited out\n", 0o644),
        create_file("/stays", b"stays\n", 0o644),
        create_dir("/opq", 0o755),
        create_file("/opq/hidden", b"hidden\n", 0o644),
    )
    parent = await env.create("", base, "wh-base")
    mounts = await sn.prepare("wh-child", parent, GC_ROOT)
    upper = _option(mounts, "upperdir")
    if not _is_overlay(mounts) or not upper:
        raise CaseSkipped(
            f"mounts are {', '.join(m.type for m in mounts)}, not overlay with an upperdir: overlay-form "
            "whiteouts do not apply to this snapshotter"
        )

    def write_upper(root: Path) -> None:
        os.mknod(root / "gone", 0o600 | stat.S_IFCHR, os.makedev(0, 0))
        (root / "opq").mkdir(mode=0o755)
        os.setxattr(root / "opq", "trusted.overlay.opaque", b"y")
        (root / "opq" / "new").write_bytes(b"new\n")

    await asyncio.to_thread(write_upper, Path(upper))
    await sn.commit("wh-top", "wh-child", GC_ROOT)
    expected = env.flat("whiteout")
    await asyncio.to_thread(
        apply_all(
            base, remove_all("/gone"), remove_all("/opq/hidden"), create_file("/opq/new", b"new\n", 0o644)
        ),
        expected,
    )
    # view of the chain (two layers: an overlay without upper) and an active child on top
    await env.check_snapshot("wh-top", expected)
    top = await sn.prepare("wh-top-child", "wh-top", GC_ROOT)
    await env.check_mounts(top, expected, "active snapshot on the whiteout layer")


__all__ = [
    "CASES",
    "Applier",
    "Case",
    "CaseSkipped",
    "Env",
    "Factory",
    "Result",
    "SuiteFailure",
    "run_case",
    "run_suite",
]
