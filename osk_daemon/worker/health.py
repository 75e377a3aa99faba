"""The worker's own health checks, reported through its heartbeat page.

Why: the daemon used to ask every instance for its health, one HEALTH frame and one
answer each ``interval``. At 500 plugins and the default 1 s that was 500 round trips a
second: ~7.5 % of a core in an idle daemon and ~19 % in the plugins (measured). Almost
every answer says what the one before said. So a worker whose daemon gave it a heartbeat
page (``ipc.beats``) and a ``health`` policy runs the checks itself, like a Consul TTL
check or systemd's watchdog, and speaks only when there is news.

How (theory of operation):

1. Before its READY, the worker marks its page ``PUSHES_HEALTH``; the daemon reads the
   mark when the instance becomes ready and then sends it no HEALTH frames.
2. Every ``interval`` (the first at READY), ``health()`` runs with ``timeout`` in a task
   of its own, started by the worker's heartbeat loop (``tick``), so one timer wakes the
   worker for beats and checks alike and a slow check never delays a beat. A check that
   takes longer than ``timeout`` is cancelled and counts as no answer, as a probe's
   would; none starts while one is still running.
3. A result that differs from the last one reported (status or detail), and every result
   that is not ``healthy``, goes to the daemon as a HEALTH_REPORT frame: ``{status,
   detail, count, durations, took}`` (status ``None`` for no answer; ``took`` the check's
   own seconds). The first result always
   does, so the daemon's first verdict, which dependents wait for, is not delayed.
4. A healthy result like the last one reported only bumps the page's count and adds its
   duration to the page's sum: one store each. The daemon's heartbeat sweep reads them
   (``supervisor.health_checks``). A frame carries the count and sum at its sending, so
   the daemon counts every healthy check before the frame's own, in order.
5. A page count that stops moving while no frame comes is noticed by the daemon too: the
   checks stopped, which it counts as a failed check.
6. A worker re-adopted by a restarted daemon reports its last result again at once
   (``resend``): the new daemon's first verdict need not wait for the next change.
"""

from __future__ import annotations

import asyncio
import logging
import math
import mmap
import time
from collections.abc import Awaitable, Callable
from typing import Any

from osk_daemon.ipc.beats import mark_pushes_health, write_healthy
from osk_daemon.ipc.codec import Kind, pack

__all__ = ["HealthReporter"]

log = logging.getLogger("osk.worker")

# (status, detail): the status a plugin's answer normalised to, None for no answer
Check = Callable[[], Awaitable[tuple[str, str]]]
Send = Callable[[Kind, bytes], None]
# a tick this close to the due time counts as due: the heartbeat loop's sleeps end a hair
# before or after it, and a check must not wait a whole further beat for that
_EARLY = 0.99


class HealthReporter:
    """Runs ``check`` every ``interval`` (at most ``timeout`` each) and reports as above."""

    def __init__(
        self, page: mmap.mmap, check: Check, send: Send, interval: float, timeout: float
    ) -> None:
        self._page = page
        self._check = check
        self._send = send
        self._interval = interval
        self._timeout = timeout
        self._last: tuple[str | None, str] | None = None  # the last result reported
        self._count = 0
        self._durations = 0.0
        self._due = 0.0  # loop time of the next check
        self._running: asyncio.Task[None] | None = None
        mark_pushes_health(page)

    @property
    def interval(self) -> float:
        return self._interval

    def tick(self, now: float) -> None:
        """Start a check if one is due at ``now`` (loop time) and none is running. Called
        by the worker's heartbeat loop, so one timer wakes the worker for both."""
        if now < self._due or (self._running is not None and not self._running.done()):
            return
        self._due = now + self._interval * _EARLY
        self._running = asyncio.get_running_loop().create_task(self.check_once())
        self._running.add_done_callback(_consume)

    def close(self) -> None:
        """No more checks (the plugin stops, or the daemon probes it again)."""
        self._due = math.inf
        if self._running is not None:
            self._running.cancel()

    async def check_once(self) -> None:
        started = time.monotonic()
        result = await self._run_check()
        took = time.monotonic() - started
        if result[0] == "healthy" and result == self._last:
            self._count += 1
            self._durations += took
            write_healthy(self._page, self._count, self._durations)
            return
        self._last = result
        self._report(result, took)

    def resend(self) -> None:
        """Report the last result again (a new daemon adopted us and knows none)."""
        if self._last is not None:
            self._report(self._last, None)

    def _report(self, result: tuple[str | None, str], took: float | None) -> None:
        """``took`` None: the last result again, not a new check (``"again"``)."""
        report: dict[str, object] = {
            "status": result[0],
            "detail": result[1],
            "count": self._count,
            "durations": self._durations,
            "took": 0.0 if took is None else took,
        }
        if took is None:
            report["again"] = True
        self._send(Kind.HEALTH_REPORT, pack(report))

    async def _run_check(self) -> tuple[str | None, str]:
        task = asyncio.ensure_future(self._check())
        done, _ = await asyncio.wait({task}, timeout=self._timeout)
        if not done:
            task.cancel()  # not awaited: a health() that ignores cancelling cannot stall us
            task.add_done_callback(_consume)
            return None, f"no answer within {self._timeout:g}s"
        return task.result()


def _consume(task: asyncio.Future[Any]) -> None:
    """Retrieve what a finished task raised (a timed-out ``health()``, or a failed report)."""
    if not task.cancelled() and task.exception() is not None:
        log.warning("a health check task failed: %r", task.exception())
