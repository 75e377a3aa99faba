"""oskctl top's screen: rates from two samples, no daemon needed."""

from __future__ import annotations

import pytest

from osk_daemon.control.top import format_top, run_top

pytestmark = pytest.mark.timeout(10)

ROW = {
    "plugin": "echo",
    "instance": 0,
    "version": "1.0.0",
    "pid": 42,
    "state": "ready",
    "health": "healthy",
    "memory_bytes": 3 * 1024 * 1024,
    "pids": 3,
    "restarts": 1,
}


def test_first_screen_has_no_rates_then_rates_per_second() -> None:
    first = format_top([{**ROW, "cpu_s": 1.0, "calls": 100, "errors": 0}], None, 10.0)
    assert "CALLS/S" in first and "3.0MiB" in first
    line = first.splitlines()[-1].split()
    assert line[6] == "-" and line[9] == "-"
    previous = (10.0, {("echo", 0, 42): {**ROW, "cpu_s": 1.0, "calls": 100, "errors": 0}})
    second = format_top([{**ROW, "cpu_s": 1.5, "calls": 300, "errors": 4}], previous, 12.0)
    cols = second.splitlines()[-1].split()
    assert cols[6] == "25.0"  # 0.5 cpu seconds over 2 s = 25% of a core
    assert cols[9] == "100.0"  # 200 calls over 2 s
    assert cols[10] == "2.0"


def test_a_new_pid_starts_its_rates_afresh() -> None:
    previous = (0.0, {("echo", 0, 41): {**ROW, "pid": 41, "cpu_s": 9.0, "calls": 900}})
    screen = format_top([{**ROW, "cpu_s": 0.1, "calls": 5, "errors": 0}], previous, 1.0)
    assert screen.splitlines()[-1].split()[9] == "-"


def test_run_top_stops_after_n_screens() -> None:
    screens: list[str] = []
    run_top(lambda: [{**ROW, "calls": 1}], 0.01, 3, screens.append)
    assert len(screens) == 3
    assert all("osk-daemon top" in s for s in screens)
