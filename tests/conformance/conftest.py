"""Fixtures the conformance tests share."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from daemon.mount import mount_points_under, unmount_all


@pytest.fixture
async def base(tmp_path: Path) -> AsyncIterator[Path]:
    """tmp_path; afterwards nothing below it may still be mounted (detached, then the test fails)."""
    yield tmp_path
    leftover = mount_points_under(tmp_path)
    for point in reversed(leftover):
        await unmount_all(point, detach=True)
    assert leftover == [], f"mounts left behind: {leftover}"
