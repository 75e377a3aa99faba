"""Which version of a plugin gets a request: pins, sticky keys and weights.

Theory of operation
-------------------
A ``TrafficSplit`` holds a plugin's versions with integer weights (percent; they need not
add up to 100, only their ratio counts). ``choose`` picks a version for one request:

1. A request that pins a version (the ``version`` field of its header) gets that version
   if the split has it; otherwise ``None``, and the broker answers ``unavailable``: a pin
   is a promise, never silently broken.
2. A request with a key (A/B by user, tenant, session) is hashed to a point in
   [0, 10000). Versions own consecutive slices of that line in a fixed order — the newest
   version first — sized by their weights. The same key lands on the same version while
   the weights stay, and when the canary's weight grows (5% -> 25%), its slice grows at
   the end: every key that was on the canary stays there, only stable keys move. That is
   the consistency that matters for a gray release.
3. Anything else is spread by smooth weighted round-robin (nginx's algorithm): exact
   proportions over every window of sum(weights) requests, deterministic, no randomness.

Pure: no clock, no I/O. The hash is BLAKE2b (stable across processes and restarts,
unlike ``hash()``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

__all__ = ["TrafficSplit"]

_POINTS = 10_000


def _point(key: str) -> int:
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % _POINTS


class TrafficSplit:
    """Versions of one plugin and their weights. ``order`` lists versions newest first."""

    def __init__(self, weights: Mapping[str, int], order: list[str] | None = None) -> None:
        """Raises ValueError for a negative weight, no positive weight, or an ``order``
        that is not the versions of ``weights``."""
        if any(w < 0 for w in weights.values()):
            raise ValueError(f"weights must be >= 0, got {dict(weights)}")
        if not any(weights.values()):
            raise ValueError(f"at least one version needs a weight above 0, got {dict(weights)}")
        self.order = list(order) if order is not None else sorted(weights, reverse=True)
        if sorted(self.order) != sorted(weights):
            raise ValueError(f"order {self.order} does not list the versions {sorted(weights)}")
        self.weights = {v: weights[v] for v in self.order}
        total = sum(self.weights.values())
        self._slices: list[tuple[int, str]] = []  # (end point, version); the last ends at 10000
        running = 0
        for version in self.order:
            running += self.weights[version]
            self._slices.append((running * _POINTS // total, version))
        self._current = dict.fromkeys(self.order, 0)

    def choose(self, pin: str | None = None, key: str | None = None) -> str | None:
        """The version for one request (None: a pin this split does not have)."""
        if pin:
            return pin if self.weights.get(pin) is not None else None
        if key is not None:
            point = _point(key)
            return next(version for end, version in self._slices if point < end)
        total = 0
        best: str | None = None
        for version, weight in self.weights.items():
            if not weight:
                continue
            self._current[version] += weight
            total += weight
            if best is None or self._current[version] > self._current[best]:
                best = version
        assert best is not None
        self._current[best] -= total
        return best
