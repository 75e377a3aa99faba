"""The scale workload of ``bench/peers.py``: N idle children under one supervisor.

For each N (``--scale``, default 200 and 500) and each supervisor, a fresh supervisor in a
fresh temp dir is started with N copies of ``bench/plugins/peerstamp.py`` (see
``peers_run`` for how each supervisor is configured) and measured:

- **all running**: from ``time.monotonic()`` just before the start command until N
  distinct pids have stamped (each child's first line of code has run) and are alive at
  once; the time is the largest of those N pids' own stamps, minus the start.
- **RSS / PSS**: summed over the supervisor's own processes (``Supervised.counted`` says
  which: osk-daemon the daemon + its zygote; s6 s6-svscan + its N s6-supervise), once all
  run. PSS shares pages between processes that map them, so it does not count a shared
  library N times over; RSS does.
- **idle CPU**: user + system ``cpu_times`` of those processes before and after
  ``--idle`` seconds (default 10) with nothing asked of them, as % of one core. The
  children's CPU over the same window is reported beside it (osk-daemon's children send
  heartbeats; the peers' children sleep in ``pause()``).
- **status**: wall time of the supervisor's status command over all children, run as a
  subprocess ``--status-runs`` times (default 5) after the idle window; p50 and max.

The table notes how many children stamped beyond N by the end (restarted, or killed
during the start and replaced).
"""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import psutil
from _common import ms, percentile, table, temp_dir, verdict
from peers_run import Skip, Supervised

MiB = 1 << 20
GOAL_N = 500
GOAL_ALL_RUNNING = 2.0
GOAL_RSS = 80 * MiB
GOAL_IDLE_CPU = 1.0  # percent of one core
GOAL_STATUS = 0.050

Opener = Callable[[Path, Path, int], AbstractContextManager[Supervised]]


def distinct(path: Path) -> dict[int, float]:
    """The first stamp of every pid in ``path``, in file order."""
    out: dict[int, float] = {}
    try:
        text = path.read_text()
    except FileNotFoundError:
        return out
    for line in text.splitlines():
        pid, _, when = line.partition(" ")
        try:
            out.setdefault(int(pid), float(when))
        except ValueError:  # a line being written
            continue
    return out


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def wait_all(stamp: Path, n: int, timeout: float) -> dict[int, float]:
    """The first ``n`` stamped pids that are all alive at once (a child that stamped and
    was killed, e.g. for not getting ready in time, does not count), with their stamps."""
    deadline = time.monotonic() + timeout
    while True:
        seen = distinct(stamp)
        if len(seen) >= n:
            live = {pid: when for pid, when in seen.items() if _alive(pid)}
            if len(live) >= n:
                return dict(list(live.items())[:n])
        if time.monotonic() > deadline:
            live_count = sum(1 for pid in seen if _alive(pid))
            raise TimeoutError(
                f"{live_count} of {n} children running after {timeout:g} s ({len(seen)} stamped)"
            )
        time.sleep(0.01)


def _memory(procs: list[psutil.Process]) -> list[dict[str, Any]]:
    """RSS and PSS (bytes) of each of ``procs`` still there."""
    out = []
    for proc in procs:
        try:
            info = proc.memory_full_info()
            name = proc.name()
        except psutil.Error:
            continue
        out.append({"pid": proc.pid, "name": name, "rss": info.rss, "pss": getattr(info, "pss", 0)})
    return out


def _cpu(procs: list[psutil.Process]) -> dict[int, float]:
    out = {}
    for proc in procs:
        try:
            t = proc.cpu_times()
        except psutil.Error:
            continue
        out[proc.pid] = t.user + t.system
    return out


def _cpu_delta(before: dict[int, float], after: dict[int, float]) -> float:
    return sum(after[pid] - before[pid] for pid in before.keys() & after.keys())


def _status_runs(sup: Supervised, runs: int) -> tuple[list[float], int, int]:
    samples = []
    lines = rc = 0
    for _ in range(runs):
        t0 = time.perf_counter()
        got = subprocess.run(
            sup.status, capture_output=True, text=True, env=sup.env, timeout=120, check=False
        )
        samples.append(time.perf_counter() - t0)
        rc = max(rc, got.returncode)
        lines = len(got.stdout.splitlines())
    return samples, lines, rc


def socket_status(control: Path) -> tuple[float, int]:
    """One ``status`` over osk-daemon's control socket, in process: the daemon's share of
    ``oskctl status`` (no interpreter start-up, imports or rendering). Seconds, bytes."""
    t0 = time.perf_counter()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(30)
        sock.connect(str(control))
        sock.sendall(b'{"cmd": "status", "args": {}}\n')
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = sock.recv(1 << 20)
            if not chunk:
                raise RuntimeError("control socket closed during status")
            buf += chunk
    return time.perf_counter() - t0, len(buf)


def measure_scale(name: str, opener: Opener, n: int, args: Any) -> dict[str, Any]:
    """One supervisor with ``n`` children: the figures above, or ``skipped`` with why."""
    with temp_dir() as work:
        stamp = work / "stamps"
        try:
            with opener(work, stamp, n) as sup:
                first = wait_all(stamp, n, timeout=args.scale_timeout)
                all_running = max(first.values()) - sup.started
                sup.track()
                children = set(first)
                time.sleep(0.5)  # the last child's start-up ends; then measure at rest
                own = sup.own(children)
                memory = _memory(own)
                kids = [p for p in sup.tree() if p.pid in children]
                before, kids_before = _cpu(own), _cpu(kids)
                t0 = time.monotonic()
                time.sleep(args.idle)
                after, kids_after = _cpu(own), _cpu(kids)
                window = time.monotonic() - t0
                samples, lines, rc = _status_runs(sup, args.status_runs)
                raw = []
                if sup.control is not None:
                    raw = [socket_status(sup.control) for _ in range(args.status_runs)]
                sup.track()
                restarted = len(distinct(stamp)) - n
        except Skip as exc:
            return {"name": name, "n": n, "skipped": str(exc)}
        except (TimeoutError, RuntimeError, OSError, subprocess.SubprocessError) as exc:
            logs = "".join(
                p.read_text(errors="replace")[-400:] for p in work.glob("*.log") if p.is_file()
            )
            return {"name": name, "n": n, "skipped": f"failed: {exc}", "log": logs}
    return {
        "name": name,
        "n": n,
        "all_running": all_running,
        "counted": sup.counted,
        "processes": len(own),
        "rss": sum(m["rss"] for m in memory),
        "pss": sum(m["pss"] for m in memory),
        "largest_rss": max((m["rss"] for m in memory), default=0),
        "own_processes": memory,
        "idle_window": window,
        "idle_cpu_percent": 100.0 * _cpu_delta(before, after) / window,
        "children_cpu_percent": 100.0 * _cpu_delta(kids_before, kids_after) / window,
        "status_cmd": sup.status_label,
        "status": samples,
        "status_p50": percentile(samples, 0.5),
        "status_max": max(samples),
        "status_lines": lines,
        "status_rc": rc,
        "restarted": restarted,
        "status_socket": [t for t, _ in raw],
        "status_socket_p50": percentile([t for t, _ in raw], 0.5) if raw else None,
        "status_socket_bytes": raw[-1][1] if raw else None,
    }


def osk_goals(result: dict[str, Any]) -> dict[str, bool]:
    return {
        f"all {GOAL_N} running < {GOAL_ALL_RUNNING:g} s": result["all_running"] < GOAL_ALL_RUNNING,
        "daemon RSS <= 80 MiB": result["rss"] <= GOAL_RSS,
        f"idle CPU < {GOAL_IDLE_CPU:g} %": result["idle_cpu_percent"] < GOAL_IDLE_CPU,
        f"oskctl status < {ms(GOAL_STATUS)}": result["status_p50"] < GOAL_STATUS,
    }


def report_scale(results: list[dict[str, Any]]) -> tuple[list[str], dict[str, Any]]:
    """The scale table's lines and the goals (osk-daemon at N = 500, every osk run)."""
    rows = []
    goals: dict[str, Any] = {}
    for r in results:
        if "skipped" in r:
            rows.append(
                [r["name"], r["n"], "-", "-", "-", "-", "-", "-", f"skipped: {r['skipped']}"]
            )
            continue
        marks = ""
        if r["name"].startswith("osk-daemon") and r["n"] == GOAL_N:
            got = osk_goals(r)
            goals[r["name"]] = got
            marks = " ".join(verdict(ok) for ok in got.values())
        note = [f"{r['processes']} proc: {r['counted']}"]
        if 1 < r["processes"] <= 4:
            note.append(f"largest alone {r['largest_rss'] / MiB:.1f} MiB RSS")
        if r["restarted"]:
            note.append(f"{r['restarted']} restarted")
        if r["status_rc"]:
            note.append(f"status exit {r['status_rc']}")
        if r["status_socket_p50"] is not None:
            note.append(f"status over the socket alone {ms(r['status_socket_p50'])}")
        rows.append(
            [
                r["name"],
                r["n"],
                f"{r['all_running']:.2f} s",
                f"{r['rss'] / MiB:.1f} MiB",
                f"{r['pss'] / MiB:.1f} MiB",
                f"{r['idle_cpu_percent']:.2f} %",
                f"{r['children_cpu_percent']:.2f} %",
                f"{ms(r['status_p50'])} ({r['status_cmd']})",
                "; ".join(note) + (f"; goals {marks}" if marks else ""),
            ]
        )
    headers = [
        "supervisor",
        "N",
        "all running",
        "RSS",
        "PSS",
        "idle CPU",
        "children CPU",
        "status p50",
        "note",
    ]
    lines = [table(headers, rows), ""]
    for name, got in goals.items():
        r = next(x for x in results if x["name"] == name and x["n"] == GOAL_N)
        values = [
            f"{r['all_running']:.2f} s",
            f"{r['rss'] / MiB:.1f} MiB",
            f"{r['idle_cpu_percent']:.2f} %",
            ms(r["status_p50"]),
        ]
        for (goal, ok), value in zip(got.items(), values, strict=True):
            lines.append(f"goal {name} N={GOAL_N} {goal}: {value} -> {verdict(ok)}")
    if not goals:
        lines.append(f"goals (osk-daemon, N = {GOAL_N}): not measured in this run")
    return lines, goals
