"""Both conformance suites through the metadata layer: what services actually get.

Services never see a backend: they get ``db.content.namespace(ns)`` (a
:class:`~daemon.metadata.content.ContentView`) and
``db.snapshotter(id).namespace(ns)`` (a
:class:`~daemon.metadata.snapshots.SnapshotterView`). Here the
``berth.metadata.v1.sqlite`` plugin is built through the registry, exactly
as berthd builds it, over the real local content store and the real
overlayfs and native snapshotters, and every case of both suites runs
against the views.

The views work under a lease, as a client does (``ctr`` and the pull path
take one). The collector runs on its own schedule meanwhile (a second after
start and after every delete), and what a case creates without a
``containerd.io/gc.root`` label is garbage unless something holds it:
without the lease these cases pass only because no collection happens to
land mid-case. A restart (a case calling the factory again, or the
snapshotter suite's ``reopen``) opens the same database, where the lease
still exists.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import pytest

from daemon.errors import AlreadyExists, FailedPrecondition
from daemon.metadata import MetadataDB
from daemon.metadata.content import ContentView
from daemon.metadata.snapshots import SnapshotterView
from daemon.protocols import ContentStore, Snapshotter
from daemon.testsuite import content as content_suite
from daemon.testsuite import snapshotter as snapshotter_suite
from daemon.testsuite.loader import PluginSkipped, plugin_instance

METADATA = "berth.metadata.v1.sqlite"
SNAPSHOTTERS = ("overlayfs", "native")
NAMESPACE = "conformance"
LEASE = "conformance-suite"

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="the metadata plugin needs its snapshotters, which mount: needs root"
)


@contextlib.asynccontextmanager
async def metadata_db(root: Path) -> AsyncIterator[MetadataDB]:
    """The metadata plugin on ``root`` (content and every snapshotter with it), the lease created."""
    async with plugin_instance(METADATA, root) as db:
        assert isinstance(db, MetadataDB)
        with contextlib.suppress(AlreadyExists):  # a restart: the lease is in the database already
            await db.leases.create(NAMESPACE, LEASE)
        yield db


class CollectingView(SnapshotterView):
    """A SnapshotterView whose cleanup() first collects garbage.

    ``remove`` through the view drops the record only; the backend snapshot
    goes at the next collection, and ``SnapshotterView.cleanup`` just calls
    the backend's. The suite's ``cleanup`` case wants the space back after
    ``remove`` + ``cleanup()`` (it fails without this: nothing given back).
    """

    def __init__(self, db: MetadataDB, snapshotter: str) -> None:
        super().__init__(db.snapshotter(snapshotter), NAMESPACE, LEASE)
        self.db = db

    async def cleanup(self) -> None:
        summary = await self.db.gc.run_now()  # the backends' cleanup() is its last step
        if summary.errors:
            raise FailedPrecondition(f"garbage collection: {'; '.join(summary.errors)}")


def content_view_factory(root: Path) -> AbstractAsyncContextManager[ContentStore]:
    @contextlib.asynccontextmanager
    async def view() -> AsyncIterator[ContentStore]:
        async with metadata_db(root) as db:
            view = db.content.namespace(NAMESPACE, lease=LEASE)
            assert isinstance(view, ContentView)
            yield view

    return view()


def snapshotter_view_factory(snapshotter: str) -> snapshotter_suite.Factory:
    def factory(root: Path) -> AbstractAsyncContextManager[Snapshotter]:
        @contextlib.asynccontextmanager
        async def view() -> AsyncIterator[Snapshotter]:
            async with metadata_db(root) as db:
                if snapshotter not in db.snapshotters:
                    raise PluginSkipped(f"snapshotter {snapshotter} did not load: {sorted(db.snapshotters)}")
                yield CollectingView(db, snapshotter)

        return view()

    return factory


@pytest.mark.parametrize("case", list(content_suite.CASES))
async def test_content_view(case: str, base: Path) -> None:
    await content_suite.run_case(case, content_view_factory, base)


#: Cases that do not apply to a view, and why (never a missing feature).
NOT_APPLICABLE = {
    # native mounts are bind mounts: its layers carry whiteouts as deletions,
    # which tests/unit/test_diff_apply.py checks in the bind form.
    ("native", "overlay_whiteout_and_opaque"),
}


@pytest.mark.parametrize(
    ("snapshotter", "case"),
    [
        pytest.param(s, c, id=f"{c}-{s}")
        for c in snapshotter_suite.CASES
        for s in SNAPSHOTTERS
        if (s, c) not in NOT_APPLICABLE
    ],
)
async def test_snapshotter_view(snapshotter: str, case: str, base: Path) -> None:
    try:
        await snapshotter_suite.run_case(case, snapshotter_view_factory(snapshotter), base)
    except (snapshotter_suite.CaseSkipped, PluginSkipped) as exc:
        pytest.skip(str(exc))
