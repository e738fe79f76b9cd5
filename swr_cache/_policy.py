"""Validated configuration objects."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from ._errors import ConfigError

__all__ = ["Policy"]


def _positive(name: str, value: float) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a number of seconds, got {value!r}") from None
    if not math.isfinite(number) or number <= 0:
        raise ConfigError(f"{name} must be a positive number of seconds, got {value!r}")
    return number


@dataclass(frozen=True, slots=True)
class Policy:
    """How long entries live and how they are refreshed.

    Args:
        soft_ttl: seconds an entry is fresh. After it, the entry is served
            stale while one background task refreshes it.
        hard_ttl: seconds after which the entry is gone (``soft_ttl <= hard_ttl``).
        negative_ttl: seconds a not-found answer (``None``) is cached; defaults
            to ``soft_ttl``. Negative entries are never served stale.
        jitter: fraction in ``[0, 1)``; each fill shortens its soft TTL by a
            random part of it so keys filled together do not expire together.
        early_refresh: XFetch's beta (Vattani et al., VLDB 2015). With ``beta > 0``
            a fresh hit may start a background refresh shortly before the soft
            TTL, with a probability that rises as it nears, scaled by how long
            the last load took. ``0`` turns it off.

    Raises:
        ConfigError: for non-positive or non-finite TTLs, ``soft_ttl > hard_ttl``,
            or a jitter outside ``[0, 1)``.
    """

    soft_ttl: float = 30.0
    hard_ttl: float = 600.0
    negative_ttl: float | None = None
    jitter: float = 0.0
    early_refresh: float = 1.0
    # Derived, in milliseconds.
    soft_ms: int = field(init=False, repr=False)
    hard_ms: int = field(init=False, repr=False)
    negative_ms: int = field(init=False, repr=False)
    # negative_ttl was left to follow soft_ttl (kept so overrides follow it too).
    negative_follows_soft: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        soft = _positive("soft_ttl", self.soft_ttl)
        hard = _positive("hard_ttl", self.hard_ttl)
        if soft > hard:
            raise ConfigError(f"soft_ttl ({soft}) must not exceed hard_ttl ({hard})")
        negative = (
            soft if self.negative_ttl is None else _positive("negative_ttl", self.negative_ttl)
        )
        if not (0.0 <= float(self.jitter) < 1.0):
            raise ConfigError(f"jitter must be in [0, 1), got {self.jitter!r}")
        if not (math.isfinite(float(self.early_refresh)) and self.early_refresh >= 0):
            raise ConfigError(f"early_refresh must be >= 0, got {self.early_refresh!r}")
        object.__setattr__(self, "soft_ttl", soft)
        object.__setattr__(self, "hard_ttl", hard)
        object.__setattr__(self, "negative_follows_soft", self.negative_ttl is None)
        object.__setattr__(self, "negative_ttl", negative)
        object.__setattr__(self, "soft_ms", max(1, round(soft * 1000)))
        object.__setattr__(self, "hard_ms", max(1, round(hard * 1000)))
        object.__setattr__(self, "negative_ms", max(1, round(negative * 1000)))

    def with_overrides(
        self,
        *,
        soft_ttl: float | None = None,
        hard_ttl: float | None = None,
        negative_ttl: float | None = None,
        jitter: float | None = None,
        early_refresh: float | None = None,
    ) -> Policy:
        """A copy with the given fields replaced (``None`` keeps the current one).

        When only ``soft_ttl`` is given and it exceeds the inherited hard TTL,
        the hard TTL grows to match rather than raising. A negative TTL that was
        never set keeps following the soft TTL.
        """
        if negative_ttl is None and not self.negative_follows_soft:
            negative_ttl = self.negative_ttl
        soft = self.soft_ttl if soft_ttl is None else soft_ttl
        hard = self.hard_ttl if hard_ttl is None else hard_ttl
        if hard_ttl is None and soft_ttl is not None and soft_ttl > hard:
            hard = soft_ttl
        return replace(
            self,
            soft_ttl=soft,
            hard_ttl=hard,
            negative_ttl=negative_ttl,
            jitter=self.jitter if jitter is None else jitter,
            early_refresh=self.early_refresh if early_refresh is None else early_refresh,
        )
