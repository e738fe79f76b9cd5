"""The middleware's bounded memos (pure logic, no server)."""

from __future__ import annotations

import pytest

from swr_cache.asgi import _vary


def test_remember_drops_the_oldest_entry(monkeypatch: pytest.MonkeyPatch) -> None:
    """A full memo makes room by dropping its oldest entry; rewriting a key drops nothing."""
    monkeypatch.setattr(_vary, "MEMO_LIMIT", 2)
    memo: dict[str, int] = {}
    _vary.remember(memo, "a", 1)
    _vary.remember(memo, "b", 2)
    _vary.remember(memo, "b", 3)
    assert memo == {"a": 1, "b": 3}
    _vary.remember(memo, "c", 4)
    assert memo == {"b": 3, "c": 4}
