"""A latency histogram as plain integer buckets: cheap enough for the broker's hot path.

``observe`` is a bisect and two additions; ``cumulative`` gives Prometheus' view (upper
bound -> count of observations at or below it, ending with ``+Inf``) at scrape time.
"""

from __future__ import annotations

from bisect import bisect_left

__all__ = ["DEFAULT_BOUNDS", "Buckets"]

DEFAULT_BOUNDS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)


class Buckets:
    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...] = DEFAULT_BOUNDS) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one: above every bound
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(self.bounds, seconds)] += 1
        self.sum += seconds

    def observe_many(self, count: int, total: float) -> None:
        """``count`` observations ``total`` seconds long in all, known only as a sum: each
        is counted at their mean (the sum stays exact)."""
        if count > 0:
            self.counts[bisect_left(self.bounds, total / count)] += count
            self.sum += total

    def cumulative(self) -> list[tuple[str, float]]:
        out: list[tuple[str, float]] = []
        running = 0
        for bound, count in zip((*map(repr, self.bounds), "+Inf"), self.counts, strict=True):
            running += count
            out.append((bound, float(running)))
        return out
