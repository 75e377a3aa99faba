"""Request deadlines for the broker: one heap and one loop timer, however many requests.

Why: every routed request must be answered by its deadline, and thousands may be in flight;
a timer per request would cost a loop handle each and a cancel on every reply. Instead
deadlines go into a min-heap and a single ``call_at`` timer is armed for the earliest.

How: the heap holds buckets ``(deadline, seq, [keys])``. ``add`` appends the key to the
last bucket when its deadline is the same (a pipelined batch shares one deadline, so that
is one list append per request), else pushes a new bucket, and re-arms only when the new
deadline is earlier than the armed one. When the timer fires, every bucket whose deadline
has passed is popped, and ``expired(key)`` is called for those keys still ``live``
(answered requests are not removed from the heap, only skipped). Buckets with no live key
left at the top are then pruned and the timer is re-armed for the next deadline. So that
answered keys do not pile up until their deadline (60k requests a second with a 30 s
deadline would be 1.8M of them), the heap is compacted — dead keys dropped, O(n) — once
it holds more than twice the live keys (``live_count``) plus a margin: amortised O(1) per
key. Deadlines are ``time.monotonic()`` values, converted to the loop's clock when armed.
"""

from __future__ import annotations

import asyncio
import heapq
import time
from collections.abc import Callable

__all__ = ["DeadlineTimer"]

_COMPACT_MARGIN = 4096


class DeadlineTimer:
    """Calls ``expired(key)`` once a live key's deadline has passed. Loop thread only."""

    def __init__(
        self,
        expired: Callable[[int], None],
        live: Callable[[int], bool],
        live_count: Callable[[], int] | None = None,
    ) -> None:
        self._expired = expired
        self._live = live
        self._live_count = live_count
        self._loop: asyncio.AbstractEventLoop | None = None
        self._heap: list[tuple[float, int, list[int]]] = []
        self._seq = 0
        self._last: list[int] | None = None  # the newest bucket, while it is in the heap
        self._last_at = 0.0
        self._keys = 0  # keys in the heap, live or not
        self._limit = _COMPACT_MARGIN
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0

    def __len__(self) -> int:
        """Keys in the heap, answered ones included (what compaction bounds)."""
        return self._keys

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Arm timers on ``loop`` from now on; ``add`` needs this first."""
        self._loop = loop

    def close(self) -> None:
        """Cancel the armed timer; nothing expires after this."""
        if self._timer is not None:
            self._timer.cancel()

    def add(self, deadline: float, key: int) -> None:
        """Watch ``key`` until ``deadline`` (monotonic seconds). O(1) when the deadline is
        the previous one's, else O(log n)."""
        self._keys += 1
        if deadline == self._last_at and self._last is not None:
            self._last.append(key)
        else:
            bucket = [key]
            self._seq += 1
            heapq.heappush(self._heap, (deadline, self._seq, bucket))
            self._last, self._last_at = bucket, deadline
            if self._timer is None or deadline < self._timer_at:
                self._arm(deadline)
        if self._keys > self._limit:
            self._compact()

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
        live = self._live
        while heap and heap[0][0] <= now:
            for key in self._pop():
                if live(key):
                    self._expired(key)
        while heap and not any(map(live, heap[0][2])):
            self._pop()
        if heap:
            self._arm(heap[0][0])

    def _pop(self) -> list[int]:
        _, _, bucket = heapq.heappop(self._heap)
        if bucket is self._last:
            self._last = None
        self._keys -= len(bucket)
        return bucket

    def _compact(self) -> None:
        live = self._live
        kept: list[tuple[float, int, list[int]]] = []
        keys = 0
        for at, seq, bucket in self._heap:
            alive = [key for key in bucket if live(key)]
            if alive:
                kept.append((at, seq, alive))
                keys += len(alive)
        heapq.heapify(kept)
        self._heap, self._keys, self._last = kept, keys, None
        count = self._live_count() if self._live_count is not None else keys
        self._limit = 2 * max(count, keys) + _COMPACT_MARGIN
