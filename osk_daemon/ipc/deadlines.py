"""Request deadlines for the broker: one heap and one loop timer, however many requests.

Why: every routed request must be answered by its deadline, and thousands may be in flight;
a timer per request would cost a loop handle each and a cancel on every reply. Instead
deadlines go into a min-heap and a single ``call_at`` timer is armed for the earliest.

How: ``add`` pushes ``(deadline, key)`` and re-arms only when the new deadline is earlier
than the armed one. When the timer fires, every entry whose deadline has passed is popped,
and ``expired(key)`` is called for those still ``live`` (answered requests are not removed
from the heap, only skipped). Dead entries at the top are then pruned and the timer is
re-armed for the next live deadline. Deadlines are ``time.monotonic()`` values, converted
to the loop's clock when armed.
"""

from __future__ import annotations

import asyncio
import heapq
import time
from collections.abc import Callable

__all__ = ["DeadlineTimer"]


class DeadlineTimer:
    """Calls ``expired(key)`` once a live key's deadline has passed. Loop thread only."""

    def __init__(self, expired: Callable[[int], None], live: Callable[[int], bool]) -> None:
        self._expired = expired
        self._live = live
        self._loop: asyncio.AbstractEventLoop | None = None
        self._heap: list[tuple[float, int]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Arm timers on ``loop`` from now on; ``add`` needs this first."""
        self._loop = loop

    def close(self) -> None:
        """Cancel the armed timer; nothing expires after this."""
        if self._timer is not None:
            self._timer.cancel()

    def add(self, deadline: float, key: int) -> None:
        """Watch ``key`` until ``deadline`` (monotonic seconds). O(log n)."""
        heapq.heappush(self._heap, (deadline, key))
        if self._timer is None or deadline < self._timer_at:
            self._arm(deadline)

    def _arm(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        assert self._loop is not None
        self._timer_at = when
        self._timer = self._loop.call_at(
            self._loop.time() + max(0.0, when - time.monotonic()), self._fire
        )

    def _fire(self) -> None:
        self._timer = None
        now = time.monotonic()
        heap = self._heap
        while heap and heap[0][0] <= now:
            _, key = heapq.heappop(heap)
            if self._live(key):
                self._expired(key)
        while heap and not self._live(heap[0][1]):
            heapq.heappop(heap)
        if heap:
            self._arm(heap[0][0])
