"""The content conformance suite against ``berth.content.v1.local``, built through the real registry.

The store comes from the installed entry points exactly as berthd loads it:
every other plugin is disabled, so only the content store initialises.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from daemon.events import EventBus
from daemon.metrics import MetricsRegistry
from daemon.protocols import ContentStore
from daemon.registry import DaemonPaths, Registry, Status
from daemon.testsuite.content import CASES, StoreFactory

PLUGIN = "berth.content.v1.local"


async def _init_only(registry: Registry, full_name: str, base: Path) -> object:
    """Initialise one plugin of ``registry`` on ``base``; the others are disabled."""
    others = [r.full_name for r in registry.registrations if r.full_name != full_name]
    await registry.init_all(
        paths=DaemonPaths(root=base, state=base.with_name(base.name + "-state"), address=str(base / "sock")),
        configs={},
        bus=EventBus(),
        metrics=MetricsRegistry(),
        disabled=others,
    )
    state = registry.state(full_name)
    if state.status is not Status.OK:
        raise AssertionError(f"{full_name}: {state.status.value}: {state.error}")
    return state.instance


@pytest.fixture
async def factory() -> AsyncIterator[StoreFactory]:
    registries: list[Registry] = []

    async def make(root: Path) -> ContentStore:
        registry = Registry()
        registry.load_entrypoints()
        registries.append(registry)
        store = await _init_only(registry, PLUGIN, root)
        assert isinstance(store, ContentStore)
        return store

    try:
        yield make
    finally:
        for registry in reversed(registries):
            assert await registry.close_all() == []


@pytest.mark.parametrize("name", sorted(CASES))
async def test_content_conformance(name: str, factory: StoreFactory, tmp_path: Path) -> None:
    await CASES[name](factory, tmp_path / "root")


async def test_plugin_exports_its_root(factory: StoreFactory, tmp_path: Path) -> None:
    registry = Registry()
    registry.load_entrypoints()
    try:
        await _init_only(registry, PLUGIN, tmp_path / "root")
        state = registry.state(PLUGIN)
        assert state.exports == {"root": str(tmp_path / "root" / PLUGIN)}
        assert (tmp_path / "root" / PLUGIN / "blobs").is_dir()
    finally:
        assert await registry.close_all() == []
