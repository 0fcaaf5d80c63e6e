"""The one backoff formula every retry loop uses (ztcore/backoff.py): table of delays, jitter bounds, streaks."""

from __future__ import annotations

import random

import pytest

from ztcore.backoff import Backoff, Streak


@pytest.mark.parametrize(
    ("backoff", "delays"),
    [
        # the certificate manager: 0.5 s doubling to 150 s (pilot-agent's secret cache)
        (Backoff(0.5, 150.0), [0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 150.0, 150.0]),
        # the CA's Secret watch with its default 1 s: five doublings at most, never past 30 s
        (Backoff(1.0, 30.0), [0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]),
        (Backoff(0.05, 1.6), [0.0, 0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 1.6]),
        # a maximum equal to the initial wait: a constant retry
        (Backoff(2.0, 2.0), [0.0, 2.0, 2.0, 2.0]),
    ],
)
def test_delay_doubles_per_failure_up_to_the_maximum(backoff: Backoff, delays: list[float]) -> None:
    assert [backoff.delay(n) for n in range(len(delays))] == delays


def test_a_long_streak_stays_at_the_maximum_without_overflow() -> None:
    assert Backoff(0.1, 15.0).delay(10_000) == 15.0


def test_jitter_stays_within_its_bounds_and_spreads() -> None:
    rng = random.Random(7)
    backoff = Backoff(1.0, 8.0, jitter=(0.8, 1.2))
    draws = [backoff.jittered(3, rng) for _ in range(500)]
    assert all(3.2 <= d <= 4.8 for d in draws)
    assert max(draws) - min(draws) > 1.0
    assert Backoff(1.0, 8.0).jittered(3) == 4.0  # no jitter asked, none given


def test_a_streak_doubles_with_every_wait_and_resets_after_a_success() -> None:
    streak = Streak(Backoff(0.1, 0.4))
    assert [streak.next(), streak.next(failure=False), streak.next(), streak.next()] == [0.1, 0.2, 0.4, 0.4]
    assert streak.reset() == 3  # the waits that followed failures
    assert streak.next() == 0.1


@pytest.mark.parametrize(
    ("initial", "maximum", "jitter"),
    [(0.0, 1.0, (1.0, 1.0)), (2.0, 1.0, (1.0, 1.0)), (1.0, 2.0, (1.2, 0.8)), (1.0, 2.0, (0.0, 1.0))],
)
def test_nonsense_settings_are_refused(initial: float, maximum: float, jitter: tuple[float, float]) -> None:
    with pytest.raises(ValueError, match="backoff"):
        Backoff(initial, maximum, jitter)
