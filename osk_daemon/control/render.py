"""How ``oskctl`` shows the daemon's answers to a human (or, with ``--json``, to a script).

Why: keeping formatting apart from the socket code makes it testable without a daemon and
keeps ``oskctl`` itself about arguments, connections and exit codes.

How: pure functions from decoded JSON values to strings, standard library only (``oskctl``
must start fast). Missing or ``None`` cells render as ``-``; everything tolerates extra or
missing keys, since the daemon may add fields.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

TYPE_CHECKING = False  # typing's constant without importing typing: oskctl starts lean
if TYPE_CHECKING:
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
    kind = type(value)  # the common cells first: an isinstance on an ABC costs ~1 us each
    if kind is str:
        return value or "-"
    if kind is int:
        return str(value)
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


def format_standby(standby: Any) -> str:
    """A STANDBY cell: its pid once armed, ``PID arming`` before, ``due`` while one is
    still to be made, ``-`` for none."""
    if not isinstance(standby, Mapping):
        return "-"
    pid = standby.get("pid")
    if pid is None:
        return "due"
    return str(pid) if standby.get("armed") else f"{pid} arming"


def format_status(rows: Sequence[Mapping[str, Any]]) -> str:
    """The ``oskctl status`` table for the daemon's list of instance dicts; a STANDBY
    column only when some instance has one (``standby = true``)."""
    standbys = any(isinstance(row.get("standby"), Mapping) for row in rows)
    cells = []
    for row in rows:
        line = []
        for _, key in STATUS_COLUMNS:
            value = row.get(key)
            line.append(format_uptime(value) if key == "uptime_s" else format_cell(value))
        if standbys:
            line.append(format_standby(row.get("standby")))
        cells.append(line)
    headers = [header for header, _ in STATUS_COLUMNS] + (["STANDBY"] if standbys else [])
    return format_table(headers, cells)


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
        import datetime as _dt  # here, not at the top: ~2 ms of every oskctl start

        when = _dt.datetime.fromtimestamp(ts).strftime("%H:%M:%S.%f")[:-3]
    else:
        when = "--:--:--.---"
    name = item.get("plugin", "?")
    instance = item.get("instance")
    source = f"{name}/{instance}" if instance is not None else str(name)
    return f"{when} {source} {item.get('line', '')}"


# -- the dependency graph (``oskctl graph``) --------------------------------------------------
#
# The daemon answers ``{"plugins": [{name, version, wave, requires, optional, status,
# degraded_by, offline_capable}, ...], "waves": [[name, ...], ...]}``. ``waves`` orders the
# plugins; a plugin it does not list falls back to its own ``wave`` field, and one without
# either is shown last as "unscheduled".

DOWN_STATUSES = frozenset({"unhealthy", "failed", "stopped"})
DOT_DOWN_FILL = "#ffcccc"
DOT_DEGRADED_FILL = "#ffffcc"


def _plugins(graph: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    plugins = graph.get("plugins")
    if not isinstance(plugins, list):
        return []
    return [p for p in plugins if isinstance(p, Mapping)]


def _names(value: Any) -> list[str]:
    return [str(v) for v in value] if isinstance(value, list) else []


def _waves(graph: Mapping[str, Any]) -> list[tuple[int | None, list[Mapping[str, Any]]]]:
    """The plugins grouped by start wave, in start order; ``None`` (unscheduled) last."""
    by_name = {str(p.get("name")): p for p in _plugins(graph)}
    groups: dict[int | None, list[Mapping[str, Any]]] = {}
    placed: set[str] = set()
    waves = graph.get("waves")
    for index, wave in enumerate(waves if isinstance(waves, list) else []):
        for name in _names(wave):
            if name not in placed:
                placed.add(name)
                groups.setdefault(index, []).append(by_name.get(name, {"name": name}))
    for name, plugin in by_name.items():
        if name not in placed:
            wave_field = plugin.get("wave")
            key = wave_field if type(wave_field) is int else None
            groups.setdefault(key, []).append(plugin)
    return sorted(groups.items(), key=lambda item: (item[0] is None, item[0] or 0))


def _graph_row(plugin: Mapping[str, Any]) -> list[str]:
    status = format_cell(plugin.get("status"))
    down = _names(plugin.get("degraded_by"))
    if down:
        status += f" ({', '.join(down)} down)"
    links = []
    if requires := _names(plugin.get("requires")):
        links.append("-> " + ", ".join(requires))
    if optional := _names(plugin.get("optional")):
        links.append("optional: " + ", ".join(optional))
    if plugin.get("offline_capable") is True:
        links.append("offline-capable")
    return [
        format_cell(plugin.get("name")),
        format_cell(plugin.get("version")),
        status,
        "; ".join(links),
    ]


def format_graph(graph: Mapping[str, Any]) -> str:
    """The ``oskctl graph`` text: a ``wave N`` line per start wave, then one indented line per
    plugin (name, version, status with the required dependencies that are down, then
    ``-> requires; optional: ...``), columns aligned across all waves. ``no plugins`` when
    there are none. No final newline.
    """
    waves = _waves(graph)
    if not waves:
        return "no plugins"
    rows = [_graph_row(plugin) for _, plugins in waves for plugin in plugins]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    rest = iter(rows)
    for wave, plugins in waves:
        lines.append("unscheduled" if wave is None else f"wave {wave}")
        for _ in plugins:
            cells = (cell.ljust(width) for cell, width in zip(next(rest), widths, strict=True))
            lines.append(("  " + "  ".join(cells)).rstrip())
    return "\n".join(lines)


def dot_quote(text: str) -> str:
    """``text`` as a quoted Graphviz ID: backslashes, quotes and newlines escaped."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


def format_graph_dot(graph: Mapping[str, Any]) -> str:
    """The graph as Graphviz DOT (``oskctl graph --dot | dot -Tsvg``): a box per plugin
    labelled ``name\\nversion``, filled light red when down (unhealthy, failed, stopped) and
    light yellow when degraded; an edge from each plugin to each dependency, dashed for
    optional ones. Dependencies the daemon does not list as plugins get a dashed box. No
    final newline.
    """
    plugins = _plugins(graph)
    known = {str(p.get("name")) for p in plugins}
    nodes: list[str] = []
    edges: list[str] = []
    missing: list[str] = []
    for plugin in plugins:
        name = str(plugin.get("name"))
        version = plugin.get("version")
        label = name if version is None or version == "" else f"{name}\n{version}"
        attrs = [f"label={dot_quote(label)}"]
        status = str(plugin.get("status"))
        if status in DOWN_STATUSES:
            attrs.append(f"style=filled, fillcolor={dot_quote(DOT_DOWN_FILL)}")
        elif status == "degraded":
            attrs.append(f"style=filled, fillcolor={dot_quote(DOT_DEGRADED_FILL)}")
        nodes.append(f"  {dot_quote(name)} [{', '.join(attrs)}];")
        for kind in ("requires", "optional"):
            for dep in _names(plugin.get(kind)):
                style = " [style=dashed]" if kind == "optional" else ""
                edges.append(f"  {dot_quote(name)} -> {dot_quote(dep)}{style};")
                if dep not in known and dep not in missing:
                    missing.append(dep)
    nodes += [f"  {dot_quote(dep)} [style=dashed];" for dep in missing]
    return "\n".join(["digraph osk {", "  node [shape=box];", *nodes, *edges, "}"])
