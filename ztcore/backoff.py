"""Exponential backoff, one formula for every retry loop: the n-th consecutive failure waits
initial x 2^(n-1), capped at `maximum`, times a jitter factor drawn from `jitter` (so that many clients that
failed together do not retry together)."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Backoff:
    initial: float
    maximum: float
    jitter: tuple[float, float] = (1.0, 1.0)

    def __post_init__(self) -> None:
        if self.initial <= 0 or self.maximum < self.initial:
            raise ValueError(f"backoff needs 0 < initial <= maximum, got {self.initial} and {self.maximum}")
        low, high = self.jitter
        if not 0 < low <= high:
            raise ValueError(f"backoff jitter needs 0 < low <= high, got {self.jitter}")

    def delay(self, failures: int) -> float:
        """The wait after the `failures`-th failure in a row, before jitter (0 before any failure)."""
        if failures <= 0:
            return 0.0
        # capped exponent: no float overflow however long the streak, and the cap is reached long before
        return min(self.initial * 2.0 ** min(failures - 1, 60), self.maximum)

    def jittered(self, failures: int, rng: random.Random | None = None) -> float:
        low, high = self.jitter
        factor = (rng or random).uniform(low, high) if low != high else low
        return self.delay(failures) * factor


class Streak:
    """A retry loop's state: how many attempts since the last success, and the next wait."""

    __slots__ = ("_rng", "attempts", "backoff", "failures")

    def __init__(self, backoff: Backoff, rng: random.Random | None = None) -> None:
        self.backoff = backoff
        self.attempts = 0  # waits taken since the last reset (each doubles the next)
        self.failures = 0  # of those, the ones that were failures (for the log)
        self._rng = rng

    def next(self, *, failure: bool = True) -> float:
        """The next wait: it doubles with every wait since the last reset, whether or not it followed a failure."""
        self.attempts += 1
        self.failures += failure
        return self.backoff.jittered(self.attempts, self._rng)

    def reset(self) -> int:
        """Back to the initial wait; returns how many failures the streak had."""
        failures, self.failures, self.attempts = self.failures, 0, 0
        return failures
