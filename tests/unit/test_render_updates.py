"""``oskctl updates`` output: one line per plugin, with why an update failed or waits."""

from __future__ import annotations

import pytest

from osk_daemon.control.render_rollout import format_updates

pytestmark = pytest.mark.timeout(10)


def test_updates_say_what_failed_and_what_waits() -> None:
    rows = [
        {"plugin": "a", "running": "1.0.0", "available": "1.1.0", "mode": "manual"},
        {
            "plugin": "b",
            "running": "1.0.0",
            "available": "1.2.0",
            "mode": "auto",
            "window": "Sun 02:00-04:00",
            "in_window": True,
            "failed": "analysis failed: error rate 5.0%",
        },
        {
            "plugin": "c",
            "running": "2.0.0",
            "available": "2.1.0",
            "mode": "auto",
            "waiting": "'c' has stopped instances; start it before deploying",
        },
    ]
    text = format_updates(rows)
    assert "a: 1.0.0 -> 1.1.0 (manual, any time)" in text
    assert "b: 1.0.0 -> 1.2.0 (auto, window Sun 02:00-04:00 (open now))" in text
    assert "last try failed: analysis failed: error rate 5.0%" in text
    assert "waiting: 'c' has stopped instances" in text
    assert format_updates([]).startswith("no updates")
