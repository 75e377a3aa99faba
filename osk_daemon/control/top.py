"""``oskctl top``: a live view of the instances, refreshed every ``--interval`` seconds.

Each refresh asks the daemon for ``status`` and shows, per instance, what changed since
the previous refresh: CPU (percent of one core, from the cgroup's cpu seconds), memory,
pids, calls per second and errors (from the broker's per-instance counters), next to
state, health and restarts. Rates need two samples, so the first screen shows ``-``.
On a terminal the screen is redrawn in place; piped, each refresh is appended.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Mapping, Sequence

from osk_daemon.control.render import format_table

TYPE_CHECKING = False  # typing's constant without importing typing: oskctl starts lean
if TYPE_CHECKING:
    from typing import Any

    Sample = tuple[float, Mapping[tuple[str, int, Any], Mapping[str, Any]]]

__all__ = ["format_top", "run_top"]

HEADERS = [
    "PLUGIN",
    "INST",
    "VERSION",
    "PID",
    "STATE",
    "HEALTH",
    "CPU%",
    "MEM",
    "PIDS",
    "CALLS/S",
    "ERR/S",
    "RESTARTS",
]


def _mem(n: int) -> str:
    for unit, factor in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= factor:
            return f"{n / factor:.1f}{unit}"
    return f"{n}B"


def _key(row: Mapping[str, Any]) -> tuple[str, int, Any]:
    return (str(row.get("plugin")), int(row.get("instance") or 0), row.get("pid"))


def _rate(
    now: Mapping[str, Any],
    before: Mapping[str, Any] | None,
    field: str,
    dt: float,
    scale: float = 1.0,
) -> str:
    if before is None or dt <= 0 or now.get(field) is None or before.get(field) is None:
        return "-"
    delta = (float(now[field]) - float(before[field])) / dt * scale
    return f"{max(delta, 0.0):.1f}"


def format_top(rows: Sequence[Mapping[str, Any]], previous: Sample | None, at: float) -> str:
    """One screen: ``rows`` from ``status`` at ``at`` (monotonic), rates against
    ``previous``."""
    before = previous[1] if previous else {}
    dt = at - previous[0] if previous else 0.0
    table = []
    for row in rows:
        old = before.get(_key(row))
        memory = row.get("memory_bytes")
        table.append(
            [
                str(row.get("plugin", "")),
                str(row.get("instance", "")),
                str(row.get("version", "")),
                str(row.get("pid") or "-"),
                str(row.get("state", "")),
                str(row.get("health", "")),
                _rate(row, old, "cpu_s", dt, 100.0),
                _mem(memory) if isinstance(memory, int) else "-",
                str(row.get("pids", "-")),
                _rate(row, old, "calls", dt),
                _rate(row, old, "errors", dt),
                str(row.get("restarts", "")),
            ]
        )
    return format_table(HEADERS, table)


def run_top(
    fetch: Callable[[], list[Mapping[str, Any]]],
    interval: float,
    iterations: int | None,
    out: Callable[[str], None],
) -> None:
    """Refresh until interrupted (or ``iterations`` screens)."""
    previous: Sample | None = None
    redraw = sys.stdout.isatty()
    count = 0
    while iterations is None or count < iterations:
        rows = fetch()
        at = time.monotonic()
        screen = format_top(rows, previous, at)
        stamp = time.strftime("%H:%M:%S")
        out(
            ("\x1b[H\x1b[2J" if redraw else "") + f"osk-daemon top, {stamp}, every "
            f"{interval:g}s\n{screen}\n"
        )
        previous = (at, {_key(r): r for r in rows})
        count += 1
        if iterations is None or count < iterations:
            time.sleep(interval)  # a display refresh rate, not a synchronisation
