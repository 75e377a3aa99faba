"""osk-daemon against its peers, in one run, on one machine: crash -> respawn, and scale.

Every supervisor runs the same child, ``bench/plugins/peerstamp.py``, whose very first line
records ``time.monotonic()`` (CLOCK_MONOTONIC is system-wide, so the bench compares it with
its own clock) and appends ``"<pid> <time>"`` to a stamp file. Under osk-daemon the same
module is the plugin ``peerstamp:Idle`` (the worker imports it, so its module-level code is
the replacement's first plugin code); under the peers it is run as a script by the bench's
own Python (``sys.executable``), so their times include the interpreter's start-up, which
is what a peer's respawned service pays.

Each round: take the live child's pid from the stamp file, ``t0 = time.monotonic()``,
SIGKILL it, wait for a line with another pid; the sample is its time minus ``t0``. Then the
bench waits ``--settle`` seconds (default 1.1) before the next round, for every supervisor
(so a child always lived > 1 s: with readiness notification s6-supervise keeps launches
>= 1 s apart, and a 0.2 s settle measured ~830 ms, that pause; without it, s6 pauses ~1 s
before every relaunch anyway).
Every supervisor is configured not to throttle a crash loop (that is the workload): osk-daemon
backoff 0 and group intensity 1000/s; supervisord ``startsecs=0``, ``startretries=1000``;
circus defaults (``respawn = true``); PM2 ``restart_delay 0``, ``min_uptime 0``,
``max_restarts 100000``; s6 defaults, once as is and once with readiness notification
(``notification-fd``; the child writes a newline to it), since s6-supervise pauses 1 s
between launches unless the service was ready.

Peers: supervisor and circus are pip-installed into a virtualenv under a temp dir, PM2 with
``npm install pm2`` into that dir, s6 from Debian (``apt-get install -y s6`` if
``s6-svscan`` is missing and we are root; that package stays installed). A peer that
cannot be had is skipped with a note. Every supervisor runs in its own ``osk-b-*`` temp dir;
it, and every process it started, is stopped by pid and removed afterwards, whatever
happens; the install dir too (unless given with ``--peers-dir``, which reuses it).

The scale workload (issue 7: N = 200 and 500 idle children; time until all run,
supervisor RSS, idle CPU, status latency) is ``peers_scale``; how each supervisor is
installed, configured for N children, started and stopped is ``peers_run``.
``--only NAME,...`` limits a run to some supervisors (``osk-daemon``, ``supervisord``,
``circus``, ``PM2``, ``s6``, ``s6 + notification-fd``).

    python bench/peers.py [--json] [--workload crash|scale|all] [--rounds N] [--quick]
        [--settle S] [--scale 200,500] [--idle S] [--status-runs K] [--osk-runs K]
        [--only NAMES] [--peers-dir DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _common import (
    PERCENTILE_METHOD,
    emit,
    machine,
    ms,
    run_main,
    summarize,
    table,
    temp_dir,
    verdict,
)
from peers_run import (
    Skip,
    install_pm2,
    install_python_peers,
    install_s6,
    peer_versions,
    under_circus,
    under_osk,
    under_pm2,
    under_s6,
    under_supervisord,
)
from peers_scale import Opener, measure_scale, report_scale

GOAL_FACTOR = 3.0
ROUND_TIMEOUT = 20.0


# ---- the stamp file ------------------------------------------------------------------------


def stamps(path: Path) -> list[tuple[int, float]]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    out = []
    for line in text.splitlines():
        pid, _, when = line.partition(" ")
        if when:
            out.append((int(pid), float(when)))
    return out


def wait_stamp(path: Path, count: int, timeout: float = ROUND_TIMEOUT) -> tuple[int, float]:
    """The ``count``-th stamp (1-based), polled every 0.5 ms; the time is the child's own."""
    deadline = time.monotonic() + timeout
    while True:
        lines = stamps(path)
        if len(lines) >= count:
            return lines[count - 1]
        if time.monotonic() > deadline:
            raise TimeoutError(f"no stamp #{count} in {timeout} s")
        time.sleep(0.0005)


def crash_rounds(
    stamp: Path, rounds: int, settle: float, track: Callable[[], None]
) -> list[dict[str, Any]]:
    pid, _ = wait_stamp(stamp, 1, timeout=60.0)
    time.sleep(max(settle, 0.5))
    track()
    results = []
    for _ in range(rounds):
        seen = len(stamps(stamp))
        pid, _ = stamps(stamp)[-1]
        t0 = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        new_pid, started = wait_stamp(stamp, seen + 1)
        if new_pid == pid:
            raise RuntimeError(f"killed pid {pid} stamped again")
        results.append({"old_pid": pid, "new_pid": new_pid, "respawn": started - t0})
        time.sleep(settle)
        track()
    return results


# ---- main ----------------------------------------------------------------------------------


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="JSON on stdout, table on stderr")
    parser.add_argument(
        "--workload", choices=["crash", "scale", "all"], default="all", help="default all"
    )
    parser.add_argument("--rounds", type=int, default=30, help="crash rounds (default 30)")
    parser.add_argument(
        "--quick", action="store_true", help="10 crash rounds, 3 status runs, 5 s idle window"
    )
    parser.add_argument(
        "--settle", type=float, default=1.1, help="seconds between rounds (default 1.1)"
    )
    parser.add_argument(
        "--scale", type=_sizes, default=[200, 500], help="children per run (default 200,500)"
    )
    parser.add_argument("--idle", type=float, default=10.0, help="idle CPU window (default 10 s)")
    parser.add_argument("--status-runs", type=int, default=5, help="status runs (default 5)")
    parser.add_argument("--osk-runs", type=int, default=2, help="scale runs of osk (default 2)")
    parser.add_argument(
        "--scale-timeout", type=float, default=120.0, help="for all N to run (default 120 s)"
    )
    parser.add_argument("--only", help="comma-separated supervisors (e.g. osk-daemon,s6)")
    parser.add_argument("--peers-dir", type=Path, help="reuse (and keep) this install dir")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds = min(args.rounds, 10)
        args.status_runs = min(args.status_runs, 3)
        args.idle = min(args.idle, 5.0)
    return args


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of integers: {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"sizes must be >= 1: {text!r}")
    return sizes


def measure(name: str, opener: Opener, args: Any) -> dict[str, Any]:
    with temp_dir() as work:
        stamp = work / "stamps"
        try:
            with opener(work, stamp, 1) as sup:
                results = crash_rounds(stamp, args.rounds, args.settle, sup.track)
        except Skip as exc:
            return {"name": name, "skipped": str(exc)}
        except (TimeoutError, RuntimeError, OSError) as exc:
            logs = "".join(
                p.read_text(errors="replace")[-400:] for p in work.glob("*.log") if p.is_file()
            )
            return {"name": name, "skipped": f"failed: {exc}", "log": logs}
    return {"name": name, "rounds": results, "respawn": summarize([r["respawn"] for r in results])}


Plan = list[tuple[str, Opener | None, str]]


def plans(base: Path) -> tuple[Plan, Plan, dict[str, str]]:
    """Install what can be had; the crash and scale plans (name, opener or None, note)."""
    venv, venv_note = install_python_peers(base)
    pm2, pm2_note = install_pm2(base)
    s6, s6_note = install_s6()
    peers: Plan = [
        (
            "supervisord",
            (lambda w, s, n: under_supervisord(w, s, venv, n)) if venv else None,
            venv_note,
        ),
        ("circus", (lambda w, s, n: under_circus(w, s, venv, n)) if venv else None, venv_note),
        ("PM2", (lambda w, s, n: under_pm2(w, s, pm2, n)) if pm2 else None, pm2_note),
        ("s6", (lambda w, s, n: under_s6(w, s, False, n)) if s6 else None, s6_note),
    ]
    ready: Plan = [
        ("s6 + notification-fd", (lambda w, s, n: under_s6(w, s, True, n)) if s6 else None, s6_note)
    ]
    standby: Plan = [
        ("osk-daemon+standby", lambda w, s, n: under_osk(w, s, n, standby=True), ""),
    ]
    crash = [("osk-daemon", under_osk, ""), *standby, *peers, *ready]
    return crash, peers, peer_versions(venv, pm2, s6)


def main() -> None:
    args = parse()
    only = set(args.only.split(",")) if args.only else None
    own_install = args.peers_dir is None
    base = Path(tempfile.mkdtemp(prefix="osk-peers-")) if own_install else args.peers_dir
    base.mkdir(parents=True, exist_ok=True)
    crash: list[dict[str, Any]] = []
    scale: list[dict[str, Any]] = []
    try:
        crash_plan, scale_peers, versions = plans(base)
        if args.workload in ("crash", "all"):
            for name, opener, note in crash_plan:
                if only is not None and name not in only:
                    continue
                if opener is None:
                    crash.append({"name": name, "skipped": note})
                    continue
                print(f"peers: crash, {name} ...", file=sys.stderr, flush=True)
                crash.append(measure(name, opener, args))
        if args.workload in ("scale", "all"):
            runs = args.osk_runs
            osk: Plan = [(f"osk-daemon #{i + 1}", under_osk, "") for i in range(runs)]
            for n in args.scale:
                for name, opener, note in [*osk, *scale_peers]:
                    if only is not None and name.partition(" #")[0] not in only:
                        continue
                    if opener is None:
                        scale.append({"name": name, "n": n, "skipped": note})
                        continue
                    print(f"peers: scale {n}, {name} ...", file=sys.stderr, flush=True)
                    scale.append(measure_scale(name, opener, n, args))
    finally:
        if own_install:
            shutil.rmtree(base, ignore_errors=True)
    report(crash, scale, versions, args)


def report_crash(
    results: list[dict[str, Any]], args: Any
) -> tuple[list[str], dict[str, bool | None]]:
    """The crash table and the goal per osk-daemon row (plain, and with a standby)."""
    measured = [r for r in results if "respawn" in r]
    ours = [r for r in measured if r["name"].startswith("osk-daemon")]
    osk = next((r for r in ours if r["name"] == "osk-daemon"), None)
    peers = [r for r in measured if r not in ours]
    fastest = min(peers, key=lambda r: r["respawn"]["p50"]) if peers else None
    rows = []
    for r in results:
        if "respawn" in r:
            s = r["respawn"]
            factor = ""
            if osk and r is not osk:
                factor = f"{s['p50'] / osk['respawn']['p50']:.1f}x osk"
            rows.append([r["name"], s["n"], ms(s["p50"]), ms(s["p99"]), ms(s["max"]), factor])
        else:
            rows.append([r["name"], "-", "-", "-", "-", f"skipped: {r['skipped']}"])
    lines = [
        "crash (SIGKILL) -> the replacement's first line of code runs; "
        f"rounds {args.rounds} per supervisor, {args.settle} s between rounds",
        "(osk-daemon+standby: its spare process imported the module before the crash, so "
        "the stamp is the plugin's start(), the first of its code to run after the crash)",
        "",
        table(["supervisor", "n", "p50", "p99", "max", "note"], rows),
        "",
    ]
    goals: dict[str, bool | None] = {}
    for row in ours:
        if fastest is None:
            lines.append(f"goal ({row['name']}): not measurable, no peer measured")
            goals[row["name"]] = None
            continue
        need = fastest["respawn"]["p50"] / GOAL_FACTOR
        goals[row["name"]] = ok = row["respawn"]["p50"] <= need
        lines.append(
            f"goal crash -> respawn p50 >= {GOAL_FACTOR:g}x faster than the fastest peer "
            f"({fastest['name']}, {ms(fastest['respawn']['p50'])}), i.e. <= {ms(need)}: "
            f"{row['name']} {ms(row['respawn']['p50'])} -> {verdict(ok)}"
        )
    return lines, goals


def report(
    crash: list[dict[str, Any]], scale: list[dict[str, Any]], versions: dict[str, str], args: Any
) -> None:
    lines = [
        "peers: osk-daemon vs supervisord, circus, PM2, s6; the same child "
        "(bench/plugins/peerstamp.py) under every supervisor",
        f"percentiles: {PERCENTILE_METHOD}",
        f"machine: {machine()}; {os.cpu_count()} cores, other work may be running: "
        "compare within this run only",
        "versions: " + ", ".join(f"{k} {v}" for k, v in sorted(versions.items())),
        "",
    ]
    data: dict[str, Any] = {
        "machine": machine(),
        "percentiles": PERCENTILE_METHOD,
        "unit": "seconds, bytes, percent of one core",
        "versions": versions,
        "goals": {},
    }
    if crash:
        crash_lines, crash_goals = report_crash(crash, args)
        lines += [*crash_lines, ""]
        data.update(rounds=args.rounds, settle=args.settle, crash_respawn=crash)
        for name, ok in crash_goals.items():
            data["goals"][f"crash -> respawn p50 >= 3x faster than the fastest peer, {name}"] = ok
    if scale:
        lines += [
            f"scale: N idle children; all running = start command -> N stamped pids alive at once; "
            f"RSS/PSS of the supervisor's own processes once all run; idle CPU over "
            f"{args.idle:g} s (% of one core); status = p50 of {args.status_runs} runs",
            "",
        ]
        scale_lines, goals = report_scale(scale)
        lines += scale_lines
        data.update(idle=args.idle, status_runs=args.status_runs, scale=scale)
        data["goals"]["scale"] = goals
    emit("\n".join(lines).rstrip(), data, args.json)


if __name__ == "__main__":
    run_main(main)
