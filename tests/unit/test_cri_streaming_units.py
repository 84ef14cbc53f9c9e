"""Tokens (single use, expiry, bound) and the CRI log entry parser of attach."""

from __future__ import annotations

import pytest

from daemon.errors import ResourceExhausted
from plugins.cri.streaming.crilog import parse_entry
from plugins.cri.streaming.tokens import TokenCache


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


def test_token_single_use_kind_bound_and_expiry() -> None:
    clock = Clock()
    cache = TokenCache(ttl=60, max_outstanding=2, clock=clock)
    a = cache.mint("exec", "A")
    b = cache.mint("attach", "B")
    assert a != b and len(a) >= 20
    with pytest.raises(ResourceExhausted):
        cache.mint("exec", "C")
    assert cache.consume("attach", a) is None  # wrong kind: spent all the same
    assert cache.consume("exec", a) is None
    clock.now = 59.9
    assert cache.consume("attach", b) == "B"
    assert cache.consume("attach", b) is None
    c = cache.mint("exec", "C")
    clock.now = 200
    assert cache.consume("exec", c) is None
    assert len(cache) == 0


def test_parse_cri_log_entries() -> None:
    assert parse_entry(b"2024-01-01T00:00:00Z stdout F hello world") == ("stdout", b"hello world\n")
    assert parse_entry(b"2024-01-01T00:00:00Z stderr P part") == ("stderr", b"part")
    assert parse_entry(b"2024-01-01T00:00:00Z stdout F") == ("stdout", b"\n")
    assert parse_entry(b"garbage") is None
    assert parse_entry(b"t stdin F x") is None
    assert parse_entry(b"t stdout X x") is None
