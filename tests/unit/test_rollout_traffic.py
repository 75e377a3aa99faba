"""Traffic split and canary analysis: pure tables, no processes."""

from __future__ import annotations

from collections import Counter

import pytest

from osk_daemon.rollout.analysis import AnalysisPolicy, Recorder, WindowStats, judge, judge_health
from osk_daemon.rollout.traffic import TrafficSplit

pytestmark = pytest.mark.timeout(10)


@pytest.mark.parametrize(
    ("weights", "n"), [({"1.0.0": 95, "2.0.0": 5}, 100), ({"1.0.0": 1, "2.0.0": 2}, 300)]
)
def test_round_robin_gives_exact_shares_over_each_window(weights: dict[str, int], n: int) -> None:
    split = TrafficSplit(weights)
    picks = Counter(split.choose() for _ in range(n))
    total = sum(weights.values())
    assert picks == Counter({v: w * n // total for v, w in weights.items()})


def test_zero_weight_gets_nothing_and_pins_are_kept() -> None:
    split = TrafficSplit({"1.0.0": 100, "2.0.0": 0})
    assert {split.choose() for _ in range(50)} == {"1.0.0"}
    assert {split.choose(key=f"user-{i}") for i in range(200)} == {"1.0.0"}
    assert split.choose(pin="2.0.0") == "2.0.0"  # an explicit pin reaches even 0%
    assert split.choose(pin="3.0.0") is None


def test_keys_are_sticky_and_a_growing_canary_keeps_its_keys() -> None:
    keys = [f"user-{i}" for i in range(2000)]
    small = TrafficSplit({"1.0.0": 95, "2.0.0": 5})
    big = TrafficSplit({"1.0.0": 75, "2.0.0": 25})
    on_canary = {k for k in keys if small.choose(key=k) == "2.0.0"}
    assert [small.choose(key=k) for k in keys] == [small.choose(key=k) for k in keys]
    assert on_canary <= {k for k in keys if big.choose(key=k) == "2.0.0"}
    share = sum(1 for k in keys if big.choose(key=k) == "2.0.0") / len(keys)
    assert 0.2 < share < 0.3
    assert 0.02 < len(on_canary) / len(keys) < 0.08


@pytest.mark.parametrize(
    ("weights", "order", "message"),
    [
        ({"1.0.0": -1, "2.0.0": 5}, None, "must be >= 0"),
        ({"1.0.0": 0}, None, "at least one version"),
        ({"1.0.0": 1}, ["2.0.0"], "does not list"),
    ],
)
def test_bad_splits(weights: dict[str, int], order: list[str] | None, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TrafficSplit(weights, order)


POLICY = AnalysisPolicy(min_requests=20, max_error_rate_increase=0.01, max_latency_ratio=1.5)


@pytest.mark.parametrize(
    ("stable", "canary", "passed", "words"),
    [
        (WindowStats(100, 0, 0.010), WindowStats(5, 0, 0.010), False, "no data"),
        (WindowStats(100, 0, 0.010), WindowStats(0, 0, 0.0), False, "no data"),
        (WindowStats(100, 1, 0.010), WindowStats(100, 5, 0.010), False, "error rate 5.0%"),
        (WindowStats(100, 1, 0.010), WindowStats(100, 2, 0.010), True, "error rate 2.0%"),
        (WindowStats(100, 0, 0.020), WindowStats(100, 0, 0.040), False, "p99 latency 40.0 ms"),
        (WindowStats(100, 0, 0.020), WindowStats(100, 0, 0.029), True, "p99 29.0 ms"),
        # two fast versions: 0.2 ms against 0.6 ms is within the 5 ms floor
        (WindowStats(100, 0, 0.0002), WindowStats(100, 0, 0.0006), True, "p99 0.6 ms"),
    ],
)
def test_judge(stable: WindowStats, canary: WindowStats, passed: bool, words: str) -> None:
    verdict = judge(stable, canary, POLICY)
    assert verdict.passed is passed
    assert words in verdict.reason


@pytest.mark.parametrize(
    ("stable", "canary", "passed", "words"),
    [
        (["healthy"], [("c/1", "healthy", "")], True, "no worse"),
        (["healthy"], [("c/1", "unhealthy", "db down")], False, "c/1 is unhealthy: db down"),
        (["healthy"], [("c/1", "healthy", ""), ("c/2", "failed", "")], False, "c/2 is failed"),
        (["healthy", "healthy"], [("c/1", "degraded", "slow")], False, "(stable: healthy)"),
        (["degraded"], [("c/1", "degraded", "slow")], True, "no worse"),  # both degraded
        (["healthy"], [("c/1", "unknown", "")], True, "no worse"),  # no checks: no verdict
        ([], [("c/1", "unhealthy", "")], False, "(stable: none)"),
    ],
)
def test_judge_health(
    stable: list[str], canary: list[tuple[str, str, str]], passed: bool, words: str
) -> None:
    verdict = judge_health(stable, canary)
    assert verdict.passed is passed
    assert words in verdict.reason


def test_recorder_windows_and_horizon() -> None:
    rec = Recorder(horizon=10.0)
    for i in range(100):
        rec.record("2.0.0", now=float(i), latency=0.001 * (i % 10 + 1), ok=i % 25 != 0)
    stats = rec.window("2.0.0", since=90.0)
    assert (stats.requests, stats.errors) == (10, 0)
    assert stats.p99 == pytest.approx(0.010)
    assert rec.window("2.0.0", since=0.0).requests == 11  # older calls fell off the horizon
    assert rec.window("1.0.0", since=0.0) == WindowStats(0, 0, 0.0)
