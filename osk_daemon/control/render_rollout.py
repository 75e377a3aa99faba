"""How ``oskctl deploy`` and ``oskctl rollout`` show a rollout to a person.

A status is one line: plugin, versions, strategy, state, phase and target, instance counts
by role (ready/total) and the traffic split; a rolled-back rollout adds its reason.
Progress during ``deploy`` is one timestamped line per rollout event followed by that
status, so the terminal shows the swap step by step.
"""

from __future__ import annotations

from collections.abc import Mapping

TYPE_CHECKING = False  # typing's constant without importing typing: oskctl starts lean
if TYPE_CHECKING:
    from typing import Any

__all__ = ["format_rollout_progress", "format_rollout_status", "format_updates"]


def _counts(observed: Any) -> str:
    if not isinstance(observed, Mapping):
        return "-"
    return (
        f"stable {observed.get('stable_ready', '?')}/{observed.get('stable_total', '?')} ready, "
        f"canary {observed.get('canary_ready', '?')}/{observed.get('canary_total', '?')} ready"
    )


def format_rollout_status(status: Mapping[str, Any]) -> str:
    weights = status.get("weights")
    split = (
        "traffic by ready instances"
        if not weights
        else f"traffic {weights[0]}% {status.get('stable')} / {weights[1]}% {status.get('canary')}"
    )
    line = (
        f"{status.get('plugin')} {status.get('stable')} -> {status.get('canary')} "
        f"({status.get('strategy')}): {status.get('state')}, "
        f"phase {status.get('phase')}/{status.get('phases')} [{status.get('target')}]; "
        f"{_counts(status.get('observed'))}; {split}"
    )
    if status.get("reason"):
        line += f"\n  reason: {status['reason']}"
    return line


def format_rollout_progress(item: Any) -> str:
    """One item of ``deploy --follow``: the first status, then {event, status} pairs."""
    if not isinstance(item, Mapping):
        return str(item)
    if "event" not in item:
        return format_rollout_status(item)
    import datetime as _dt  # here, not at the top: oskctl starts without it

    event = item["event"] if isinstance(item["event"], Mapping) else {}
    stamp = event.get("timestamp")
    when = (
        _dt.datetime.fromtimestamp(stamp / 1000).strftime("%H:%M:%S.%f")[:-3]
        if isinstance(stamp, int | float)
        else "--:--:--"
    )
    kind = str(event.get("type", "?")).removeprefix("rollout:")
    extra = {
        k: v
        for k, v in event.items()
        if k not in ("type", "timestamp", "pluginName", "stable", "canary", "strategy")
    }
    detail = ", ".join(f"{k}={v}" for k, v in extra.items())
    status = item.get("status")
    tail = f"\n    {format_rollout_status(status)}" if isinstance(status, Mapping) else ""
    return f"{when} {kind}{': ' + detail if detail else ''}{tail}"


def format_updates(rows: list[Any]) -> str:
    """``oskctl updates``: one line per plugin with a newer fitting version."""
    if not rows:
        return "no updates: every plugin runs the newest installed version its range allows"
    lines = []
    for r in rows:
        if not isinstance(r, Mapping):
            continue
        when = "any time" if r.get("window") is None else f"window {r['window']}"
        state = f"{r.get('mode')}, {when}{' (open now)' if r.get('in_window') else ''}"
        line = f"{r.get('plugin')}: {r.get('running')} -> {r.get('available')} ({state})"
        if r.get("failed"):
            line += f"\n  last try failed: {r['failed']}"
        if r.get("waiting"):
            line += f"\n  waiting: {r['waiting']}"
        lines.append(line)
    return "\n".join(lines)
