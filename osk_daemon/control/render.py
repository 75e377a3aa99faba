"""How ``oskctl`` shows the daemon's answers to a human (or, with ``--json``, to a script).

Why: keeping formatting apart from the socket code makes it testable without a daemon and
keeps ``oskctl`` itself about arguments, connections and exit codes.

How: pure functions from decoded JSON values to strings, standard library only (``oskctl``
must start fast). Missing or ``None`` cells render as ``-``; everything tolerates extra or
missing keys, since the daemon may add fields.
"""

from __future__ import annotations

import datetime as _dt
import json
from collections.abc import Mapping, Sequence
from typing import Any

STATUS_COLUMNS: tuple[tuple[str, str], ...] = (
    ("PLUGIN", "plugin"),
    ("INSTANCE", "instance"),
    ("VERSION", "version"),
    ("PID", "pid"),
    ("STATE", "state"),
    ("HEALTH", "health"),
    ("RESTARTS", "restarts"),
    ("UPTIME", "uptime_s"),
    ("LAST EXIT", "last_exit"),
)


def format_uptime(seconds: float | None) -> str:
    """``3.2s``, ``5m12s``, ``2h03m``, ``4d07h``; ``None`` -> ``-``; negatives count as 0."""
    if seconds is None:
        return "-"
    seconds = max(0.0, float(seconds))
    if round(seconds, 1) < 60:
        return f"{seconds:.1f}s"
    whole = round(seconds)
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    if whole < 86400:
        return f"{whole // 3600}h{whole % 3600 // 60:02d}m"
    return f"{whole // 86400}d{whole % 86400 // 3600:02d}h"


def format_cell(value: Any) -> str:
    """One table cell: ``-`` for nothing, ``k=v`` pairs for objects, compact JSON for lists."""
    if value is None or value == "":
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, Mapping):
        return " ".join(f"{k}={format_cell(v)}" for k, v in value.items()) or "-"
    if isinstance(value, list):
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    return str(value)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns separated by two spaces, no trailing blanks, no final newline."""
    widths = [len(h) for h in headers]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    lines = []
    for row in (headers, *rows):
        line = "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        lines.append(line.rstrip())
    return "\n".join(lines)


def format_status(rows: Sequence[Mapping[str, Any]]) -> str:
    """The ``oskctl status`` table for the daemon's list of instance dicts."""
    cells = []
    for row in rows:
        line = []
        for _, key in STATUS_COLUMNS:
            value = row.get(key)
            line.append(format_uptime(value) if key == "uptime_s" else format_cell(value))
        cells.append(line)
    return format_table([header for header, _ in STATUS_COLUMNS], cells)


def format_json(value: Any) -> str:
    """Pretty JSON (indent 2) exactly as ``--json`` prints it."""
    return json.dumps(value, indent=2, ensure_ascii=False)


def format_json_line(value: Any) -> str:
    """One JSON value on one line (for ``events`` and ``logs --json``)."""
    return json.dumps(value, ensure_ascii=False)


def format_message(value: Any) -> str:
    """A command's short answer: strings as they are, anything else as pretty JSON."""
    if isinstance(value, str):
        return value
    return format_json(value)


def format_log_line(item: Mapping[str, Any]) -> str:
    """``HH:MM:SS.mmm name/instance line`` in local time; tolerates missing keys."""
    ts = item.get("ts")
    if isinstance(ts, int | float) and not isinstance(ts, bool):
        when = _dt.datetime.fromtimestamp(ts).strftime("%H:%M:%S.%f")[:-3]
    else:
        when = "--:--:--.---"
    name = item.get("plugin", "?")
    instance = item.get("instance")
    source = f"{name}/{instance}" if instance is not None else str(name)
    return f"{when} {source} {item.get('line', '')}"
