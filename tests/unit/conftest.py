"""Fixtures several unit test files share; a file's own fixture of the same name wins."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from daemon.metadata.store import MetadataStore


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[MetadataStore]:
    """A fresh metadata database in tmp_path, closed afterwards."""
    s = await MetadataStore.open(tmp_path / "meta.db")
    try:
        yield s
    finally:
        await s.close()
