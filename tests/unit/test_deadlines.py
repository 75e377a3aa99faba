"""The broker's deadline heap: buckets, expiry of live keys only, and compaction."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest

from osk_daemon.ipc.deadlines import DeadlineTimer

pytestmark = [pytest.mark.timeout(30), pytest.mark.anyio]


class Table:
    """What the broker keeps: pending keys; expiry answers (removes) them."""

    def __init__(self) -> None:
        self.pending: set[int] = set()
        self.expired: list[int] = []
        self.fired = asyncio.Event()
        self.timer = DeadlineTimer(self.expire, self.pending.__contains__, self.pending.__len__)

    def expire(self, key: int) -> None:
        self.pending.discard(key)
        self.expired.append(key)
        self.fired.set()

    def add(self, deadline: float, key: int) -> None:
        self.pending.add(key)
        self.timer.add(deadline, key)

    async def wait_until(self, predicate: Callable[[], bool], timeout: float = 5.0) -> None:
        """Return once ``predicate()`` holds, re-checked after every expiry."""
        async with asyncio.timeout(timeout):
            while not predicate():
                await self.fired.wait()
                self.fired.clear()


async def test_live_keys_expire_in_deadline_order_and_answered_ones_do_not() -> None:
    t = Table()
    t.timer.start(asyncio.get_running_loop())
    now = time.monotonic()
    shared = now + 0.05
    for key in (1, 2, 3):  # a pipelined batch: one deadline, one bucket
        t.add(shared, key)
    t.add(now + 0.02, 4)
    t.add(now + 0.08, 5)
    t.pending.discard(2)  # answered
    await t.wait_until(lambda: len(t.expired) == 4)
    assert t.expired == [4, 1, 3, 5]
    assert len(t.timer) == 0
    t.timer.close()


async def test_a_key_added_after_its_bucket_fired_still_expires() -> None:
    t = Table()
    t.timer.start(asyncio.get_running_loop())
    deadline = time.monotonic() + 0.01
    t.add(deadline, 1)
    await t.wait_until(lambda: t.expired == [1])
    t.add(deadline, 2)  # same deadline, already past: not into the popped bucket
    await t.wait_until(lambda: t.expired == [1, 2])
    t.timer.close()


async def test_answered_keys_do_not_pile_up() -> None:
    t = Table()
    t.timer.start(asyncio.get_running_loop())
    far = time.monotonic() + 60
    for key in range(100_000):
        t.add(far + (key % 7), key)  # several buckets
        t.pending.discard(key - 10)  # answered soon after: about 10 live at a time
        assert len(t.timer) <= 2 * 11 + 4096 + 1  # twice the live keys, plus a margin
    assert len(t.pending) == 10
    t.add(time.monotonic(), 10**6)  # the timer still works after compactions
    await t.wait_until(lambda: t.expired == [10**6])
    t.timer.close()
