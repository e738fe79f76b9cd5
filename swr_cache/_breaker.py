"""A circuit breaker that lets reads bypass Redis while it is down."""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["Breaker"]


class Breaker:
    """Opens after ``threshold`` consecutive failures; recovers by itself.

    While open, ``allow()`` is false until the cool-down passes; then one probe
    is let through (half-open). A success closes the breaker; a failure opens it
    again with a doubled cool-down, up to ``max_cooldown``.
    """

    __slots__ = (
        "_clock",
        "_cooldown",
        "_failures",
        "_open_until",
        "_probing",
        "base_cooldown",
        "max_cooldown",
        "opened",
        "threshold",
    )

    def __init__(
        self,
        threshold: int = 3,
        cooldown: float = 0.5,
        max_cooldown: float = 15.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.threshold = threshold
        self.base_cooldown = cooldown
        self.max_cooldown = max_cooldown
        self._clock = clock
        self._failures = 0
        self._cooldown = cooldown
        self._open_until = 0.0
        self._probing = False
        self.opened = 0

    @property
    def is_open(self) -> bool:
        return self._failures >= self.threshold

    def allow(self) -> bool:
        """May a Redis call go ahead now?"""
        if self._failures < self.threshold:
            return True
        if self._probing or self._clock() < self._open_until:
            return False
        self._probing = True
        return True

    @property
    def probing(self) -> bool:
        """A half-open probe is under way (its caller must report how it went)."""
        return self._probing

    def abandon(self) -> None:
        """A call ended with neither success nor failure (cancelled): free the probe slot."""
        self._probing = False

    def success(self) -> None:
        if self._failures:
            self._failures = 0
            self._cooldown = self.base_cooldown
            self._probing = False

    def failure(self) -> None:
        self._failures += 1
        if self._failures >= self.threshold:
            if self._probing:
                self._cooldown = min(self._cooldown * 2, self.max_cooldown)
            elif self._failures == self.threshold:
                self.opened += 1
            self._probing = False
            self._open_until = self._clock() + self._cooldown
