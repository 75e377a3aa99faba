"""The worker's own health checks (worker.health): what goes to the page, what as a frame."""

from __future__ import annotations

import asyncio
import mmap
import struct
from typing import Any

import pytest

from osk_daemon.ipc.beats import BEAT_SIZE, BeatPage
from osk_daemon.ipc.codec import Kind, unpack
from osk_daemon.observability.buckets import Buckets
from osk_daemon.worker.health import HealthReporter

pytestmark = pytest.mark.timeout(10)


class Plugin:
    """A scripted ``check``: answers from ``results`` in turn; ``"hang"`` never answers."""

    def __init__(self, *results: Any) -> None:
        self.results = list(results)

    async def check(self) -> tuple[str, str]:
        result = self.results.pop(0)
        if result == "hang":
            await asyncio.sleep(1000)
        assert isinstance(result, tuple)
        return result


def _reporter(plugin: Plugin) -> tuple[HealthReporter, mmap.mmap, list[dict[str, Any]]]:
    page = mmap.mmap(-1, BEAT_SIZE)
    sent: list[dict[str, Any]] = []

    def send(kind: Kind, body: bytes) -> None:
        assert kind is Kind.HEALTH_REPORT
        sent.append(unpack(body, 1 << 16))

    return HealthReporter(page, plugin.check, send, interval=0.01, timeout=0.05), page, sent


def _read(page: mmap.mmap) -> BeatPage:
    beat, healthy, flags, durations = struct.unpack("<dIId", page[:BEAT_SIZE])
    return BeatPage(beat, bool(flags & 1), healthy, durations)


def test_news_goes_as_a_frame_and_unchanged_health_only_counts_in_the_page() -> None:
    healthy = ("healthy", "")
    plugin = Plugin(healthy, healthy, healthy, ("degraded", "slow disk"), healthy, healthy)
    reporter, page, sent = _reporter(plugin)
    assert _read(page).pushes_health  # marked as soon as the reporter exists

    async def six() -> None:
        for _ in range(6):
            await reporter.check_once()

    asyncio.run(six())
    assert [(m["status"], m["detail"], m["count"]) for m in sent] == [
        ("healthy", "", 0),  # the first result always goes: dependents wait for it
        ("degraded", "slow disk", 2),  # the two healthy checks before it counted first
        ("healthy", "", 2),  # back to healthy is news too
    ]
    got = _read(page)
    assert got.healthy == 3 and got.durations >= 0.0  # the last one, unchanged, is counted


def test_a_check_past_its_timeout_is_reported_as_no_answer_every_time() -> None:
    reporter, page, sent = _reporter(Plugin(("healthy", ""), "hang", "hang"))

    async def three() -> None:
        for _ in range(3):
            await reporter.check_once()

    asyncio.run(three())
    assert [(m["status"], m["detail"]) for m in sent] == [
        ("healthy", ""),
        (None, "no answer within 0.05s"),
        (None, "no answer within 0.05s"),  # a failure is never folded into the count
    ]
    assert _read(page).healthy == 0


def test_ticks_start_a_check_when_due_and_never_two_at_once() -> None:
    async def ticks() -> None:
        started = 0
        release = asyncio.Event()

        async def check() -> tuple[str, str]:
            nonlocal started
            started += 1
            await release.wait()
            return "healthy", ""

        page = mmap.mmap(-1, BEAT_SIZE)
        sent: list[bytes] = []
        reporter = HealthReporter(page, check, lambda _, body: sent.append(body), 1.0, 5.0)
        reporter.tick(100.0)  # the first at once
        await asyncio.sleep(0)
        reporter.tick(101.5)  # due, but the first is still running
        await asyncio.sleep(0)
        assert started == 1
        release.set()
        await asyncio.sleep(0.01)
        assert len(sent) == 1
        reporter.tick(101.6)  # due and free: a second check
        reporter.tick(101.7)  # not due again before 102.6
        await asyncio.sleep(0.01)
        assert started == 2 and _read(page).healthy == 1
        reporter.close()
        reporter.tick(1e9)  # closed: no more checks
        await asyncio.sleep(0.01)
        assert started == 2

    asyncio.run(ticks())


def test_buckets_take_many_observations_known_only_by_their_sum() -> None:
    b = Buckets((0.001, 0.01))
    b.observe_many(4, 0.02)  # a mean of 5 ms
    b.observe_many(0, 1.0)  # nothing new: ignored
    assert b.cumulative() == [("0.001", 0.0), ("0.01", 4.0), ("+Inf", 4.0)]
    assert b.sum == pytest.approx(0.02)


def test_the_last_result_is_sent_again_for_a_daemon_that_adopts_the_worker() -> None:
    reporter, _, sent = _reporter(Plugin(("healthy", ""), ("healthy", "")))
    reporter.resend()  # nothing checked yet: nothing to say
    assert sent == []

    async def two() -> None:
        await reporter.check_once()
        await reporter.check_once()

    asyncio.run(two())
    reporter.resend()
    assert [(m["status"], m["count"], m.get("again")) for m in sent] == [
        ("healthy", 0, None),
        ("healthy", 1, True),  # with the count so far: the new daemon reads the same page
    ]
