"""Judging a canary: its error rate and p99 latency against the stable version's, same window.

Theory of operation
-------------------
The broker records every answered call of a plugin under rollout in a ``Recorder``: the
version that answered, when (monotonic seconds, passed in), how long it took and whether
it failed. At the end of a canary step the driver asks ``judge`` to compare the two
versions over the step's window. The canary fails when

- it answered fewer than ``min_requests`` calls: no data is a failure, never a pass
  (a canary that receives no traffic has proved nothing);
- its error rate exceeds the stable one's by more than ``max_error_rate_increase``
  (absolute: 0.01 = one point of percentage);
- its p99 latency exceeds ``max_latency_ratio`` times the stable p99, with
  ``latency_floor`` seconds of slack so that two fast versions (0.2 ms against 0.3 ms)
  do not fail on noise.

The stable version is the baseline *in the same window*, so load that slows both does
not fail the canary. ``judge_health`` adds the instances' health at the step's end: the
canary fails when one of its instances is unhealthy or failed (whatever the stable
version's health: a canary is not promoted while it fails its checks), or degraded
while no stable instance is. Each verdict carries a
sentence with the numbers. Pure: no clock.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["AnalysisPolicy", "Recorder", "Verdict", "WindowStats", "judge", "judge_health"]

_BAD = frozenset({"unhealthy", "failed"})


@dataclass(frozen=True)
class AnalysisPolicy:
    min_requests: int = 20
    max_error_rate_increase: float = 0.01
    max_latency_ratio: float = 1.5
    latency_floor: float = 0.005  # seconds


@dataclass(frozen=True)
class WindowStats:
    requests: int
    errors: int
    p99: float  # seconds; 0 without requests

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0


@dataclass(frozen=True)
class Verdict:
    passed: bool
    reason: str


def _p99(latencies: list[float]) -> float:
    if not latencies:
        return 0.0
    ordered = sorted(latencies)
    return ordered[max(0, math.ceil(0.99 * len(ordered)) - 1)]  # nearest rank


class Recorder:
    """Answered calls per version, kept for ``horizon`` seconds. O(1) per record."""

    def __init__(self, horizon: float = 600.0) -> None:
        self.horizon = horizon
        self._calls: dict[str, deque[tuple[float, float, bool]]] = {}

    def record(self, version: str, now: float, latency: float, ok: bool) -> None:
        calls = self._calls.setdefault(version, deque())
        calls.append((now, latency, ok))
        while calls and calls[0][0] < now - self.horizon:
            calls.popleft()

    def window(self, version: str, since: float) -> WindowStats:
        """The calls ``version`` answered at or after ``since``. O(calls in the horizon)."""
        calls = [c for c in self._calls.get(version, ()) if c[0] >= since]
        errors = sum(1 for _, _, ok in calls if not ok)
        return WindowStats(len(calls), errors, _p99([lat for _, lat, _ in calls]))


def judge(stable: WindowStats, canary: WindowStats, policy: AnalysisPolicy) -> Verdict:
    """Pass or fail the canary against the stable version, with the numbers in words."""
    if canary.requests < policy.min_requests:
        return Verdict(
            False,
            f"no data: the canary answered {canary.requests} calls in the window, "
            f"fewer than the {policy.min_requests} needed to judge it",
        )
    rate, base = canary.error_rate, stable.error_rate
    if rate > base + policy.max_error_rate_increase:
        return Verdict(
            False,
            f"error rate {rate:.1%} ({canary.errors}/{canary.requests}) against the stable "
            f"version's {base:.1%}; allowed at most {policy.max_error_rate_increase:.1%} more",
        )
    limit = max(stable.p99 * policy.max_latency_ratio, stable.p99 + policy.latency_floor)
    if canary.p99 > limit:
        return Verdict(
            False,
            f"p99 latency {canary.p99 * 1e3:.1f} ms against the stable version's "
            f"{stable.p99 * 1e3:.1f} ms; allowed at most {limit * 1e3:.1f} ms",
        )
    return Verdict(
        True,
        f"{canary.requests} calls, error rate {rate:.1%} (stable {base:.1%}), "
        f"p99 {canary.p99 * 1e3:.1f} ms (stable {stable.p99 * 1e3:.1f} ms)",
    )


def judge_health(stable: Sequence[str], canary: Sequence[tuple[str, str, str]]) -> Verdict:
    """Fail the canary if one of its instances is unhealthy or failed, or degraded while no
    stable instance is. ``stable``: the health statuses of the stable instances;
    ``canary``: (instance, status, detail) of each. ``unknown`` (no checks configured, or
    none run yet) counts against neither."""
    for leaf, status, detail in canary:
        if status in _BAD or (status == "degraded" and "degraded" not in stable):
            why = f": {detail}" if detail else ""
            healthy = ", ".join(sorted(set(stable))) or "none"
            return Verdict(False, f"health: {leaf} is {status}{why} (stable: {healthy})")
    return Verdict(True, "health no worse than the stable version's")
