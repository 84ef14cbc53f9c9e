"""Conformance cases for :class:`daemon.protocols.ContentStore` implementations.

The cases of containerd's ``content/testsuite`` (Writer, UpdateStatus,
CommitExists, Resume*, SmallBlob, Labels, CommitErrorState), plus the ones
berth's contract adds: size/digest mismatch reports, the locked-ref error,
walk and status filters, delete, abort, large blobs, restarts.

Run it against a plugin, built through the plugin registry exactly as berthd
builds it (no root needed)::

    python -m daemon.testsuite content berth.content.v1.local

or from code with any *factory*: an ``async`` function that takes a root
directory and returns a store, or an async context manager yielding one
(:func:`daemon.testsuite.loader.plugin_factory` gives one)::

    from daemon.testsuite import content as suite

    for name in suite.CASES:
        await suite.run_case(name, factory, tmp_path / name)   # raises on failure

Calling the factory again on the same root must give a store that sees the
same data (a restart); the first store stays open meanwhile. ``run_case``
exits every context manager it entered; stores returned by a plain
coroutine are the factory owner's to close. Each case is also callable on
its own, ``await CASES[name](factory, root)``, with a plain ``async``
factory (the pytest form::

    @pytest.mark.parametrize("name", sorted(CASES))
    async def test_content(name: str, tmp_path: Path) -> None:
        await CASES[name](my_factory, tmp_path / "root")

). Failures raise :class:`ConformanceError` (an AssertionError) saying what
differed; the cases do not depend on pytest and do not use ``assert``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import random
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from daemon.errors import (
    AlreadyExists,
    BerthError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from daemon.protocols import ContentInfo, ContentStore, ContentWriter, IngestStatus
from daemon.testsuite.runner import Result, run_cases

#: What a case calls: ``async (root) -> ContentStore``.
StoreFactory = Callable[[Path], Awaitable[ContentStore]]

#: What :func:`run_case` accepts: a :data:`StoreFactory`, or ``(root) -> async context manager of a store``.
Factory = Callable[[Path], Awaitable[ContentStore] | AbstractAsyncContextManager[ContentStore]]

CaseFunc = Callable[[StoreFactory, Path], Awaitable[None]]

EMPTY_DIGEST = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"

#: "large": enough chunks to exercise streaming without slowing the suite
LARGE_SIZE = 8 * 1024 * 1024 + 123


class ConformanceError(AssertionError):
    """A store did not behave as the protocol says."""


# -- helpers ------------------------------------------------------------------


def _now() -> datetime:
    return datetime.now(UTC)


def _content(size: int, seed: int) -> tuple[bytes, str]:
    data = random.Random(seed).randbytes(size)
    return data, _sha256(data)


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _gc_labels() -> dict[str, str]:
    return {"containerd.io/gc.root": _now().strftime("%Y-%m-%dT%H:%M:%SZ")}


def _fail(message: str) -> None:
    raise ConformanceError(message)


def _eq(actual: object, expected: object, what: str) -> None:
    if actual != expected:
        _fail(f"{what}: got {actual!r}, expected {expected!r}")


def _between(value: datetime, low: datetime, high: datetime, what: str) -> None:
    if not low <= value <= high:
        _fail(f"{what}: {value.isoformat()} is not between {low.isoformat()} and {high.isoformat()}")


async def _raises(
    kind: type[BerthError], call: Coroutine[Any, Any, Any], what: str, *contains: str
) -> BerthError:
    """Await ``call``; it must raise ``kind`` whose message contains every one of ``contains``."""
    try:
        result = await call
    except kind as exc:
        for text in contains:
            if text not in str(exc):
                _fail(f"{what}: {kind.__name__} message {str(exc)!r} does not contain {text!r}")
        return exc
    except Exception as exc:
        got = f"{type(exc).__name__}: {exc}"
        raise ConformanceError(f"{what}: raised {got}, expected {kind.__name__}") from exc
    raise ConformanceError(f"{what}: returned {result!r}, expected {kind.__name__}")


async def _write(writer: ContentWriter, data: bytes, chunk: int) -> None:
    for start in range(0, len(data), chunk):
        await writer.write(data[start : start + chunk])


async def _write_blob(
    store: ContentStore, ref: str, data: bytes, labels: Mapping[str, str] | None = None
) -> str:
    writer = await store.writer(ref, total=len(data), expected=_sha256(data))
    try:
        await writer.write(data)
        return await writer.commit(len(data), _sha256(data), labels)
    finally:
        await writer.close()


async def _read_all(store: ContentStore, digest: str, chunk: int = 1 << 20) -> bytes:
    reader = await store.reader(digest)
    try:
        parts = []
        offset = 0
        while offset < reader.size:
            part = await reader.read_at(offset, chunk)
            if not part:
                _fail(f"read_at({offset}, {chunk}) of {digest}: empty before the end ({reader.size})")
            parts.append(part)
            offset += len(part)
        return b"".join(parts)
    finally:
        await reader.close()


async def _check_info(
    store: ContentStore,
    digest: str,
    size: int,
    labels: Mapping[str, str],
    created: tuple[datetime, datetime],
    updated: tuple[datetime, datetime],
) -> ContentInfo:
    info = await store.info(digest)
    _eq(info.digest, digest, f"info({digest}).digest")
    _eq(info.size, size, f"info({digest}).size")
    _eq(dict(info.labels), dict(labels), f"info({digest}).labels")
    _between(info.created_at, *created, f"info({digest}).created_at")
    _between(info.updated_at, *updated, f"info({digest}).updated_at")
    return info


def _check_status(
    status: IngestStatus,
    ref: str,
    offset: int,
    total: int,
    started: tuple[datetime, datetime],
    updated: tuple[datetime, datetime],
) -> None:
    _eq(status.ref, ref, "status.ref")
    _eq(status.offset, offset, f"status({ref}).offset")
    _eq(status.total, total, f"status({ref}).total")
    _between(status.started_at, *started, f"status({ref}).started_at")
    _between(status.updated_at, *updated, f"status({ref}).updated_at")


async def _walk(store: ContentStore, *filters: str) -> list[str]:
    return sorted([info.digest async for info in store.walk(list(filters))])


# -- containerd's cases ----------------------------------------------------------


async def check_writer(factory: StoreFactory, root: Path) -> None:
    """Four writers, announced with nothing, a size, a digest, or both; small writes; labels."""
    store = await factory(root)
    labels = _gc_labels()
    blobs = [_content(256, seed) for seed in range(1, 5)]
    writers = [
        await store.writer("c1"),
        await store.writer("c2", total=256),
        await store.writer("c3", expected=blobs[2][1]),
        await store.writer("c4", total=256, expected=blobs[3][1]),
    ]
    try:
        for (data, digest), writer in zip(blobs, writers, strict=True):
            await _write(writer, data, 32)
            _eq(writer.offset, 256, f"{writer.ref}: offset after writing")
            before = _now()
            got = await writer.commit(0, "", labels)
            after = _now()
            _eq(got, digest, f"{writer.ref}: digest returned by commit")
            _eq(writer.digest(), digest, f"{writer.ref}: writer.digest() after commit")
            await _check_info(store, digest, 256, labels, (before, after), (before, after))
            _eq(await _read_all(store, digest), data, f"content of {digest}")
    finally:
        for writer in writers:
            await writer.close()


async def check_update_status(factory: StoreFactory, root: Path) -> None:
    """status() follows every write: offset, total, digest so far, timestamps."""
    store = await factory(root)
    data, digest = _content(256, 11)
    pre_start = _now()
    writer = await store.writer("c1", total=256, expected=digest)
    post_start = _now()
    start_times = (pre_start, post_start)
    try:
        _check_status(await store.status("c1"), "c1", 0, 256, start_times, start_times)
        _eq(writer.digest(), EMPTY_DIGEST, "digest before any write")
        for start, end in ((0, 64), (64, 192), (192, 256)):
            pre = _now()
            await writer.write(data[start:end])
            post = _now()
            status = await store.status("c1")
            _check_status(status, "c1", end, 256, (pre_start, post_start), (pre, post))
            _eq(writer.digest(), _sha256(data[:end]), f"digest after {end} bytes")
        before = _now()
        labels = _gc_labels()
        await writer.commit(0, "", labels)
        after = _now()
        await _check_info(store, digest, 256, labels, (before, after), (before, after))
    finally:
        await writer.close()


async def check_commit_exists(factory: StoreFactory, root: Path) -> None:
    """Committing content that is already there is AlreadyExists, with or without a digest."""
    store = await factory(root)
    data, digest = _content(256, 21)
    await _write_blob(store, "c1", data)
    for i, expected in enumerate((digest, "")):
        ref = f"c1-commitexists-{i}"
        writer = await store.writer(ref)
        try:
            await writer.write(data)
            await _raises(AlreadyExists, writer.commit(len(data), expected), f"commit of existing ({i})")
        finally:
            await writer.close()
        await _raises(NotFound, store.status(ref), f"status of {ref} after AlreadyExists (ingest removed)")


async def check_resume(factory: StoreFactory, root: Path) -> None:
    """Close half way, open again: same status and digest; finish and commit."""
    store = await factory(root)
    ref = "cb"
    data, digest = _content(256, 31)
    first, second = data[:128], data[128:]
    pre_start = _now()
    writer = await store.writer(ref, total=256, expected=digest)
    post_start = _now()
    pre = post_start
    await writer.write(first)
    post = _now()
    _check_status(await store.status(ref), ref, 128, 256, (pre_start, post_start), (pre, post))
    _eq(writer.digest(), _sha256(first), "digest after the first half")
    await writer.close()
    _check_status(await store.status(ref), ref, 128, 256, (pre_start, post_start), (pre, post))

    writer = await store.writer(ref, total=256, expected=digest)
    try:
        _eq(writer.offset, 128, "offset of the resumed writer")
        _eq(writer.digest(), _sha256(first), "digest of the resumed writer")
        _check_status(await store.status(ref), ref, 128, 256, (pre_start, post_start), (pre, post))
        pre = _now()
        await writer.write(second)
        post = _now()
        _check_status(await store.status(ref), ref, 256, 256, (pre_start, post_start), (pre, post))
        _eq(writer.digest(), digest, "digest after resuming")
        before = _now()
        _eq(await writer.commit(0, ""), digest, "digest returned by commit")
        after = _now()
    finally:
        await writer.close()
    await _check_info(store, digest, 256, {}, (before, after), (before, after))


async def _resume_each(factory: StoreFactory, root: Path, truncate: bool) -> None:
    store = await factory(root)
    seed = 100
    for i, size in enumerate((500, 5000, 50000)):
        for j, fraction in enumerate((0.0, 0.1, 0.5, 0.9, 1.0)):
            seed += 1
            data, digest = _content(size, seed)
            limit = int(size * fraction)
            ref = f"ref-{i}-{j}"
            writer = await store.writer(ref, total=size, expected=digest)
            try:
                await writer.write(data[:limit])
            finally:
                await writer.close()
            writer = await store.writer(ref, total=size, expected=digest)
            try:
                _eq((await store.status(ref)).offset, limit, f"{ref}: offset after reopening")
                _eq(writer.offset, limit, f"{ref}: writer.offset after reopening")
                before = _now()
                if truncate:
                    await writer.truncate(0)
                    _eq(writer.offset, 0, f"{ref}: offset after truncate(0)")
                    _eq(writer.digest(), EMPTY_DIGEST, f"{ref}: digest after truncate(0)")
                    await _write(writer, data, 1024)
                else:
                    await _write(writer, data[limit:], 1024)
                _eq(await writer.commit(size, digest), digest, f"{ref}: digest returned by commit")
                after = _now()
            finally:
                await writer.close()
            await _check_info(store, digest, size, {}, (before, after), (before, after))


async def check_resume_truncate(factory: StoreFactory, root: Path) -> None:
    """Resume at every fraction of three sizes, truncate to 0, write everything again."""
    await _resume_each(factory, root, truncate=True)


async def check_resume_discard(factory: StoreFactory, root: Path) -> None:
    """Resume at every fraction of three sizes and write only what is missing."""
    await _resume_each(factory, root, truncate=False)


async def check_small_blob(factory: StoreFactory, root: Path) -> None:
    """Reading past the end returns what there is; at or after the end, nothing."""
    store = await factory(root)
    blob = b"foobar"
    digest = _sha256(blob)
    writer = await store.writer("small", total=len(blob), expected=digest)
    try:
        await writer.write(blob)
        await writer.commit(len(blob), digest)
    finally:
        await writer.close()
    reader = await store.reader(digest)
    try:
        _eq(reader.size, len(blob), "reader.size")
        _eq(await reader.read_at(0, len(blob) + 1), blob, "read_at(0, size + 1)")
        _eq(await reader.read_at(3, 100), blob[3:], "read_at(3, 100)")
        _eq(await reader.read_at(len(blob), 10), b"", "read_at(size, 10)")
        _eq(await reader.read_at(len(blob) + 5, 10), b"", "read_at(size + 5, 10)")
        _eq(await reader.read_at(1, 0), b"", "read_at(1, 0)")
    finally:
        await reader.close()


async def check_labels(factory: StoreFactory, root: Path) -> None:
    """Labels set at commit, replaced, patched with field paths, and kept across a restart."""
    store = await factory(root)
    data, digest = _content(256, 41)
    root_time = _now().strftime("%Y-%m-%dT%H:%M:%SZ")
    labels = {"k1": "v1", "k2": "v2", "containerd.io/gc.root": root_time}
    writer = await store.writer("c1-checklabels", total=256, expected=digest)
    try:
        await writer.write(data)
        pre_commit = _now()
        await writer.commit(0, "", labels)
        post_commit = _now()
    finally:
        await writer.close()
    commit_times = (pre_commit, post_commit)
    info = await _check_info(store, digest, 256, labels, commit_times, commit_times)

    labels = {"k1": "newvalue", "k3": "v3", "containerd.io/gc.root": root_time}
    info.labels = dict(labels)
    pre = _now()
    updated = await store.update(info)
    post = _now()
    _eq(updated.labels, labels, "labels returned by update()")
    await _check_info(store, digest, 256, labels, commit_times, (pre, post))

    info.labels = {"k1": "v1", "containerd.io/gc.root": root_time}
    pre = _now()
    updated = await store.update(info, ["labels.k3", "labels.k1"])
    post = _now()
    expected = {"k1": "v1", "containerd.io/gc.root": root_time}
    _eq(updated.labels, expected, "labels returned by update(labels.k3, labels.k1)")
    await _check_info(store, digest, 256, expected, commit_times, (pre, post))

    info.labels = {"k9": "v9"}
    await _raises(InvalidArgument, store.update(info, ["size"]), "update of a field other than labels")
    await _check_info(store, digest, 256, expected, commit_times, (pre, post))

    restarted = await factory(root)
    await _check_info(restarted, digest, 256, expected, commit_times, (pre, post))

    missing = ContentInfo(_sha256(b"missing"), 0, pre, pre, {"a": "b"})
    await _raises(NotFound, store.update(missing), "update of missing content")


async def check_commit_error_state(factory: StoreFactory, root: Path) -> None:
    """containerd's CommitErrorState: after each failed commit the ref is usable again."""
    store = await factory(root)
    c1, d1 = _content(256, 51)
    _, d2 = _content(256, 52)
    await _write_blob(store, "c1", c1)
    ref = "c1-commiterror-state"

    async def locked() -> None:
        await _raises(Unavailable, store.writer(ref), f"second writer on {ref}", "locked")

    writer = await store.writer(ref)
    await writer.write(c1)
    await locked()
    await _raises(AlreadyExists, writer.commit(len(c1), d1), "commit of existing content with digest")
    await writer.close()

    writer = await store.writer(ref)
    await locked()
    await writer.write(c1)
    await _raises(AlreadyExists, writer.commit(len(c1), ""), "commit of existing content without digest")
    await writer.close()

    writer = await store.writer(ref)
    await locked()
    await writer.write(c1 + b"more")
    await _raises(FailedPrecondition, writer.commit(len(c1) + 4, d2), "commit with the wrong digest")
    await writer.close()

    writer = await store.writer(ref)
    await locked()
    _eq(writer.offset, len(c1) + 4, "offset kept after a failed commit")
    await _raises(FailedPrecondition, writer.commit(len(c1), ""), "commit with the wrong size")
    await writer.close()

    writer = await store.writer(ref)
    await locked()
    _eq(await writer.commit(len(c1) + 4, ""), _sha256(c1 + b"more"), "commit after the failures")
    await writer.close()

    writer = await store.writer(ref)
    await writer.write(c1)
    await locked()
    await _raises(AlreadyExists, writer.commit(len(c1), d1), "commit of existing content again")
    await writer.close()

    writer = await store.writer(ref)
    await locked()
    await writer.close()
    writer = await store.writer(ref)
    await writer.close()


# -- berth's cases ---------------------------------------------------------------


async def check_commit_size_mismatch(factory: StoreFactory, root: Path) -> None:
    """A wrong size commits nothing, names both sizes, and keeps the ingest as it was."""
    store = await factory(root)
    data, digest = _content(1000, 61)
    writer = await store.writer("size")
    try:
        await writer.write(data)
        await _raises(FailedPrecondition, writer.commit(999, ""), "commit with size 999", "999", "1000")
        await _raises(NotFound, store.info(digest), "info after a failed commit")
        _eq(await _walk(store), [], "walk after a failed commit")
        _eq((await store.status("size")).offset, 1000, "ingest offset after a failed commit")
        _eq(await writer.commit(1000, digest), digest, "commit with the right size on the same writer")
    finally:
        await writer.close()

    writer = await store.writer("announced", total=2000)
    try:
        await writer.write(data)
        await _raises(FailedPrecondition, writer.commit(), "commit short of the announced total", "2000")
    finally:
        await writer.close()


async def check_commit_digest_mismatch(factory: StoreFactory, root: Path) -> None:
    """A wrong digest commits nothing, names expected and actual, and the ingest can be fixed."""
    store = await factory(root)
    data, digest = _content(1000, 71)
    wrong = _sha256(b"something else")
    writer = await store.writer("digest")
    try:
        await writer.write(data[:500] + b"x" * 500)
        seen = _sha256(data[:500] + b"x" * 500)
        await _raises(
            FailedPrecondition, writer.commit(1000, digest), "commit of corrupted bytes", digest, seen
        )
        await _raises(NotFound, store.info(digest), "info of the expected digest after a failed commit")
        await _raises(NotFound, store.info(seen), "info of the seen digest after a failed commit")
        _eq(await _walk(store), [], "walk after a failed commit")
        await writer.truncate(500)
        _eq(writer.digest(), _sha256(data[:500]), "digest after truncate(500)")
        await writer.write(data[500:])
        _eq(await writer.commit(1000, digest), digest, "commit after truncating and rewriting")
    finally:
        await writer.close()

    writer = await store.writer("announced", expected=wrong)
    try:
        await writer.write(data)
        await _raises(FailedPrecondition, writer.commit(), "commit against the announced digest", wrong)
    finally:
        await writer.close()


async def check_locked_ref(factory: StoreFactory, root: Path) -> None:
    """A second writer on a held ref is Unavailable saying "locked"; closing frees the ref."""
    store = await factory(root)
    first = await store.writer("held")
    try:
        await first.write(b"abc")
        await _raises(Unavailable, store.writer("held"), "second writer", "locked")
        await _raises(Unavailable, store.writer("held", total=3), "second writer with a total", "locked")
        other = await store.writer("other")  # other refs are not affected
        await other.close()
        _eq((await store.status("held")).offset, 3, "status of a held ref")
    finally:
        await first.close()
    second = await store.writer("held")
    try:
        _eq(second.offset, 3, "offset after the first writer closed")
    finally:
        await second.close()


async def check_walk_filters(factory: StoreFactory, root: Path) -> None:
    """walk() with containerd filters on digest, size and labels; OR across strings, AND within."""
    store = await factory(root)
    a, da = _content(100, 81)
    b, db = _content(200, 82)
    c, dc = _content(300, 83)
    await _write_blob(store, "a", a, {"kind": "layer", "team": "x"})
    await _write_blob(store, "b", b, {"kind": "config"})
    await _write_blob(store, "c", c)
    _eq(await _walk(store), sorted([da, db, dc]), "walk()")
    _eq(await _walk(store, ""), sorted([da, db, dc]), 'walk("")')
    _eq(await _walk(store, f"digest=={db}"), [db], "walk(digest==)")
    _eq(await _walk(store, "size==300"), [dc], "walk(size==300)")
    _eq(await _walk(store, "labels.kind==layer"), [da], "walk(labels.kind==layer)")
    _eq(await _walk(store, "labels.kind"), sorted([da, db]), "walk(labels.kind)")
    _eq(await _walk(store, "labels.kind!=layer"), sorted([db, dc]), "walk(labels.kind!=layer)")
    _eq(await _walk(store, "labels.kind~=^con"), [db], "walk(labels.kind~=^con)")
    _eq(await _walk(store, "labels.kind==layer,labels.team==y"), [], "walk(AND)")
    _eq(await _walk(store, "labels.team==x", "size==300"), sorted([da, dc]), "walk(OR)")
    _eq(await _walk(store, "labels.nothing==x"), [], "walk(absent label)")
    try:
        found = await _walk(store, "labels.==")
    except InvalidArgument:
        pass
    else:
        _fail(f"walk with a malformed filter: returned {found!r}, expected InvalidArgument")


async def check_delete(factory: StoreFactory, root: Path) -> None:
    """delete() removes content and its labels; NotFound before and after."""
    store = await factory(root)
    data, digest = _content(64, 91)
    keep, keep_digest = _content(64, 92)
    await _raises(NotFound, store.delete(digest), "delete of missing content")
    await _write_blob(store, "d", data, {"a": "b"})
    await _write_blob(store, "k", keep)
    await store.delete(digest)
    await _raises(NotFound, store.info(digest), "info after delete")
    await _raises(NotFound, store.reader(digest), "reader after delete")
    await _raises(NotFound, store.delete(digest), "second delete")
    _eq(await _walk(store), [keep_digest], "walk after delete")
    _eq(await _read_all(store, keep_digest), keep, "other content after delete")
    before = _now()
    await _write_blob(store, "d-again", data)
    after = _now()
    await _check_info(store, digest, 64, {}, (before, after), (before, after))  # labels did not come back


async def check_list_statuses(factory: StoreFactory, root: Path) -> None:
    """status() and list_statuses() with ref filters; committed ingests disappear."""
    store = await factory(root)
    await _raises(NotFound, store.status("nothing"), "status of an unknown ref")
    _eq(await store.list_statuses(), [], "list_statuses() of an empty store")

    async def refs(*filters: str) -> list[str]:
        return sorted(s.ref for s in await store.list_statuses(list(filters)))

    writers = [await store.writer(ref, total=10) for ref in ("alpha", "beta-1", "beta-2")]
    try:
        for i, writer in enumerate(writers):
            await writer.write(b"x" * (i + 1))
        _eq(await refs(), ["alpha", "beta-1", "beta-2"], "refs of list_statuses()")
        offsets = {s.ref: (s.offset, s.total) for s in await store.list_statuses()}
        _eq(offsets, {"alpha": (1, 10), "beta-1": (2, 10), "beta-2": (3, 10)}, "offsets and totals")
        _eq(await refs("ref==alpha"), ["alpha"], "list_statuses(ref==alpha)")
        _eq(await refs("ref~=^beta"), ["beta-1", "beta-2"], "list_statuses(ref~=^beta)")
        _eq(await refs("ref==alpha", "ref==beta-2"), ["alpha", "beta-2"], "list_statuses(OR)")
        _eq(await refs("ref!=alpha"), ["beta-1", "beta-2"], "list_statuses(ref!=alpha)")
        await writers[0].write(b"y" * 9)
        await writers[0].commit(10)
        _eq(await refs(), ["beta-1", "beta-2"], "list_statuses() after a commit")
        await _raises(NotFound, store.status("alpha"), "status after commit")
    finally:
        for writer in writers:
            await writer.close()
    _eq(await refs(), ["beta-1", "beta-2"], "list_statuses() after closing (ingests stay)")


async def check_abort(factory: StoreFactory, root: Path) -> None:
    """abort() removes an ingest: NotFound afterwards, and the ref starts from zero."""
    store = await factory(root)
    await _raises(NotFound, store.abort("never"), "abort of an unknown ref")
    writer = await store.writer("gone", total=100)
    try:
        await writer.write(b"z" * 50)
    finally:
        await writer.close()
    await store.abort("gone")
    await _raises(NotFound, store.status("gone"), "status after abort")
    await _raises(NotFound, store.abort("gone"), "second abort")
    _eq([s.ref for s in await store.list_statuses()], [], "list_statuses() after abort")
    writer = await store.writer("gone")
    try:
        _eq(writer.offset, 0, "offset of a writer after abort")
        _eq(writer.digest(), EMPTY_DIGEST, "digest of a writer after abort")
        _eq((await store.status("gone")).total, 0, "total of a writer after abort (the old one is gone)")
    finally:
        await writer.close()


async def check_large_blob_streaming(factory: StoreFactory, root: Path) -> None:
    """Several MiB in odd-sized chunks, read back in chunks; size and digest hold."""
    store = await factory(root)
    data, digest = _content(LARGE_SIZE, 101)
    writer = await store.writer("large", total=len(data), expected=digest)
    try:
        await _write(writer, data, (1 << 20) - 7)
        _eq(writer.offset, len(data), "offset after streaming")
        _eq(await writer.commit(), digest, "digest of the large blob")
    finally:
        await writer.close()
    info = await store.info(digest)
    _eq(info.size, len(data), "size of the large blob")
    got = await _read_all(store, digest, chunk=(1 << 20) + 3)
    _eq(len(got), len(data), "bytes read back")
    _eq(_sha256(got), digest, "digest of the bytes read back")


async def check_writer_expected_exists(factory: StoreFactory, root: Path) -> None:
    """A writer announcing a digest that is stored already is AlreadyExists (pullers skip it)."""
    store = await factory(root)
    data, digest = _content(128, 111)
    await _write_blob(store, "first", data)
    await _raises(AlreadyExists, store.writer("second", expected=digest), "writer for stored content")
    await _raises(NotFound, store.status("second"), "status of the refused writer")


async def check_resume_mismatch(factory: StoreFactory, root: Path) -> None:
    """Resuming with another total or expected digest is FailedPrecondition naming both."""
    store = await factory(root)
    data, digest = _content(100, 121)
    _, other = _content(100, 122)
    writer = await store.writer("m", total=100, expected=digest)
    try:
        await writer.write(data[:10])
    finally:
        await writer.close()
    await _raises(FailedPrecondition, store.writer("m", total=200), "resume with another total", "200", "100")
    await _raises(
        FailedPrecondition, store.writer("m", expected=other), "resume with another digest", other, digest
    )
    writer = await store.writer("m")  # announcing nothing resumes what is there
    try:
        _eq(writer.offset, 10, "offset when resuming without announcing")
        await writer.write(data[10:])
        _eq(await writer.commit(), digest, "commit checked against the first announcement")
    finally:
        await writer.close()


async def check_truncate(factory: StoreFactory, root: Path) -> None:
    """truncate() keeps a prefix (digest rebuilt); past the offset is InvalidArgument."""
    store = await factory(root)
    data, digest = _content(1000, 131)
    writer = await store.writer("t")
    try:
        await writer.write(data[:600] + b"garbage")
        await _raises(InvalidArgument, writer.truncate(10_000), "truncate past the offset")
        await _raises(InvalidArgument, writer.truncate(-1), "truncate to a negative size")
        await writer.truncate(600)
        _eq(writer.offset, 600, "offset after truncate(600)")
        _eq(writer.digest(), _sha256(data[:600]), "digest after truncate(600)")
        _eq((await store.status("t")).offset, 600, "status offset after truncate(600)")
        await writer.write(data[600:])
        _eq(await writer.commit(1000, digest), digest, "commit after truncate")
    finally:
        await writer.close()


async def check_restart(factory: StoreFactory, root: Path) -> None:
    """An ingest and the content survive a new store on the same root, and resume there."""
    store = await factory(root)
    data, digest = _content(4096, 141)
    done, done_digest = _content(10, 142)
    await _write_blob(store, "done", done, {"x": "y"})
    pre = _now()
    writer = await store.writer("half", total=4096, expected=digest)
    try:
        await writer.write(data[:1000])
    finally:
        await writer.close()
    post = _now()

    again = await factory(root)
    status = await again.status("half")
    _check_status(status, "half", 1000, 4096, (pre, post), (pre, post))
    _eq(status.expected, digest, "expected digest kept across a restart")
    _eq((await again.info(done_digest)).labels, {"x": "y"}, "labels across a restart")
    writer = await again.writer("half", total=4096, expected=digest)
    try:
        _eq(writer.offset, 1000, "offset resumed after a restart")
        _eq(writer.digest(), _sha256(data[:1000]), "digest resumed after a restart")
        await writer.write(data[1000:])
        _eq(await writer.commit(), digest, "commit after a restart")
    finally:
        await writer.close()
    _eq(await _read_all(again, digest), data, "content committed after a restart")


async def check_invalid_arguments(factory: StoreFactory, root: Path) -> None:
    """Malformed digests and refs are InvalidArgument naming the field."""
    store = await factory(root)
    await _raises(InvalidArgument, store.info("sha256:nothex"), "info(bad digest)", "digest")
    await _raises(InvalidArgument, store.reader("md5:abc"), "reader(bad digest)", "digest")
    await _raises(InvalidArgument, store.delete("nonsense"), "delete(bad digest)", "digest")
    await _raises(InvalidArgument, store.writer(""), "writer(empty ref)", "ref")
    bad = "sha256:123"
    await _raises(InvalidArgument, store.writer("r", expected=bad), "writer(bad expected)", "expected")
    await _raises(InvalidArgument, store.writer("r", total=-1), "writer(negative total)", "total")
    writer = await store.writer("r")
    try:
        await writer.write(b"abc")
        await _raises(InvalidArgument, writer.commit(3, "sha256:zz"), "commit(bad expected)", "expected")
        _eq(await writer.commit(3, _sha256(b"abc")), _sha256(b"abc"), "commit after a refused one")
    finally:
        await writer.close()


async def check_sha512(factory: StoreFactory, root: Path) -> None:
    """sha512 digests are accepted as the expected digest, announced or at commit."""
    store = await factory(root)
    data = b"sha512 content" * 100
    d512 = "sha512:" + hashlib.sha512(data).hexdigest()
    writer = await store.writer("s1", total=len(data), expected=d512)
    try:
        await writer.write(data)
        _eq(writer.digest(), d512, "digest of a writer announced with sha512")
        _eq(await writer.commit(), d512, "commit announced with sha512")
    finally:
        await writer.close()
    _eq((await store.info(d512)).size, len(data), "info of sha512 content")
    _eq(await _read_all(store, d512), data, "content of sha512 content")

    other = b"other sha512 content"
    o512 = "sha512:" + hashlib.sha512(other).hexdigest()
    writer = await store.writer("s2")
    try:
        await writer.write(other)
        _eq(await writer.commit(len(other), o512), o512, "commit with a sha512 expected digest")
    finally:
        await writer.close()
    _eq(await _walk(store, f"digest=={o512}"), [o512], "walk finds sha512 content")


async def check_empty_blob(factory: StoreFactory, root: Path) -> None:
    """The empty blob commits and reads like any other."""
    store = await factory(root)
    writer = await store.writer("empty")
    try:
        _eq(await writer.commit(0, EMPTY_DIGEST), EMPTY_DIGEST, "commit of the empty blob")
    finally:
        await writer.close()
    _eq((await store.info(EMPTY_DIGEST)).size, 0, "size of the empty blob")
    reader = await store.reader(EMPTY_DIGEST)
    try:
        _eq(reader.size, 0, "reader.size of the empty blob")
        _eq(await reader.read_at(0, 10), b"", "read of the empty blob")
    finally:
        await reader.close()


async def check_writer_after_commit(factory: StoreFactory, root: Path) -> None:
    """A committed writer refuses more writes; close() after commit is harmless."""
    store = await factory(root)
    writer = await store.writer("w")
    await writer.write(b"data")
    await writer.commit()
    await _raises(BerthError, writer.write(b"more"), "write after commit")
    await writer.close()
    await writer.close()
    writer = await store.writer("w")  # the ref is free again, and fresh
    try:
        _eq(writer.offset, 0, "offset of a new writer on a committed ref")
    finally:
        await writer.close()


async def check_concurrent_refs(factory: StoreFactory, root: Path) -> None:
    """Writers on different refs run at the same time without interfering."""
    store = await factory(root)
    blobs = [_content(20000, 150 + i) for i in range(6)]

    async def one(i: int) -> str:
        data, digest = blobs[i]
        writer = await store.writer(f"par-{i}", total=len(data), expected=digest)
        try:
            await _write(writer, data, 1000 + i)
            return await writer.commit()
        finally:
            await writer.close()

    got = await asyncio.gather(*(one(i) for i in range(len(blobs))))
    _eq(sorted(got), sorted(d for _, d in blobs), "digests committed concurrently")
    _eq(await _walk(store), sorted(d for _, d in blobs), "walk after concurrent commits")


# -- the table, and running it ---------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Case:
    """One case: its name (``-k``), the first line of its docstring, and the coroutine function.

    Calling it runs the function: ``await CASES[name](factory, root)``.
    """

    name: str
    func: CaseFunc
    doc: str

    def __call__(self, factory: StoreFactory, root: Path) -> Awaitable[None]:
        return self.func(factory, root)


def _table(*funcs: CaseFunc) -> dict[str, Case]:
    cases = {}
    for func in funcs:
        name = func.__name__.removeprefix("check_")
        cases[name] = Case(name, func, (func.__doc__ or "").strip().splitlines()[0])
    return cases


#: Every case, by name, in the order they run.
CASES: dict[str, Case] = _table(
    # containerd's content/testsuite
    check_writer,
    check_update_status,
    check_commit_exists,
    check_resume,
    check_resume_truncate,
    check_resume_discard,
    check_small_blob,
    check_labels,
    check_commit_error_state,
    # berth's contract
    check_commit_size_mismatch,
    check_commit_digest_mismatch,
    check_locked_ref,
    check_walk_filters,
    check_delete,
    check_list_statuses,
    check_abort,
    check_large_blob_streaming,
    check_writer_expected_exists,
    check_resume_mismatch,
    check_truncate,
    check_restart,
    check_invalid_arguments,
    check_sha512,
    check_empty_blob,
    check_writer_after_commit,
    check_concurrent_refs,
)


async def run_case(name: str, factory: Factory, base: Path) -> None:
    """Run case ``name`` with stores built by ``factory`` on ``base/root``; raises on failure.

    ``base`` must not exist or be empty; it is left in place (the caller
    owns it). Every store the factory yielded as a context manager is
    exited before this returns, even when the case fails.
    """
    try:
        entry = CASES[name]
    except KeyError:
        raise KeyError(f"no content conformance case {name!r}; cases: {', '.join(CASES)}") from None
    root = base / "root"
    root.mkdir(parents=True, exist_ok=True)
    async with AsyncExitStack() as stack:

        async def store_at(path: Path) -> ContentStore:
            made = factory(path)
            if isinstance(made, AbstractAsyncContextManager) or hasattr(made, "__aenter__"):
                store = await stack.enter_async_context(made)  # type: ignore[arg-type]
            else:
                store = await made
            if not isinstance(store, ContentStore):
                raise ConformanceError(f"the factory returned {type(store).__name__}, not a ContentStore")
            return store

        await entry(store_at, root)


async def run_suite(
    factory: Factory,
    base: Path,
    *,
    names: Sequence[str] = (),
    report: Callable[[Result], None] | None = None,
) -> list[Result]:
    """Run the cases ``names`` (all by default), each in ``base/<name>``; never raises for a case.

    Content cases never skip: a result is "pass" or "fail".
    """
    return await run_cases(run_case, names or list(CASES), factory, base, report=report)


__all__ = [
    "CASES",
    "Case",
    "ConformanceError",
    "Factory",
    "Result",
    "StoreFactory",
    "run_case",
    "run_suite",
]
