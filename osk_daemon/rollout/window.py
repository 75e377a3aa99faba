"""Maintenance windows: when an automatic update may deploy.

A window is ``[DAYS ]HH:MM-HH:MM`` in local time: ``Sun 02:00-04:00``, ``Mon-Fri
01:00-03:00``, ``Sat,Sun 00:00-23:59``, or ``22:00-06:00`` (every day; an end before the
start runs past midnight, and such a window belongs to the day it starts on). Pure:
``in_window`` is given the time, it reads no clock.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass

__all__ = ["Window", "in_window", "parse_window"]

_DAYS = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
_RE = re.compile(
    r"^\s*(?:(?P<days>[A-Za-z]{3}(?:-[A-Za-z]{3})?(?:,[A-Za-z]{3}(?:-[A-Za-z]{3})?)*)\s+)?"
    r"(?P<start>\d{1,2}:\d{2})-(?P<end>\d{1,2}:\d{2})\s*$"
)


@dataclass(frozen=True)
class Window:
    days: frozenset[int]  # 0 = Monday
    start: dt.time
    end: dt.time


def _time(text: str, window: str) -> dt.time:
    hours, minutes = (int(p) for p in text.split(":"))
    if hours > 23 or minutes > 59:
        raise ValueError(f"window {window!r}: {text} is not a time of day")
    return dt.time(hours, minutes)


def _day(name: str, window: str) -> int:
    try:
        return _DAYS.index(name.lower())
    except ValueError:
        raise ValueError(f"window {window!r}: unknown day {name!r} (use Mon..Sun)") from None


def parse_window(text: str) -> Window:
    """Raises ValueError with the reason for anything else than the forms above."""
    match = _RE.match(text)
    if match is None:
        raise ValueError(f"window {text!r}: expected '[DAYS ]HH:MM-HH:MM', e.g. 'Sun 02:00-04:00'")
    days: set[int] = set()
    for part in (match["days"] or "mon-sun").split(","):
        first, _, last = part.partition("-")
        a = _day(first, text)
        b = _day(last, text) if last else a
        days.update(range(a, b + 1) if a <= b else [*range(a, 7), *range(0, b + 1)])
    start, end = _time(match["start"], text), _time(match["end"], text)
    if start == end:
        raise ValueError(f"window {text!r}: starts and ends at the same minute")
    return Window(frozenset(days), start, end)


def in_window(window: Window, now: dt.datetime) -> bool:
    """Is ``now`` (local, naive) inside ``window``?"""
    t = now.time().replace(second=0, microsecond=0)
    if window.start < window.end:
        return now.weekday() in window.days and window.start <= t < window.end
    # past midnight: the part before midnight is on a window day, the rest the day after
    if t >= window.start:
        return now.weekday() in window.days
    return t < window.end and (now.weekday() - 1) % 7 in window.days
