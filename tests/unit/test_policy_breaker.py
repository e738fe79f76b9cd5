"""Pure units: Policy validation, the circuit breaker's states, metrics histograms."""

from __future__ import annotations

import math

import pytest

from swr_cache import ConfigError, Policy
from swr_cache._breaker import Breaker
from swr_cache._metrics import Histogram, MetricsRegistry


def test_policy_derives_milliseconds_and_defaults() -> None:
    """TTLs are float seconds kept as milliseconds; negative_ttl defaults to soft_ttl."""
    p = Policy(soft_ttl=1.5, hard_ttl=60)
    assert (p.soft_ms, p.hard_ms, p.negative_ms) == (1500, 60000, 1500)
    assert "soft_ttl=1.5" in repr(p)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"soft_ttl": 0},
        {"soft_ttl": -1},
        {"soft_ttl": math.inf},
        {"soft_ttl": math.nan},
        {"soft_ttl": 10, "hard_ttl": 5},
        {"soft_ttl": "ten"},
        {"jitter": 1.0},
        {"jitter": -0.1},
        {"early_refresh": -1},
        {"negative_ttl": 0},
    ],
)
def test_policy_rejects_nonsense(kwargs: dict[str, object]) -> None:
    """Invalid settings raise ConfigError (a ValueError), never AssertionError."""
    with pytest.raises(ConfigError) as info:
        Policy(**kwargs)  # type: ignore[arg-type]
    assert isinstance(info.value, ValueError)


def test_policy_overrides_grow_hard_ttl_to_fit() -> None:
    """Overriding only soft_ttl above the inherited hard TTL raises the hard TTL with it."""
    p = Policy(soft_ttl=30, hard_ttl=60).with_overrides(soft_ttl=120)
    assert (p.soft_ttl, p.hard_ttl) == (120, 120)
    assert Policy().with_overrides(hard_ttl=700).hard_ttl == 700


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_breaker_opens_probes_and_closes() -> None:
    """Three failures open it; after the cool-down one probe goes through; success closes it."""
    clock = Clock()
    b = Breaker(threshold=3, cooldown=1.0, max_cooldown=4.0, clock=clock)
    for _ in range(3):
        assert b.allow()
        b.failure()
    assert b.is_open and not b.allow()
    clock.t = 1.01
    assert b.allow()  # the probe
    assert not b.allow()  # only one at a time
    b.success()
    assert not b.is_open and b.allow()
    assert b.opened == 1


def test_breaker_backs_off_on_failed_probes_and_frees_abandoned_ones() -> None:
    """A failed probe doubles the cool-down (capped); a cancelled probe lets the next one through."""
    clock = Clock()
    b = Breaker(threshold=1, cooldown=1.0, max_cooldown=3.0, clock=clock)
    b.failure()
    clock.t = 1.01
    assert b.allow()
    b.failure()  # cool-down now 2 s
    clock.t = 2.5
    assert not b.allow()
    clock.t = 3.02
    assert b.allow()
    b.abandon()
    assert b.allow()
    b.failure()  # cool-down capped at 3 s
    clock.t = 6.0
    assert not b.allow()
    clock.t = 6.03
    assert b.allow()


def test_histogram_quantiles_and_registry_snapshot() -> None:
    """Histograms report bucket-bound quantiles; the registry snapshots every function."""
    h = Histogram()
    assert h.quantile(0.5) is None
    for v in (0.0004, 0.0004, 0.003, 0.2):
        h.observe(v)
    assert h.quantile(0.5) == 0.0005
    assert h.quantile(0.99) == 0.25
    reg = MetricsRegistry()
    reg.get("f", "T").counts["hits"] += 2
    snap = reg.snapshot()
    assert snap["f"]["hits"] == 2 and snap["f"]["table"] == "T"


def test_overrides_keep_negative_ttl_following_soft_unless_it_was_set() -> None:
    """An unset negative TTL follows an overridden soft TTL; an explicit one stays."""
    assert Policy(soft_ttl=30, hard_ttl=600).with_overrides(soft_ttl=5).negative_ms == 5000
    explicit = Policy(soft_ttl=30, hard_ttl=600, negative_ttl=2)
    assert explicit.with_overrides(soft_ttl=5).negative_ms == 2000
    assert explicit.with_overrides(negative_ttl=7).negative_ms == 7000
