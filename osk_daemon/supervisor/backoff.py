"""Restart delays for one child: immediate first, then exponential with jitter.

A crashing child must not burn CPU or its group's restart intensity while whatever it
depends on recovers (the reason OTP users keep asking for delayed restarts, and systemd
for ``RestartSteps=``). The rule, per child:

- the first restart of a series is immediate;
- the n-th consecutive restart (n >= 2) waits ``min(max, base * factor**(n-2))``, scaled by
  ``1 + jitter*(2*rand - 1)`` so that siblings crashing together do not restart in lockstep;
- a child that stayed up ``reset_after`` seconds since its last start begins a new series
  (systemd#43813 is the complaint about supervisors that never forget).

Pure: the caller passes the time and the random number, so tests are exact.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BackoffPolicy:
    """How restart delays grow. All times in seconds; ``jitter`` is a fraction (0.1 = ±10%)."""

    base: float = 0.1
    factor: float = 2.0
    max: float = 30.0
    jitter: float = 0.1
    reset_after: float = 10.0

    def __post_init__(self) -> None:
        if self.base < 0 or self.max < 0 or self.reset_after < 0:
            raise ValueError(f"backoff times must be >= 0, got {self}")
        if self.factor < 1:
            raise ValueError(f"backoff factor must be >= 1, got {self.factor}")
        if not 0 <= self.jitter <= 1:
            raise ValueError(f"backoff jitter must be within [0, 1], got {self.jitter}")


class Backoff:
    """The restart-delay state of one child. Cheap: two numbers."""

    def __init__(self, policy: BackoffPolicy) -> None:
        self._policy = policy
        self._consecutive = 0
        self._started_at: float | None = None

    @property
    def policy(self) -> BackoffPolicy:
        return self._policy

    @property
    def consecutive(self) -> int:
        """Restarts in the current series (0 before the first one and after a reset)."""
        return self._consecutive

    def started(self, now: float) -> None:
        """The child started (is up) at ``now``; its uptime is measured from here."""
        self._started_at = now

    def next_delay(self, now: float, rand: float) -> float:
        """A restart is needed at ``now``: count it and return how long to wait (>= 0).

        ``rand`` is a uniform random number in [0, 1); raises ValueError otherwise.
        """
        if not 0.0 <= rand < 1.0:
            raise ValueError(f"rand must be in [0, 1), got {rand}")
        p = self._policy
        if self._started_at is not None and now - self._started_at >= p.reset_after:
            self._consecutive = 0
        self._consecutive += 1
        if self._consecutive == 1:
            return 0.0
        try:
            raw = p.base * p.factor ** (self._consecutive - 2)
        except OverflowError:
            raw = p.max
        delay = min(p.max, raw) * (1.0 + p.jitter * (2.0 * rand - 1.0))
        return max(0.0, delay)
