"""Maintenance windows: parsing and membership, with the time passed in."""

from __future__ import annotations

import datetime as dt
import re

import pytest

from osk_daemon.rollout.window import in_window, parse_window

pytestmark = pytest.mark.timeout(5)

SUN_0300 = dt.datetime(2026, 11, 29, 3, 0)  # a Sunday
MON_0300 = dt.datetime(2026, 11, 30, 3, 0)


@pytest.mark.parametrize(
    ("window", "when", "inside"),
    [
        ("Sun 02:00-04:00", SUN_0300, True),
        ("Sun 02:00-04:00", MON_0300, False),
        ("Sun 02:00-04:00", SUN_0300.replace(hour=4), False),  # the end is excluded
        ("Mon-Fri 01:00-03:30", MON_0300, True),
        ("Sat,Sun 00:00-23:59", SUN_0300, True),
        ("02:00-04:00", MON_0300, True),  # every day
        ("22:00-06:00", MON_0300, True),  # past midnight: Sunday's window, Monday 03:00
        ("Sun 22:00-06:00", MON_0300, True),
        ("Mon 22:00-06:00", MON_0300, False),  # Monday's window starts at 22:00
        ("Fri-Mon 02:00-04:00", SUN_0300, True),  # a range across the week's end
    ],
)
def test_in_window(window: str, when: dt.datetime, inside: bool) -> None:
    assert in_window(parse_window(window), when) is inside


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("sometime", "expected '[DAYS ]HH:MM-HH:MM'"),
        ("Sun 25:00-26:00", "is not a time of day"),
        ("Sno 02:00-04:00", "unknown day 'Sno'"),
        ("02:00-02:00", "same minute"),
    ],
)
def test_bad_windows(text: str, reason: str) -> None:
    with pytest.raises(ValueError, match=re.escape(reason)):
        parse_window(text)
