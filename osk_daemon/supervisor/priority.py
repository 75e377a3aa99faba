"""CPU priority as a scheduling hint for processes that start or stop while others serve.

A plugin added while its other instances serve (a swap, a reload) starts at
``GENTLE_NICE`` and gets its full share once ready; an instance being retired is lowered
to it once drained, so its ``stop()``, interpreter teardown and exit take CPU from the
serving path only when the CPU is idle. The zygote forks at a low priority of its own and
the daemon gives every new plugin nice 0 as it spawns (unless it starts gently).
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger("osk.supervisor")

__all__ = ["GENTLE_NICE", "renice"]

GENTLE_NICE = 10


def renice(pid: int, nice: int) -> None:
    """Set ``pid``'s nice value; a process already gone (or a refusal) is only logged."""
    try:
        os.setpriority(os.PRIO_PROCESS, pid, nice)
    except OSError as exc:
        log.debug("setpriority(%d, %d): %s", pid, nice, exc)
