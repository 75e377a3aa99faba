"""Health of one instance: thresholds over in-band checks and heartbeats, as a pure core.

Theory of operation
-------------------
The driver sends a HEALTH request every ``interval`` and feeds the outcome here: the
status the plugin reported, or ``None`` when it did not answer within ``timeout``. The
six statuses are the ObjectStack spec's:

- UNKNOWN: no verdict yet (just started, or not running).
- HEALTHY / DEGRADED: the plugin says so. A DEGRADED answer is still an answer; it
  clears the failure count.
- Failures (an UNHEALTHY answer or no answer) below ``failure_threshold`` in a row show
  as DEGRADED; reaching it makes the instance UNHEALTHY and, with ``auto_restart``, asks
  the driver to restart it.
- RECOVERING: a restarted instance until ``success_threshold`` healthy answers in a row.
  Those thresholds also bring an UNHEALTHY or DEGRADED instance back to HEALTHY.
- FAILED: the process died or hung (heartbeats stopped).

With checks disabled an instance counts as HEALTHY while it is ready.
"""

from __future__ import annotations

from dataclasses import dataclass

from osk_daemon.worker.sdk import HealthStatus

H = HealthStatus


@dataclass(frozen=True, slots=True)
class HealthPolicy:
    enabled: bool = True
    interval: float = 1.0
    timeout: float = 0.5
    failure_threshold: int = 3
    success_threshold: int = 1
    auto_restart: bool = True


class HealthTracker:
    """Thresholds for one instance. ``check`` returns True when it must be restarted."""

    def __init__(self, policy: HealthPolicy) -> None:
        self.policy = policy
        self.status = H.UNKNOWN
        self.detail = ""
        self.failures = 0
        self.successes = 0

    def ready(self, restarted: bool) -> None:
        self.failures = self.successes = 0
        self.detail = ""
        if not self.policy.enabled:
            self.status = H.HEALTHY
        else:
            self.status = H.RECOVERING if restarted else H.UNKNOWN

    def check(self, result: HealthStatus | None, detail: str = "") -> bool:
        """Record one check's outcome (None = no answer in time)."""
        self.detail = detail
        if result in (H.HEALTHY, H.DEGRADED):
            self.failures = 0
            self.successes += 1
            if result is H.DEGRADED:
                self.status = H.DEGRADED
            elif self.status in (H.HEALTHY, H.UNKNOWN) or (
                self.successes >= self.policy.success_threshold
            ):
                self.status = H.HEALTHY
            return False
        self.successes = 0
        self.failures += 1
        if result is None and not detail:
            self.detail = f"no answer within {self.policy.timeout:g}s"
        if self.failures < self.policy.failure_threshold:
            if self.status is not H.RECOVERING:
                self.status = H.DEGRADED
            return False
        self.status = H.UNHEALTHY
        return self.policy.auto_restart and self.failures == self.policy.failure_threshold

    def lost(self, detail: str) -> None:
        """The process exited or hung."""
        self.status = H.FAILED
        self.detail = detail

    def stopped(self) -> None:
        self.status = H.UNKNOWN
        self.detail = ""
