"""Health checks and heartbeats, for the driver.

A ready instance is checked one of two ways; the verdicts go to its ``HealthTracker``.

- **Its worker checks itself** (the usual case: it has a heartbeat page and marked it
  ``PUSHES_HEALTH`` before its READY; ``worker.health``). It reports news as
  HEALTH_REPORT frames (``reported``) and counts unchanged healthy checks in its page,
  which the watchdog sweep below reads. A page count that stops moving with no report
  for ``2 * interval + timeout`` counts as a failed check: the checks stopped.
- **The daemon probes it** (a worker without a page, or one adopted from a daemon that
  gave it none): a HEALTH frame every ``interval`` and ``timeout`` seconds to answer.
  Sub-second intervals work: timers are plain loop timers, not a polling tick, whose
  times are rounded up to a shared grid (``_on_grid``) so that instances due at about the
  same time are probed in one loop pass. A probe also tells a self-checking worker to
  stop its own checks (``take_over``: the policy changed under it).

Separately, one watchdog timer reads every instance's heartbeat page (or its last frame):
a worker whose event loop is blocked stops beating, and after ``heartbeat_timeout`` it
is declared hung and killed.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import time
from typing import TYPE_CHECKING

from osk_daemon.errors import OskError
from osk_daemon.ipc.codec import Header, Kind, unpack
from osk_daemon.observability.buckets import Buckets
from osk_daemon.supervisor import lifecycle as lc
from osk_daemon.worker.sdk import HealthStatus

if TYPE_CHECKING:
    from osk_daemon.supervisor.instance import Instance
    from osk_daemon.supervisor.runtime import Supervisor

log = logging.getLogger("osk.health")

GRID_S = 0.05  # probes and their deadlines fall on multiples of this (or of a tenth of them)


def _on_grid(when: float, span: float) -> float:
    """``when`` rounded up to the probe grid: ``GRID_S``, or a tenth of ``span`` if that is
    finer. Instances probed at the same grid point share one loop wake-up, one wake-up of
    ZeroMQ's I/O thread and, mostly, one read of their answers, instead of one each: at 500
    instances that is most of an idle daemon's CPU. A probe is late by at most the grid."""
    grid = min(GRID_S, span / 10)
    return math.ceil(when / grid) * grid


_ANSWERABLE = {HealthStatus.HEALTHY, HealthStatus.DEGRADED, HealthStatus.UNHEALTHY}
_WATCHED = frozenset({lc.State.READY, lc.State.INITIALIZING})  # a silent one is hung
_MAX_DETAIL = 1024  # characters of a reported detail kept (status, events, logs)


class HealthChecks:
    def __init__(self, supervisor: Supervisor) -> None:
        self._sup = supervisor
        self._ids = itertools.count(1)
        self._loop = asyncio.get_running_loop()
        d = supervisor.config.daemon
        self._hb_timeout = d.heartbeat_timeout
        self._tick = max(0.02, min(d.heartbeat_interval, d.heartbeat_timeout / 4))
        self._watchdog: asyncio.TimerHandle | None = None
        self._durations: dict[str, Buckets] = {}  # per plugin, for metrics

    def start(self) -> None:
        self._watchdog = self._loop.call_later(self._tick, self._watch)

    def stop(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        for inst in self._sup.instances.values():
            inst.cancel_health()

    def duration_metrics(self) -> list[tuple[str, list[tuple[str, float]], float]]:
        """Per plugin: health check durations as cumulative buckets, and their sum."""
        return [(p, b.cumulative(), b.sum) for p, b in sorted(self._durations.items())]

    def schedule(self, inst: Instance) -> None:
        """The instance became ready: listen to its own checks, or start probing it."""
        inst.cancel_health()
        if not inst.health.policy.enabled:
            return
        page = inst.beat.read() if inst.beat is not None else None
        if page is not None and page.pushes_health:
            inst.health_push = True
            inst.health_count, inst.health_durations = page.healthy, page.durations
            inst.health_heard = time.monotonic()
            return  # its first check's report is on its way: dependents wait for it
        # the first probe at once: dependents wait for it
        inst.health_handle = self._loop.call_later(0, self._probe, inst, inst.generation)

    def take_over(self, inst: Instance) -> None:
        """Its health policy changed: probe it from now on (the first probe also stops
        the checks its worker runs with the old policy)."""
        if not inst.health_push:
            return
        inst.cancel_health()
        if inst.health.policy.enabled:
            inst.health_handle = self._loop.call_later(0, self._probe, inst, inst.generation)
        else:  # nothing to probe: one unasked-for probe only silences the worker
            self._sup.broker.post_to(inst.key, Header(Kind.HEALTH, 0))

    def reported(self, inst: Instance, body: bytes) -> None:
        """A HEALTH_REPORT: news from a worker that checks itself."""
        if not inst.health_push:
            return  # not asked for (we probe it): dropped
        report = parse_report(body)
        if report is None:
            log.warning("%s sent a malformed health report; counted as unhealthy", inst.leaf)
            self._verdict(inst, HealthStatus.UNHEALTHY, "malformed health report")
            return
        status, detail, count, durations, took = report
        inst.health_heard = time.monotonic()
        self._absorb(inst, count, durations)  # the healthy checks before this one count first
        if took is None:  # its last result again, for a daemon that just adopted it
            if inst.health.status is HealthStatus.UNKNOWN:
                self._verdict(inst, status, detail)
            return
        self._durations.setdefault(inst.plugin, Buckets()).observe(took)
        self._verdict(inst, status, detail)

    def _absorb(self, inst: Instance, count: int, durations: float) -> bool:
        """Count the healthy checks its page (or a report) shows beyond those seen; True
        if there were any."""
        new = (count - inst.health_count) & 0xFFFFFFFF
        if not new:
            return False
        spent = _seconds(durations - inst.health_durations)  # a worker's page may lie
        inst.health_count, inst.health_durations = count, durations
        self._durations.setdefault(inst.plugin, Buckets()).observe_many(new, spent)
        health = inst.health
        if health.status is not HealthStatus.HEALTHY or health.failures:
            for _ in range(min(new, health.policy.success_threshold)):
                self._verdict(inst, HealthStatus.HEALTHY, health.detail)
        return True

    def answered(self, inst: Instance, check_id: int, body: bytes) -> None:
        if check_id != inst.health_id or inst.health_timeout is None:
            return  # late or unasked-for
        inst.health_timeout.cancel()
        inst.health_timeout = None
        self._durations.setdefault(inst.plugin, Buckets()).observe(
            time.monotonic() - inst.health_sent_at
        )
        try:
            data = unpack(body, 65536)
            status = HealthStatus(data["status"])
            detail = str(data.get("detail", ""))
        except (OskError, KeyError, TypeError, ValueError, AttributeError):
            status, detail = HealthStatus.UNHEALTHY, "malformed health answer"
        if status not in _ANSWERABLE:
            status = HealthStatus.UNHEALTHY
        self._verdict(inst, status, detail)

    def _probe(self, inst: Instance, generation: int) -> None:
        if generation != inst.generation or inst.life.state is not lc.State.READY:
            return
        policy = inst.health.policy
        loop = self._loop
        now = loop.time()
        inst.health_handle = loop.call_at(
            _on_grid(now + policy.interval, policy.interval), self._probe, inst, generation
        )
        if inst.health_timeout is not None:
            return  # the previous probe is still waiting
        inst.health_id = next(self._ids)
        inst.health_sent_at = time.monotonic()
        self._sup.broker.post_to(inst.key, Header(Kind.HEALTH, inst.health_id))
        inst.health_timeout = loop.call_at(
            _on_grid(now + policy.timeout, policy.timeout),
            self._no_answer,
            inst,
            generation,
            inst.health_id,
        )

    def _no_answer(self, inst: Instance, generation: int, check_id: int) -> None:
        if generation == inst.generation and check_id == inst.health_id:
            inst.health_timeout = None
            self._verdict(inst, None, "")

    def _verdict(self, inst: Instance, status: HealthStatus | None, detail: str) -> None:
        if inst.life.state is not lc.State.READY:
            return
        before = inst.health.status
        restart = inst.health.check(status, detail)
        if inst.health.status is not before:
            log.log(
                logging.WARNING if inst.health.status is HealthStatus.UNHEALTHY else logging.INFO,
                "%s is %s%s",
                inst.leaf,
                inst.health.status.value,
                f": {inst.health.detail}" if inst.health.detail else "",
            )
            self._sup.publish(
                inst, "plugin:health", inst.health.detail, health=inst.health.status.value
            )
        if inst.health.status is not before:
            self._sup.instance_changed(inst)
        if restart:
            self._sup.feed(inst, lc.HealthFailed(inst.health.detail or "failed health checks"))

    def _watch(self) -> None:
        """The sweep: every instance's heartbeat page, and the hung ones killed.

        A healthy instance whose last beat is too recent to time out before the next
        sweep is skipped: at the default 1 s beats and 3 s timeout, each page is read
        every third sweep instead of every one (an idle daemon's largest cost at 500
        plugins, after the health checks moved into the pages).

        An instance under its start CPU cap (``rollout.start_cpu``) is not judged: its
        event loop may wait seconds for the CPU the daemon itself withholds. Its silence
        is counted from the cap's end (``InstanceProcesses.lift_start_cap``)."""
        now = time.monotonic()
        fresh = self._hb_timeout - self._tick
        for inst in list(self._sup.instances.values()):
            beat = inst.beat  # beats in shared memory (ipc.beats), not as frames
            if beat is not None and (
                now - inst.last_seen > fresh or inst.health.status is not HealthStatus.HEALTHY
            ):
                page = beat.read()
                inst.last_seen = max(inst.last_seen, page.beat)
                if inst.health_push and inst.life.state is lc.State.READY:
                    self._read_checks(inst, page.healthy, page.durations, now)
            if (
                inst.life.state in _WATCHED
                and inst.start_cap is None  # a capped start is slowed by us, not hung
                and now - inst.last_seen > self._hb_timeout
            ):
                silent = now - inst.last_seen
                log.warning("%s sent no heartbeat for %.1fs: hung, killing it", inst.leaf, silent)
                self._sup.feed(inst, lc.HeartbeatLost())
        self._watchdog = self._loop.call_later(self._tick, self._watch)

    def _read_checks(self, inst: Instance, count: int, durations: float, now: float) -> None:
        """The sweep's look at a self-checking worker's page: new healthy checks, or none
        for too long (then one failed check per such stretch)."""
        if self._absorb(inst, count, durations):
            inst.health_heard = now
            return
        policy = inst.health.policy
        quiet = 2 * policy.interval + policy.timeout
        if now - inst.health_heard > quiet:
            inst.health_heard = now
            self._verdict(inst, None, f"no health check result for {quiet:g}s")


_Report = tuple[HealthStatus | None, str, int, float, float | None]


def parse_report(body: bytes) -> _Report | None:
    """A HEALTH_REPORT body as ``(status, detail, count, durations, took)``: status None
    for no answer, one a plugin may not report as unhealthy; took None for a result sent
    again (``"again"``: a re-adopted worker's last one); None if it is malformed (a worker
    is not trusted: any type, size or value may come)."""
    try:
        data = unpack(body, 65536)
        if not isinstance(data, dict):
            return None
        raw = data["status"]
        status = None if raw is None else HealthStatus(raw)
        count, durations, took = data["count"], data["durations"], data["took"]
        if not isinstance(count, int) or not all(
            isinstance(v, int | float) for v in (durations, took)
        ):
            return None
        detail = str(data.get("detail", ""))[:_MAX_DETAIL]
    except (OskError, KeyError, TypeError, ValueError):
        return None
    if status is not None and status not in _ANSWERABLE:
        status = HealthStatus.UNHEALTHY
    again = data.get("again") is True
    took_s = None if again else _seconds(took)
    return status, detail, count & 0xFFFFFFFF, _seconds(durations), took_s


def _seconds(value: float) -> float:
    """A duration a worker reported, as a finite, non-negative float (else 0.0)."""
    try:
        seconds = float(value)
    except OverflowError:
        return 0.0
    return seconds if math.isfinite(seconds) and seconds >= 0.0 else 0.0
