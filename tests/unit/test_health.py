"""Health thresholds: every status move of the tracker."""

from __future__ import annotations

import pytest

from osk_daemon.supervisor.health import HealthPolicy, HealthTracker
from osk_daemon.worker.sdk import HealthStatus as H

pytestmark = pytest.mark.timeout(10)


def tracker(**kw: object) -> HealthTracker:
    t = HealthTracker(HealthPolicy(**kw))  # type: ignore[arg-type]
    t.ready(restarted=False)
    return t


def test_starts_unknown_then_healthy() -> None:
    t = tracker()
    assert t.status is H.UNKNOWN
    assert t.check(H.HEALTHY) is False
    assert t.status is H.HEALTHY


def test_failures_below_threshold_degrade_then_unhealthy_restarts_once() -> None:
    t = tracker(failure_threshold=3)
    t.check(H.HEALTHY)
    assert t.check(None) is False
    assert t.status is H.DEGRADED
    assert t.check(H.UNHEALTHY, "db down") is False
    assert t.check(None) is True
    assert t.status is H.UNHEALTHY
    assert t.check(None) is False  # asked once; the restart is under way


def test_no_restart_without_auto_restart() -> None:
    t = tracker(failure_threshold=1, auto_restart=False)
    assert t.check(None) is False
    assert t.status is H.UNHEALTHY


def test_success_threshold_brings_it_back() -> None:
    t = tracker(failure_threshold=1, success_threshold=2, auto_restart=False)
    t.check(None)
    t.check(H.HEALTHY)
    assert t.status is H.UNHEALTHY
    t.check(H.HEALTHY)
    assert t.status is H.HEALTHY


def test_a_success_resets_the_failure_count() -> None:
    t = tracker(failure_threshold=2)
    t.check(None)
    t.check(H.HEALTHY)
    assert t.check(None) is False
    assert t.status is H.DEGRADED


def test_restarted_instance_is_recovering_until_successes() -> None:
    t = HealthTracker(HealthPolicy(success_threshold=2))
    t.ready(restarted=True)
    assert t.status is H.RECOVERING
    t.check(H.HEALTHY)
    assert t.status is H.RECOVERING
    t.check(None)
    assert t.status is H.RECOVERING
    t.check(H.HEALTHY)
    t.check(H.HEALTHY)
    assert t.status is H.HEALTHY


def test_degraded_answer_is_still_an_answer() -> None:
    t = tracker(failure_threshold=1)
    assert t.check(H.DEGRADED, "slow disk") is False
    assert (t.status, t.detail) == (H.DEGRADED, "slow disk")


def test_disabled_checks_mean_healthy_while_ready() -> None:
    t = HealthTracker(HealthPolicy(enabled=False))
    t.ready(restarted=True)
    assert t.status is H.HEALTHY


def test_lost_and_stopped() -> None:
    t = tracker()
    t.lost("SIGKILL")
    assert (t.status, t.detail) == (H.FAILED, "SIGKILL")
    t.stopped()
    assert t.status is H.UNKNOWN


def test_timeout_detail_names_the_timeout() -> None:
    t = tracker(timeout=0.25)
    t.check(None)
    assert "0.25" in t.detail


@pytest.mark.parametrize(("span", "grid"), [(1.0, 0.05), (0.5, 0.05), (0.2, 0.02), (0.05, 0.005)])
def test_probe_times_round_up_to_a_shared_grid(span: float, grid: float) -> None:
    from osk_daemon.supervisor.health_checks import _on_grid

    points = {_on_grid(100.0 + span + k * grid / 7, span) for k in range(7)}
    for k in range(7):
        when = 100.0 + span + k * grid / 7
        assert when <= _on_grid(when, span) <= when + grid * 1.0001
    assert len(points) <= 2  # seven instances due within one grid step share a wake-up
