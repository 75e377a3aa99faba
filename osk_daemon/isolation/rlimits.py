"""Lower the process's rlimits to what the launch plan asks (launch step 3).

Why: rlimits are per process and inherited, so the child sets them on itself before plugin
code runs. They complement the cgroup quotas: NOFILE, FSIZE, CORE, CPU seconds, STACK, and
AS / NPROC where wanted (NPROC counts per real uid system-wide and is ignored for root).

How: limits can only be *lowered* here (the daemon may lack CAP_SYS_RESOURCE, and a plugin
must never be able to raise them back). The requested hard limit is clamped to the current
hard limit and the soft limit to the resulting hard limit; a negative value means
"unlimited", which is then the current hard limit. Cost: one getrlimit + setrlimit each.
"""

from __future__ import annotations

import resource
from collections.abc import Iterable

__all__ = ["apply_rlimits", "clamp", "inherited_open_files", "raise_open_files"]

INFINITY = resource.RLIM_INFINITY


def _resource_id(name: str) -> int:
    value = getattr(resource, f"RLIMIT_{name}", None)
    if not isinstance(value, int):
        raise ValueError(f"unknown rlimit {name!r}")
    return value


def _le(a: int, b: int) -> bool:
    """a <= b where INFINITY (-1) is larger than everything."""
    if b == INFINITY:
        return True
    return a != INFINITY and a <= b


def clamp(soft: int, hard: int, current_hard: int) -> tuple[int, int]:
    """The (soft, hard) pair to set: hard never above ``current_hard``, soft never above hard."""
    soft = INFINITY if soft < 0 else soft
    hard = INFINITY if hard < 0 else hard
    if not _le(hard, current_hard):
        hard = current_hard
    if not _le(soft, hard):
        soft = hard
    return soft, hard


def apply_rlimits(limits: Iterable[tuple[str, int, int]]) -> list[tuple[str, int, int]]:
    """Set each ``(NAME, soft, hard)``; returns what was actually set. Raises ``OSError``."""
    applied = []
    for name, soft, hard in limits:
        rid = _resource_id(name)
        _, current_hard = resource.getrlimit(rid)
        new_soft, new_hard = clamp(soft, hard, current_hard)
        resource.setrlimit(rid, (new_soft, new_hard))
        applied.append((name, new_soft, new_hard))
    return applied


# The daemon's side: its own open-files limit (see raise_open_files).
OPEN_FILES_CAP = 1 << 20  # when the hard limit is unlimited
_before_raise: tuple[int, int] | None = None


def raise_open_files() -> tuple[int, int] | None:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit; the limits it had, or
    None if there was nothing to raise.

    Why: the daemon holds a few fds per plugin instance (its output FIFOs, its heartbeat
    page, pidfds), and systemd starts services with a soft limit of 1024 (the hard one
    is 524288): 300-odd plugins would run out. systemd's advice is for a program that
    needs more to raise its own soft limit, and to give its children the old one back
    (a program using ``select()`` cannot use fds above 1024): the launch plans do that
    (``inherited_open_files``).
    """
    global _before_raise
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = OPEN_FILES_CAP if hard == INFINITY else hard
    if soft == INFINITY or soft >= target:
        return None
    resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    _before_raise = (soft, hard)
    return _before_raise


def inherited_open_files() -> tuple[int, int] | None:
    """The NOFILE limits this process had before ``raise_open_files`` raised them (what a
    plugin gets back, unless its config sets ``limits.open_files``), or None."""
    return _before_raise
