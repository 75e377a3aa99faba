"""Restart delays: immediate first, exponential after, capped, jittered, reset by uptime."""

from __future__ import annotations

import pytest

from osk_daemon.supervisor.backoff import Backoff, BackoffPolicy

pytestmark = pytest.mark.timeout(10)

NO_JITTER = BackoffPolicy(base=0.1, factor=2.0, max=1.0, jitter=0.0, reset_after=10.0)


def delays(b: Backoff, n: int, now: float = 0.0, rand: float = 0.5) -> list[float]:
    return [b.next_delay(now, rand) for _ in range(n)]


def test_first_restart_is_immediate_then_exponential_then_capped() -> None:
    b = Backoff(NO_JITTER)
    assert b.consecutive == 0
    assert delays(b, 7) == pytest.approx([0.0, 0.1, 0.2, 0.4, 0.8, 1.0, 1.0])
    assert b.consecutive == 7


@pytest.mark.parametrize(
    ("rand", "expected"),
    [(0.0, 0.09), (0.5, 0.1), (0.999999, 0.11)],
)
def test_jitter_scales_the_delay(rand: float, expected: float) -> None:
    b = Backoff(BackoffPolicy(base=0.1, jitter=0.1))
    b.next_delay(0.0, rand)
    assert b.next_delay(0.0, rand) == pytest.approx(expected, rel=1e-4)


def test_jitter_applies_after_the_cap_and_never_goes_negative() -> None:
    b = Backoff(BackoffPolicy(base=5.0, max=1.0, jitter=1.0))
    b.next_delay(0.0, 0.0)
    assert b.next_delay(0.0, 0.0) == 0.0
    assert b.next_delay(0.0, 0.75) == pytest.approx(1.5)


def test_long_uptime_resets_the_series() -> None:
    b = Backoff(NO_JITTER)
    b.started(0.0)
    assert delays(b, 3, now=1.0) == pytest.approx([0.0, 0.1, 0.2])
    b.started(2.0)
    assert b.next_delay(11.9, 0.5) == pytest.approx(0.4)  # up 9.9 s: still the same series
    b.started(12.0)
    assert b.next_delay(22.0, 0.5) == 0.0  # up exactly reset_after: a new series
    assert b.consecutive == 1


def test_no_start_recorded_means_no_reset() -> None:
    b = Backoff(NO_JITTER)
    assert delays(b, 2, now=1000.0) == pytest.approx([0.0, 0.1])


def test_huge_counts_do_not_overflow() -> None:
    b = Backoff(BackoffPolicy(base=1.0, factor=10.0, max=30.0, jitter=0.0))
    assert delays(b, 2000)[-1] == 30.0


@pytest.mark.parametrize("rand", [-0.1, 1.0, 2.0])
def test_rand_outside_unit_interval_is_refused(rand: float) -> None:
    with pytest.raises(ValueError, match="rand"):
        Backoff(BackoffPolicy()).next_delay(0.0, rand)


@pytest.mark.parametrize(
    "kwargs",
    [{"base": -1.0}, {"factor": 0.5}, {"max": -1.0}, {"jitter": 1.5}, {"reset_after": -1.0}],
)
def test_bad_policies_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        BackoffPolicy(**kwargs)
