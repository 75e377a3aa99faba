"""kill -9 the daemon, start it again: how soon are its plugins adopted and answering?

Setup: one daemon runs ``--plugins`` plugins (``benchplugins:Stamp``), each its own
process. Baseline, in the same run: a cold start of the same config (daemon start until
every plugin is ready), which is what a supervisor that cannot re-adopt pays on every
restart of its own (and its plugins lose their memory).

Each round: SIGKILL the daemon (by pid), ``t0 = time.monotonic()``, start a new one on the
same runtime dir; time until its control socket answers, until every plugin is READY again
with its *old* pid (re-adopted, not restarted), and until a call through the broker is
answered. The time the daemon takes to import Python and boot is included; how long the
machine leaves between kill and start is not (the bench starts it at once).

The bench makes itself a child subreaper, so the plugins of a killed daemon are re-parented
to it, and reaps what it started at the end.

    python bench/readopt.py [--json] [--rounds N] [--plugins N]
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import signal
import time

from _common import (
    PERCENTILE_METHOD,
    BenchDaemon,
    bench_plugin,
    daemon_config,
    emit,
    machine,
    ms,
    run_main,
    summarize,
    table,
    temp_dir,
    verdict,
)

from osk_daemon.ipc.client import Client

GOAL = 1.0  # "re-adopts them within a second" (issue 6)
_PR_SET_CHILD_SUBREAPER = 36


def config(n: int) -> str:
    plugins = {f"p{i}": bench_plugin() for i in range(n)}
    return daemon_config(plugins, heartbeat_interval=0.5, orphan_timeout=30.0)


def pids(d: BenchDaemon) -> dict[str, int]:
    return {r["plugin"]: r["pid"] for r in d.ctl("status")}


def recorded(d: BenchDaemon, before: dict[str, int], timeout: float = 10.0) -> None:
    """Until the state file lists every plugin READY with its pid (it trails a change by up
    to 50 ms: a daemon killed sooner leaves the older file, and those plugins restart)."""
    want = {(name, pid) for name, pid in before.items()}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError):
            rows = json.loads((d.runtime / "instances.json").read_text())["instances"]
            if want <= {(r["plugin"], r["pid"]) for r in rows if r["state"] == "ready"}:
                return
        time.sleep(0.005)  # a benchmark's pacing, outside the timed part
    raise RuntimeError("the state file never recorded every plugin ready")


def one_round(d: BenchDaemon, before: dict[str, int]) -> dict[str, float]:
    assert d.proc is not None
    recorded(d, before)
    d.proc.send_signal(signal.SIGKILL)
    d.proc.wait()
    t0 = time.monotonic()
    d.start(timeout=30)
    socket_up = time.monotonic() - t0

    def adopted() -> bool:
        rows = d.ctl("status")
        return all(r["state"] == "ready" and r["pid"] == before[r["plugin"]] for r in rows)

    d.wait_until(adopted, timeout=30)
    ready = time.monotonic() - t0
    with Client(d.broker) as client:
        client.call("p0", "echo", {"text": "back"}, timeout=10)
    answering = time.monotonic() - t0
    return {"socket": socket_up, "adopted": ready, "answering": answering}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", action="store_true", help="exact JSON on stdout")
    parser.add_argument("--rounds", type=int, default=5, help="default 5")
    parser.add_argument("--plugins", type=int, default=20, help="default 20")
    args = parser.parse_args()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    rounds: list[dict[str, float]] = []
    with temp_dir() as work:
        d = BenchDaemon(work, config(args.plugins))
        try:
            t0 = time.monotonic()
            d.start(timeout=30)
            d.wait_until(d.ready, timeout=60)
            cold = time.monotonic() - t0
            before = pids(d)
            for _ in range(args.rounds):
                rounds.append(one_round(d, before))
                if pids(d) != before:
                    raise RuntimeError("a plugin was restarted instead of re-adopted")
        finally:
            d.stop()
            with contextlib.suppress(ChildProcessError):
                while os.waitpid(-1, os.WNOHANG)[0]:  # what the killed daemons left to us
                    pass
    stats = {k: summarize([r[k] for r in rounds]) for k in ("socket", "adopted", "answering")}
    adopted_p50 = stats["adopted"]["p50"]
    text = "\n".join(
        [
            f"re-adoption after kill -9 of the daemon, {args.plugins} plugins, "
            f"{args.rounds} rounds (p50 / p99 / max)",
            table(
                ["from kill -9 + restart to", "p50", "p99", "max"],
                [
                    [what, ms(s["p50"]), ms(s["p99"]), ms(s["max"])]
                    for what, s in (
                        ("control socket answers", stats["socket"]),
                        ("every plugin READY, same pid", stats["adopted"]),
                        ("a call answered", stats["answering"]),
                    )
                ],
            ),
            f"baseline, same run: cold start of the same {args.plugins} plugins: {ms(cold)}",
            f"goal re-adopted p50 <= {ms(GOAL)}: {ms(adopted_p50)} -> "
            f"{verdict(adopted_p50 <= GOAL)}",
        ]
    )
    data = {
        "machine": machine(),
        "percentiles": PERCENTILE_METHOD,
        "unit": "seconds",
        "plugins": args.plugins,
        "cold_start": cold,
        "stats": stats,
        "rounds": rounds,
        "goals": {f"re-adopted p50 <= {GOAL}s": adopted_p50 <= GOAL},
    }
    emit(text, data, args.json)


if __name__ == "__main__":
    run_main(main)
