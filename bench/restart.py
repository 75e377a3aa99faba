"""Crash -> replacement running -> answering calls, through a real daemon.

Each round: read the plugin's pid from the control socket (``status``), take
``t0 = time.monotonic()``, SIGKILL it, and call it at once through the broker, which queues
the request while the plugin restarts, so the replacement answers it. The answer carries
the replacement's pid and the ``time.monotonic()`` its ``start()`` recorded (CLOCK_MONOTONIC
is system-wide, so both clocks are the same). If the request reached the broker before it
learned of the death, it is answered with a plugin error and re-sent; such rounds are
counted as ``retried`` (their time includes the retry).

Pass 1 (many rounds): backoff without delay and a group intensity high enough that the
benchmark is not throttled; the replacement comes from the zygote's warm pool. Pass 2: the
same with ``standby = true``: each round first waits until the instance's standby is armed
(its ``plugin:standby`` event), and the crash promotes it. Pass 3 (default backoff): only
the first restart after a stable
period is immediate, and waiting ``reset_after`` (10 s) between rounds is too slow, so each
of a few fresh daemons is killed twice: the first restart (immediate) and, right after, a
second one (delayed by ``backoff.base`` +- jitter).

    python bench/restart.py [--json] [--rounds N]   # pass-1 rounds (default 40)
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

from _common import (
    PERCENTILE_METHOD,
    BenchDaemon,
    bench_plugin,
    daemon_config,
    emit,
    machine,
    ms,
    open_daemon,
    parse_args,
    run_main,
    summarize,
    table,
    verdict,
)

from osk_daemon.errors import PluginError
from osk_daemon.ipc.client import Client

PLUGIN = "stamp"
FRESH_DAEMONS = 5
GOAL_CODE = 0.005
GOAL_ANSWER = 0.010
MAX_RETRIES = 5
FAST_CONFIG = daemon_config(
    plugins={
        PLUGIN: bench_plugin(restart="permanent", backoff={"base": 0.0, "max": 0.0, "jitter": 0.0})
    },
    groups={"root": {"intensity": 1000, "period": 1.0}},
)
STANDBY_CONFIG = daemon_config(
    plugins={
        PLUGIN: bench_plugin(
            restart="permanent",
            standby=True,
            backoff={"base": 0.0, "max": 0.0, "jitter": 0.0},
        )
    },
    groups={"root": {"intensity": 1000, "period": 1.0}},
)
DEFAULT_CONFIG = daemon_config(plugins={PLUGIN: bench_plugin(restart="permanent")})


def kill_and_call(daemon: BenchDaemon, client: Client) -> dict[str, Any]:
    """One crash; returns the two durations (seconds) and how the answer came."""
    old = daemon.row(PLUGIN)
    if old["state"] != "ready" or not old["pid"]:
        raise RuntimeError(f"plugin not ready before the kill: {old}")
    pid = old["pid"]
    t0 = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    errors: list[str] = []
    while True:
        try:
            answer = client.call(PLUGIN, "stamp", timeout=5.0)
        except PluginError as exc:  # sent to the dying instance before the daemon knew
            errors.append(f"{type(exc).__name__}: {exc}")
            if len(errors) > MAX_RETRIES:
                raise RuntimeError(f"no answer after {len(errors)} tries: {exc}") from exc
            continue
        if answer["pid"] != pid:
            break
        raise RuntimeError(f"killed pid {pid} answered: {answer}")
    t_answer = time.monotonic()
    return {
        "old_pid": pid,
        "new_pid": answer["pid"],
        "code": answer["started"] - t0,
        "answer": t_answer - t0,
        "retries": len(errors),
        "errors": errors,
    }


def armed(daemon: BenchDaemon) -> bool:
    standby = daemon.row(PLUGIN)["standby"]
    return bool(standby and standby["armed"])


def fast_pass(rounds: int, config: str, standby: bool) -> list[dict[str, Any]]:
    results = []
    with open_daemon(config) as daemon, Client(daemon.broker) as client:
        client.call(PLUGIN, "stamp")
        for _ in range(rounds):
            if standby:
                daemon.wait_until(lambda: armed(daemon))
            results.append(kill_and_call(daemon, client))
            if daemon.row(PLUGIN)["pid"] != results[-1]["new_pid"]:
                raise RuntimeError("status does not show the replacement that answered")
    return results


def default_pass(daemons: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    first, second = [], []
    for _ in range(daemons):
        with open_daemon(DEFAULT_CONFIG) as daemon, Client(daemon.broker) as client:
            client.call(PLUGIN, "stamp")
            first.append(kill_and_call(daemon, client))
            second.append(kill_and_call(daemon, client))
    return first, second


def rows_for(label: str, results: list[dict[str, Any]], goals: bool) -> list[list[Any]]:
    out = []
    for key, what, goal in (
        ("code", "crash -> replacement's plugin code running", GOAL_CODE),
        ("answer", "crash -> answering calls", GOAL_ANSWER),
    ):
        s = summarize([r[key] for r in results])
        mark = f"p50 <= {ms(goal)}: {verdict(s['p50'] <= goal)}" if goals else ""
        out.append([label, what, s["n"], ms(s["p50"]), ms(s["p99"]), ms(s["max"]), mark])
    return out


def main() -> None:
    args = parse_args(__doc__.split("\n")[0], 40)
    fast = fast_pass(args.rounds, FAST_CONFIG, standby=False)
    hot = fast_pass(args.rounds, STANDBY_CONFIG, standby=True)
    first, second = default_pass(FRESH_DAEMONS)

    p50 = {
        (label, key): summarize([r[key] for r in results])["p50"]
        for label, results in (("warm", fast), ("standby", hot))
        for key in ("code", "answer")
    }
    rows = [
        *rows_for("no-delay backoff", fast, True),
        *rows_for("no-delay, standby", hot, True),
        *rows_for("default, 1st restart", first, True),
        *rows_for("default, 2nd restart", second, False),
    ]
    everything = [*fast, *hot, *first, *second]
    retried = [r for r in everything if r["retries"]]
    text = "\n".join(
        [
            f"restart: SIGKILL -> replacement; passes 1 and 2 {args.rounds} rounds on one "
            f"daemon each; pass 3 {FRESH_DAEMONS} fresh daemons, killed twice each",
            f"percentiles: {PERCENTILE_METHOD}",
            "",
            "pass 1 config:",
            *(f"    {line}".rstrip() for line in FAST_CONFIG.strip().splitlines()),
            "pass 2 config: the same with standby = true in [plugins.stamp]",
            "pass 3 config: the same plugin with default backoff "
            "(base 0.1, factor 2, max 30, jitter 0.1, reset_after 10) and default root group",
            "",
            table(["pass", "metric", "n", "p50", "p99", "max", "goal"], rows),
            "",
            *(
                f"goal crash -> {what} p50 <= {ms(goal)}: standby {ms(p50['standby', key])} "
                f"-> {verdict(p50['standby', key] <= goal)}; warm zygote child "
                f"{ms(p50['warm', key])} -> {verdict(p50['warm', key] <= goal)}"
                for key, what, goal in (
                    ("code", "code", GOAL_CODE),
                    ("answer", "answering", GOAL_ANSWER),
                )
            ),
            f"rounds whose first call reached the dead instance and was re-sent: "
            f"{len(retried)} of {len(everything)}"
            + (f" (the error: {retried[0]['errors'][0]})" if retried else ""),
            "for scale (NOT measured here, published figures): PM2 ~18 ms, supervisord ~1 s",
        ]
    )
    data = {
        "machine": machine(),
        "percentiles": PERCENTILE_METHOD,
        "unit": "seconds",
        "fast_config": FAST_CONFIG,
        "default_config": DEFAULT_CONFIG,
        "standby_config": STANDBY_CONFIG,
        "fast": {
            "code": summarize([r["code"] for r in fast]),
            "answer": summarize([r["answer"] for r in fast]),
            "rounds": fast,
        },
        "standby": {
            "code": summarize([r["code"] for r in hot]),
            "answer": summarize([r["answer"] for r in hot]),
            "rounds": hot,
        },
        "default_first": {
            "code": summarize([r["code"] for r in first]),
            "answer": summarize([r["answer"] for r in first]),
            "rounds": first,
        },
        "default_second": {
            "code": summarize([r["code"] for r in second]),
            "answer": summarize([r["answer"] for r in second]),
            "rounds": second,
        },
        "goals": {
            f"crash -> {key} p50 <= {goal}s, {label}": p50[label, key] <= goal
            for label in ("standby", "warm")
            for key, goal in (("code", GOAL_CODE), ("answer", GOAL_ANSWER))
        },
        "not_measured_comparison": {"pm2": 0.018, "supervisord": 1.0},
    }
    emit(text, data, args.json)


if __name__ == "__main__":
    run_main(main)
