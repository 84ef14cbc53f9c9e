"""The content conformance suite against ``berth.content.v1.local``, built through the real registry.

The store comes from the installed entry points exactly as berthd loads it
(:func:`daemon.testsuite.loader.plugin_factory`): only it and what it
requires initialise. The second half checks that the suite itself can fail.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest

from daemon.protocols import ContentInfo, ContentStore
from daemon.testsuite import content as suite
from daemon.testsuite.loader import plugin_factory, plugin_instance
from plugins.content.local.store import LocalContentStore

PLUGIN = "berth.content.v1.local"


@pytest.mark.parametrize("name", list(suite.CASES))
async def test_content_conformance(name: str, tmp_path: Path) -> None:
    await suite.run_case(name, plugin_factory(PLUGIN), tmp_path)


async def test_plugin_keeps_its_blobs_under_its_own_root(tmp_path: Path) -> None:
    async with plugin_instance(PLUGIN, tmp_path) as store:
        assert isinstance(store, LocalContentStore) and isinstance(store, ContentStore)
        assert (tmp_path / "root" / PLUGIN / "blobs").is_dir()


# -- the suite can fail -----------------------------------------------------------


class IgnoresFieldpaths(LocalContentStore):
    """update() replaces every label, whatever fieldpaths say."""

    async def update(self, info: ContentInfo, fieldpaths: Sequence[str] = ()) -> ContentInfo:
        return await super().update(info)


@pytest.fixture
async def broken() -> AsyncIterator[suite.StoreFactory]:
    """The plain-coroutine form of a factory: its stores are closed here, not by the suite."""
    opened: list[LocalContentStore] = []

    async def make(root: Path) -> ContentStore:
        store = await IgnoresFieldpaths.open(root)
        opened.append(store)
        return store

    yield make
    for store in opened:
        await store.close()


async def test_suite_catches_a_broken_store_and_reports_each_case(
    broken: suite.StoreFactory, tmp_path: Path
) -> None:
    complaint = r"update of a field other than labels: returned ContentInfo\(.*\), expected InvalidArgument"
    with pytest.raises(suite.ConformanceError, match=complaint):
        await suite.run_case("labels", broken, tmp_path / "direct")
    results: list[suite.Result] = []
    out = await suite.run_suite(
        broken, tmp_path / "all", names=["labels", "small_blob"], report=results.append
    )
    assert out == results
    assert [(r.name, r.status) for r in out] == [("labels", "fail"), ("small_blob", "pass")]
    assert out[0].message.startswith("ConformanceError: ")


async def test_unknown_case_and_wrong_factory(tmp_path: Path) -> None:
    with pytest.raises(KeyError, match="no content conformance case 'nope'"):
        await suite.run_case("nope", plugin_factory(PLUGIN), tmp_path)

    async def not_a_store(root: Path) -> object:
        return object()

    with pytest.raises(suite.ConformanceError, match="returned object, not a ContentStore"):
        await suite.run_case("small_blob", not_a_store, tmp_path)  # type: ignore[arg-type]
