"""Prometheus metrics, served from the daemon's own event loop.

Theory of operation
-------------------
Nothing is counted twice: the daemon already keeps every number (instance records, the
broker's per-plugin outcome counters and latency buckets, cgroup samples, the rollouts).
A ``prometheus_client`` custom collector reads them *at scrape time* and turns them into
metric families; the hot path of a call pays only the broker's integer increments.

The scrape is answered by a tiny HTTP server on the asyncio loop (``asyncio.start_server``),
not ``prometheus_client``'s thread, so a scrape sees the supervisor's state between two
events, never in the middle of one. It is off unless ``[metrics] listen`` is set
(``"127.0.0.1:9184"``); only ``GET /metrics`` (and ``/``) is answered.

Names follow Prometheus conventions with the ``osk_`` prefix: ``_total`` counters,
``_seconds`` and ``_bytes`` units, states as one series per possible value (1 for the
current one).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from osk_daemon.supervisor.lifecycle import State
from osk_daemon.worker.sdk import HealthStatus

if TYPE_CHECKING:
    from osk_daemon.supervisor.runtime import Supervisor

log = logging.getLogger("osk.metrics")

__all__ = ["SupervisorCollector", "parse_listen", "serve_metrics"]

_STATES = [s.value for s in State]
_HEALTH = [h.value for h in HealthStatus]


class SupervisorCollector:
    """Reads a supervisor's state when Prometheus scrapes."""

    def __init__(self, sup: Supervisor) -> None:
        self._sup = sup

    def describe(self) -> list[Metric]:
        return []  # no fixed set of series: do not let the registry call collect early

    def collect(self) -> Iterator[Metric]:
        sup = self._sup
        labels = ["plugin", "instance", "version"]
        up = GaugeMetricFamily("osk_plugin_up", "1 if the instance is ready", labels=labels)
        state = GaugeMetricFamily(
            "osk_plugin_state", "1 for the instance's lifecycle state", labels=[*labels, "state"]
        )
        health = GaugeMetricFamily(
            "osk_plugin_health", "1 for the instance's health status", labels=[*labels, "health"]
        )
        restarts = CounterMetricFamily(
            "osk_plugin_restarts", "restarts of the instance by reason", labels=[*labels, "reason"]
        )
        memory = GaugeMetricFamily("osk_plugin_memory_bytes", "cgroup memory in use", labels=labels)
        memory_peak = GaugeMetricFamily(
            "osk_plugin_memory_peak_bytes", "cgroup memory high-water mark", labels=labels
        )
        cpu = CounterMetricFamily("osk_plugin_cpu_seconds", "cgroup cpu time", labels=labels)
        throttled = CounterMetricFamily(
            "osk_plugin_cpu_throttled", "cgroup cpu throttling periods", labels=labels
        )
        pids = GaugeMetricFamily("osk_plugin_pids", "processes in the cgroup", labels=labels)
        for inst in sup.instances.values():
            values = [inst.plugin, str(inst.index), str(inst.config.version)]
            now_state = inst.life.state.value
            up.add_metric(values, 1.0 if inst.life.state is State.READY else 0.0)
            for s in _STATES:
                state.add_metric([*values, s], 1.0 if s == now_state else 0.0)
            shown = sup.status_of(inst)["health"]
            for h in _HEALTH:
                health.add_metric([*values, h], 1.0 if h == shown else 0.0)
            for reason, count in sorted(inst.exits_by_reason.items()):
                restarts.add_metric([*values, reason], float(count))
            usage = inst.usage if inst.live else {}
            for family, key in (
                (memory, "memory_bytes"),
                (memory_peak, "memory_peak_bytes"),
                (cpu, "cpu_s"),
                (throttled, "cpu_throttled"),
                (pids, "pids"),
            ):
                if isinstance(usage.get(key), int | float):
                    family.add_metric(values, float(usage[key]))
        yield from (up, state, health, restarts, memory, memory_peak, cpu, throttled, pids)
        yield from self._rpc()
        yield from self._rollouts()

    def _rpc(self) -> Iterator[Metric]:
        broker = self._sup.broker
        requests = CounterMetricFamily(
            "osk_rpc_requests", "calls answered by outcome", labels=["plugin", "outcome"]
        )
        duration = HistogramMetricFamily(
            "osk_rpc_duration_seconds",
            "time from a call's arrival at the broker to its answer",
            labels=["plugin"],
        )
        health = HistogramMetricFamily(
            "osk_health_check_duration_seconds",
            "time from a health probe to its answer",
            labels=["plugin"],
        )
        for plugin, outcomes, buckets, total in broker.plugin_metrics():
            for outcome, count in outcomes.items():
                requests.add_metric([plugin, outcome], float(count))
            duration.add_metric([plugin], buckets, total)
        for plugin, buckets, total in self._sup.checks.duration_metrics():
            health.add_metric([plugin], buckets, total)
        drops = CounterMetricFamily(
            "osk_broker_dropped_frames", "frames the broker refused", labels=["reason"]
        )
        drops.add_metric(["malformed"], float(broker.stats.dropped_malformed))
        drops.add_metric(["unauthenticated"], float(broker.stats.dropped_unauthenticated))
        drops.add_metric(["late_reply"], float(broker.stats.late_replies))
        yield from (requests, duration, health, drops)

    def _rollouts(self) -> Iterator[Metric]:
        phase = GaugeMetricFamily(
            "osk_rollout_phase", "current phase of the plugin's last rollout", labels=["plugin"]
        )
        phases = GaugeMetricFamily(
            "osk_rollout_phases", "phases of the plugin's last rollout", labels=["plugin"]
        )
        state = GaugeMetricFamily(
            "osk_rollout_state", "1 for the last rollout's state", labels=["plugin", "state"]
        )
        weight = GaugeMetricFamily(
            "osk_rollout_weight_percent", "traffic share per version", labels=["plugin", "version"]
        )
        for plugin, run in self._sup.rollouts.runs.items():
            status = run.status()
            phase.add_metric([plugin], float(status["phase"]))
            phases.add_metric([plugin], float(status["phases"]))
            state.add_metric([plugin, str(status["state"])], 1.0)
            if status["weights"]:
                weight.add_metric([plugin, run.spec.stable], float(status["weights"][0]))
                weight.add_metric([plugin, run.spec.canary], float(status["weights"][1]))
        yield from (phase, phases, state, weight)


def parse_listen(text: str) -> tuple[str, int]:
    """``host:port`` (``[::1]:9184`` for IPv6). Raises ValueError naming the problem."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:  # 0: any free port
        raise ValueError(f"expected host:port such as '127.0.0.1:9184', got {text!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


async def serve_metrics(sup: Supervisor, listen: str, *, task_status: Any = None) -> None:
    """Serve ``/metrics`` until cancelled. ``task_status.started((host, port))`` once bound."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SupervisorCollector(sup))
    host, port = parse_listen(listen)

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5.0)
            method, path, *_ = head.split(b" ", 2)
            if method != b"GET" or path.split(b"?")[0] not in (b"/metrics", b"/"):
                body, status, ctype = b"only GET /metrics\n", b"404 Not Found", b"text/plain"
            else:
                body, status = generate_latest(registry), b"200 OK"
                ctype = CONTENT_TYPE_LATEST.encode()
            writer.write(
                b"HTTP/1.1 "
                + status
                + b"\r\nContent-Type: "
                + ctype
                + b"\r\nContent-Length: "
                + str(len(body)).encode()
                + b"\r\nConnection: close\r\n\r\n"
                + body
            )
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ValueError):
            pass  # a bad or slow client gets nothing; the daemon carries on
        except ConnectionError:
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(answer, host, port)
    bound = server.sockets[0].getsockname()[:2]
    log.info("metrics on http://%s:%d/metrics", bound[0], bound[1])
    if task_status is not None:
        task_status.started(bound)
    async with server:
        await server.serve_forever()
