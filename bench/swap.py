"""Benchmark version swaps under constant load: failed calls, latency, cut-over time.

One real daemon runs ``counter`` (installed in ``bench/plugins/installed``, versions
1.0.0 and 2.0.0, which hand their count over). A load thread calls it non-stop through
the broker's client socket and records every call (start, latency, version, ok or the
error). Meanwhile ``--swaps`` rolling swaps alternate the version (``oskctl deploy``),
each waited for on the daemon's event stream, with steady load in between.

Reported, from the same run:

- total calls and failed calls (goal: 0 failed of at least 10,000);
- latency p50/p99 of calls that started in a steady window vs inside a swap
  (goal: p99 during swaps <= 3x steady);
- cut-over: per retired instance, from the rollout's decision to stop it (the new
  instance is ready and healthy by then, so its own start is excluded) to its last
  in-flight request answered, from the ``rollout:drained`` event (goal: <= 50 ms);
- how long a whole swap takes, new instance start included;
- with ``--instances 1``: per swap, the calls the old version answered after it
  exported its count, which the new version's count therefore lacks (the state
  hand-over's age; ``supervisor.handover``).

Each is measured twice by default, in one bench run: with the default
``rollout.start_cpu = 0.01`` (each new instance's cgroup may use 1 % of a core until it
asks for its hand-over state or is ready, at most ``start_cpu_for`` seconds) and with 0
(new instances start uncapped).

Usage: ``python bench/swap.py [--swaps N] [--instances N] [--min-calls N]
[--start-cpu 0.01,0] [--callers N] [--json]``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import socket
import time
from statistics import median
from typing import Any

from _common import (
    BENCH,
    PERCENTILE_METHOD,
    BenchDaemon,
    daemon_config,
    emit,
    machine,
    ms,
    open_daemon,
    percentile,
    run_main,
    table,
    verdict,
)

from osk_daemon.errors import OskError
from osk_daemon.ipc.client import Client

INSTALLED = BENCH / "plugins" / "installed"
Call = tuple[float, float, str | None, int, str]  # start, latency, version, count, error
GOAL_FAILED = 0
GOAL_P99_RATIO = 3.0
GOAL_CUTOVER = 0.050


class Load:
    """``callers`` sequential callers, each its own *process* (a thread would share the
    bench's GIL: whenever the bench's own thread runs, a call's reply waits up to the 5 ms
    switch interval, which would be measured as the daemon's latency); with more than
    one, calls are in flight together, as a leaving instance's drain should see them.
    Each call is recorded as (start, latency, version or None, count, error); start is
    CLOCK_MONOTONIC, shared with the parent, so calls can be matched with the swap
    windows."""

    def __init__(self, endpoint: str, callers: int = 1) -> None:
        self.endpoint = endpoint
        self.calls: list[Call] = []
        self.count = multiprocessing.Value("q", 0)
        self._stop = multiprocessing.Event()
        self._pipes = [multiprocessing.Pipe(duplex=False) for _ in range(callers)]
        self._procs = [
            multiprocessing.Process(target=self._run, args=(send,), daemon=True)
            for _, send in self._pipes
        ]

    def _run(self, send: Any) -> None:
        calls: list[Call] = []
        with Client(self.endpoint) as client:
            deadline = time.monotonic() + 600  # bounded whatever happens
            while not self._stop.is_set() and time.monotonic() < deadline:
                start = time.monotonic()
                try:
                    count, version = client.call("counter", "incr", timeout=10.0)
                    calls.append((start, time.monotonic() - start, version, count, ""))
                except OskError as exc:
                    err = f"{type(exc).__name__}: {exc}"
                    calls.append((start, time.monotonic() - start, None, 0, err))
                with self.count.get_lock():
                    self.count.value += 1
        send.send(calls)

    def start(self) -> None:
        for proc in self._procs:
            proc.start()

    def done(self) -> int:
        return int(self.count.value)

    def stop(self) -> None:
        self._stop.set()
        for (results, _), proc in zip(self._pipes, self._procs, strict=True):
            if results.poll(60):
                self.calls += results.recv()
            proc.join(30)
            if proc.is_alive():
                proc.kill()
        self.calls.sort()


def swap(d: BenchDaemon, version: str) -> tuple[float, float]:
    """Deploy ``version`` and wait for its end on the event stream (no polling, so the
    bench adds no control traffic during the swap); return (start, end), monotonic."""
    before = {r["instance"] for r in d.ctl("status", plugin="counter")}
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(120)
        sock.connect(str(d.control))
        sock.sendall(b'{"cmd": "events", "args": {"follow": true, "lines": 0}}\n')
        start = time.monotonic()
        d.ctl("deploy", plugin="counter", version=version, strategy="rolling")
        ended = _read_until(sock, ("rollout:succeeded", "rollout:rolled-back"))
    end = time.monotonic()
    if ended["type"] != "rollout:succeeded":
        raise RuntimeError(f"the swap to {version} rolled back: {ended}\n{d.tail()}")
    after = {r["instance"] for r in d.ctl("status", plugin="counter")}
    assert after.isdisjoint(before), "every instance was replaced"
    return start, end


def _read_until(sock: socket.socket, types: tuple[str, ...]) -> dict[str, Any]:
    buf = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            raise RuntimeError("the event stream closed")
        buf += chunk
        *lines, buf = buf.split(b"\n")
        for line in lines:
            event = json.loads(line).get("stream") if line.strip() else None
            if isinstance(event, dict) and event.get("type") in types:
                return event


def wait_calls(d: BenchDaemon, load: Load, count: int) -> None:
    """Let ``count`` more calls through (steady load between swaps). The counter lives
    in shared memory, so there is nothing to wait on but its value: poll it every 10 ms."""
    target = load.done() + count
    deadline = time.monotonic() + 120
    while load.done() < target:
        if time.monotonic() > deadline:
            raise TimeoutError(f"the load stalled at {load.done()} calls:\n{d.tail()}")
        time.sleep(0.01)


def measure(
    swaps: int,
    instances: int,
    min_calls: int,
    steady_calls: int,
    start_cpu: float,
    callers: int = 1,
) -> dict[str, Any]:
    rollout = {"drain_timeout": 10.0, "max_surge": 1, "max_unavailable": 0}
    config = daemon_config(
        {
            "counter": {
                "version": "1.0.0",
                "instances": instances,
                "health_check": {"interval": 0.5, "timeout": 0.25},
                "rollout": {**rollout, "start_cpu": start_cpu},
            }
        },
        plugins_dir=str(INSTALLED),
        cgroups=os.environ.get("SWAP_CGROUPS", "1") == "1",
    )
    windows: list[tuple[float, float]] = []
    with open_daemon(config) as d:
        load = Load(d.broker, callers)
        load.start()
        try:
            wait_calls(d, load, steady_calls)
            for n in range(swaps):
                windows.append(swap(d, "2.0.0" if n % 2 == 0 else "1.0.0"))
                wait_calls(d, load, steady_calls)
            while load.done() < min_calls:
                wait_calls(d, load, min(steady_calls, min_calls - load.done()))
        finally:
            load.stop()
        drained = [e for e in d.ctl("events", lines=1000) if e["type"] == "rollout:drained"]
    calls = load.calls

    def during(start: float) -> bool:
        return any(a <= start <= b for a, b in windows)

    steady = [lat for s, lat, _, _, err in calls if not err and not during(s)]
    swapping = [lat for s, lat, _, _, err in calls if not err and during(s)]
    failed = [err for *_, err in calls if err]
    cutovers = [e["drain_ms"] / 1000 for e in drained]
    in_flight = [int(e.get("in_flight", 0)) for e in drained]
    return {
        "start_cpu": start_cpu,
        "callers": callers,
        "swaps": swaps,
        "instances": instances,
        "calls": len(calls),
        "failed": len(failed),
        "failures": failed[:10],
        "steady": {
            "n": len(steady),
            "p50": percentile(steady, 0.5),
            "p99": percentile(steady, 0.99),
        },
        "during": {
            "n": len(swapping),
            "p50": percentile(swapping, 0.5),
            "p99": percentile(swapping, 0.99),
        },
        "cutover": {
            "n": len(cutovers),
            "in_flight_max": max(in_flight, default=0),
            "p50": percentile(cutovers, 0.5),
            "max": max(cutovers) if cutovers else 0.0,
        },
        "swap_duration": {
            "p50": percentile([b - a for a, b in windows], 0.5),
            "max": max(b - a for a, b in windows),
        },
        "versions_seen": sorted({v for _, _, v, _, _ in calls if v}),
        "lost_in_handover": lost_in_handover(calls, windows) if instances == 1 else None,
    }


def lost_in_handover(calls: list[Call], windows: list[tuple[float, float]]) -> list[int]:
    """Per swap of a single instance: the old version's last count minus the count the
    new version imported (its first count - 1): each count the old instance returned
    after its export is one call the state lacks."""
    lost = []
    for n, (begin, end) in enumerate(windows):
        new = "2.0.0" if n % 2 == 0 else "1.0.0"
        inside = [(v, c) for s, _, v, c, err in calls if not err and begin <= s <= end]
        old_counts = [c for v, c in inside if v != new]
        new_counts = [c for v, c in inside if v == new]
        if old_counts and new_counts:
            lost.append(max(old_counts) - (min(new_counts) - 1))
    return lost


def rows_of(r: dict[str, Any], min_calls: int) -> list[list[Any]]:
    ratio = r["p99_ratio"]
    return [
        ["calls", r["calls"], "", f">= {min_calls}"],
        ["failed calls", r["failed"], "", f"{GOAL_FAILED}: {verdict(r['failed'] == GOAL_FAILED)}"],
        ["latency steady", f"p50 {ms(r['steady']['p50'])}", f"p99 {ms(r['steady']['p99'])}", ""],
        [
            "latency during swaps",
            f"p50 {ms(r['during']['p50'])}",
            f"p99 {ms(r['during']['p99'])}",
            f"p99 <= {GOAL_P99_RATIO:g}x steady: {ratio:.2f}x {verdict(ratio <= GOAL_P99_RATIO)}",
        ],
        [
            f"cut-over (stop decided -> drained; <= {r['cutover']['in_flight_max']} in flight)",
            f"p50 {ms(r['cutover']['p50'])}",
            f"max {ms(r['cutover']['max'])}",
            f"<= {ms(GOAL_CUTOVER)}: {verdict(r['cutover']['max'] <= GOAL_CUTOVER)}",
        ],
        [
            "whole swap (new start included)",
            f"p50 {ms(r['swap_duration']['p50'])}",
            f"max {ms(r['swap_duration']['max'])}",
            "",
        ],
        *(
            [
                [
                    "calls missing from a handed-over state",
                    f"p50 {median(lost):g}",
                    f"max {max(lost)}",
                    "",
                ]
            ]
            if (lost := r["lost_in_handover"])
            else []
        ),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="print exact JSON on stdout")
    parser.add_argument("--swaps", type=int, default=10)
    parser.add_argument("--instances", type=int, default=2)
    parser.add_argument("--callers", type=int, default=1, help="concurrent sequential callers")
    parser.add_argument("--min-calls", type=int, default=10_000)
    parser.add_argument("--steady-calls", type=int, default=800)
    parser.add_argument(
        "--start-cpu",
        default="0.01,0",
        help="rollout.start_cpu values, one daemon run each (default: the default 0.01, 0)",
    )
    args = parser.parse_args()
    runs = []
    for start_cpu in (float(v) for v in args.start_cpu.split(",")):
        r = measure(
            args.swaps, args.instances, args.min_calls, args.steady_calls, start_cpu, args.callers
        )
        steady = r["steady"]["p99"]
        r["p99_ratio"] = r["during"]["p99"] / steady if steady else float("inf")
        runs.append(r)
    parts = []
    for r in runs:
        parts.append(
            f"rollout.start_cpu = {r['start_cpu']:g}: {r['swaps']} rolling swaps of "
            f"{r['instances']} instance(s) under {r['callers']} sequential caller(s); "
            f"versions seen "
            f"{', '.join(r['versions_seen'])}\n"
            + table(["metric", "a", "b", "goal"], rows_of(r, args.min_calls))
        )
        if r["failures"]:
            parts.append("first failures:\n" + "\n".join(f"  {f}" for f in r["failures"]))
    text = f"swap: percentiles {PERCENTILE_METHOD}\n\n" + "\n\n".join(parts)
    emit(text, {"machine": machine(), "runs": runs}, args.json)


if __name__ == "__main__":
    run_main(main)
