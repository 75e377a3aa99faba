"""Crash -> respawn under osk-daemon and under its peers, in one run, on one machine.

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

Not done yet (issue 7): the scale workload (N = 200/500 idle children: time until all run,
RSS, idle CPU, status latency).

    python bench/peers.py [--json] [--rounds N] [--quick] [--settle S] [--peers-dir DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
from _common import (
    PERCENTILE_METHOD,
    PLUGINS,
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

CHILD = PLUGINS / "peerstamp.py"
GOAL_FACTOR = 3.0
ROUND_TIMEOUT = 20.0
INSTALL_TIMEOUT = 600.0


class Skip(Exception):
    """A peer that cannot be installed or started; the message is the table's note."""


# ---- processes -----------------------------------------------------------------------------


class Tracker:
    """Every process a supervisor run started, remembered as psutil objects (so a kill
    never hits a reused pid), killed by pid at the end."""

    def __init__(self) -> None:
        self.seen: dict[int, psutil.Process] = {}

    def add(self, pid: int, recursive: bool = True) -> None:
        with contextlib.suppress(psutil.Error):
            proc = psutil.Process(pid)
            self.seen.setdefault(pid, proc)
            if recursive:
                for child in proc.children(recursive=True):
                    self.seen.setdefault(child.pid, child)

    def kill_all(self) -> None:
        for proc in self.seen.values():
            with contextlib.suppress(psutil.Error):
                proc.kill()
        psutil.wait_procs(list(self.seen.values()), timeout=5)


def stop_popen(proc: subprocess.Popen[bytes] | None, timeout: float = 10.0) -> None:
    if proc is None:
        return
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def run(cmd: list[str], timeout: float = 60.0, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False, **kw)


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


# ---- installing the peers ------------------------------------------------------------------


def install_python_peers(base: Path) -> tuple[Path | None, str]:
    venv = base / "venv"
    py = venv / "bin" / "python"
    if not py.exists():
        made = run(["python3", "-m", "venv", str(venv)], timeout=120)
        if made.returncode:
            return None, f"python3 -m venv failed: {made.stderr.strip()[-200:]}"
    got = run(
        [str(venv / "bin" / "pip"), "install", "-q", "supervisor", "circus"],
        timeout=INSTALL_TIMEOUT,
    )
    if got.returncode:
        return None, f"pip install supervisor circus failed: {got.stderr.strip()[-200:]}"
    return venv, ""


def install_pm2(base: Path) -> tuple[Path | None, str]:
    npm = shutil.which("npm")
    if not npm or not shutil.which("node"):
        return None, "no node/npm on this machine"
    pm2 = base / "npm" / "node_modules" / ".bin" / "pm2"
    if not pm2.exists():
        (base / "npm").mkdir(exist_ok=True)
        got = run(
            [npm, "install", "--no-audit", "--no-fund", "--silent", "pm2"],
            timeout=INSTALL_TIMEOUT,
            cwd=base / "npm",
        )
        if got.returncode or not pm2.exists():
            return None, f"npm install pm2 failed: {got.stderr.strip()[-200:]}"
    return pm2, ""


def install_s6() -> tuple[Path | None, str]:
    found = shutil.which("s6-svscan")
    if found:
        return Path(found), ""
    if os.geteuid() != 0:
        return None, "s6 not installed and not root (apt-get install s6)"
    got = run(["apt-get", "install", "-y", "s6"], timeout=INSTALL_TIMEOUT)
    if got.returncode:
        run(["apt-get", "update"], timeout=INSTALL_TIMEOUT)
        got = run(["apt-get", "install", "-y", "s6"], timeout=INSTALL_TIMEOUT)
    found = shutil.which("s6-svscan")
    if not found:
        return None, f"apt-get install s6 failed: {got.stderr.strip()[-200:]}"
    return Path(found), ""


# ---- one supervisor per context ------------------------------------------------------------


def child_env(stamp: Path) -> dict[str, str]:
    return {**os.environ, "OSK_PEER_STAMP": str(stamp)}


@contextlib.contextmanager
def under_osk(work: Path, stamp: Path) -> Iterator[Callable[[], None]]:
    config = daemon_config(
        plugins={
            "stamp": bench_plugin(
                "peerstamp:Idle",
                restart="permanent",
                env={"OSK_PEER_STAMP": str(stamp)},
                backoff={"base": 0.0, "max": 0.0, "jitter": 0.0},
            )
        },
        groups={"root": {"intensity": 1000, "period": 1.0}},
    )
    daemon = BenchDaemon(work, config)
    try:
        daemon.start()
        yield daemon._remember_children
    finally:
        daemon.stop()


@contextlib.contextmanager
def _supervise(work: Path, argv: list[str]) -> Iterator[Callable[[], None]]:
    """Run the supervisor ``argv`` in ``work``; afterwards stop it by pid and kill every
    process it was seen to start. Yields the callback that records its pid again."""
    track = Tracker()
    proc = None
    try:
        with (work / "out.log").open("wb") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=work)
        track.add(proc.pid)
        yield lambda: track.add(proc.pid)
    finally:
        if proc is not None:
            track.add(proc.pid)
        stop_popen(proc)
        track.kill_all()


@contextlib.contextmanager
def under_supervisord(work: Path, stamp: Path, venv: Path) -> Iterator[Callable[[], None]]:
    conf = work / "supervisord.conf"
    conf.write_text(
        f"""[supervisord]
nodaemon = true
logfile = {work}/supervisord.log
pidfile = {work}/supervisord.pid
childlogdir = {work}
[unix_http_server]
file = {work}/supervisor.sock
[rpcinterface:supervisor]
supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface
[supervisorctl]
serverurl = unix://{work}/supervisor.sock
[program:stamp]
command = {sys.executable} {CHILD}
environment = OSK_PEER_STAMP="{stamp}"
autorestart = true
startsecs = 0
startretries = 1000
"""
    )
    with _supervise(work, [str(venv / "bin" / "supervisord"), "-c", str(conf)]) as remember:
        yield remember


@contextlib.contextmanager
def under_circus(work: Path, stamp: Path, venv: Path) -> Iterator[Callable[[], None]]:
    conf = work / "circus.ini"
    conf.write_text(
        f"""[circus]
endpoint = ipc://{work}/ctl.sock
pubsub_endpoint = ipc://{work}/pub.sock
statsd = false
[watcher:stamp]
cmd = {sys.executable} {CHILD}
numprocesses = 1
respawn = true
copy_env = true
[env:stamp]
OSK_PEER_STAMP = {stamp}
"""
    )
    with _supervise(work, [str(venv / "bin" / "circusd"), str(conf)]) as remember:
        yield remember


@contextlib.contextmanager
def under_pm2(work: Path, stamp: Path, pm2: Path) -> Iterator[Callable[[], None]]:
    home = work / "pm2home"
    env = {**child_env(stamp), "PM2_HOME": str(home)}
    ecosystem = work / "ecosystem.config.js"
    app = {
        "name": "stamp",
        "script": str(CHILD),
        "interpreter": sys.executable,
        "autorestart": True,
        "restart_delay": 0,
        "min_uptime": 0,
        "max_restarts": 100000,
        "env": {"OSK_PEER_STAMP": str(stamp)},
    }
    ecosystem.write_text(f"module.exports = {json.dumps({'apps': [app]})};\n")
    track = Tracker()

    def god() -> None:
        with contextlib.suppress(OSError, ValueError):
            track.add(int((home / "pm2.pid").read_text().strip()))

    try:
        got = run([str(pm2), "start", str(ecosystem)], env=env, cwd=work)
        god()
        if got.returncode:
            raise Skip(f"pm2 start failed: {got.stderr.strip()[-200:]}")
        yield god
    finally:
        god()
        with contextlib.suppress(subprocess.TimeoutExpired):
            run([str(pm2), "kill"], env=env, cwd=work, timeout=30)
        track.kill_all()


@contextlib.contextmanager
def under_s6(work: Path, stamp: Path, ready: bool) -> Iterator[Callable[[], None]]:
    scan = work / "scan"
    service = scan / "stamp"
    service.mkdir(parents=True)
    notify = "export OSK_PEER_NOTIFY_FD 3\n" if ready else ""
    if ready:
        (service / "notification-fd").write_text("3\n")
    execline = shutil.which("execlineb")
    if execline:
        script = (
            f"#!{execline} -P\nexport OSK_PEER_STAMP {stamp}\n{notify}{sys.executable} {CHILD}\n"
        )
    else:
        env = f"OSK_PEER_STAMP={stamp}" + (" OSK_PEER_NOTIFY_FD=3" if ready else "")
        script = f"#!/bin/sh\nexec env {env} {sys.executable} {CHILD}\n"
    (service / "run").write_text(script)
    (service / "run").chmod(0o755)
    with _supervise(work, ["s6-svscan", str(scan)]) as remember:
        yield remember


# ---- main ----------------------------------------------------------------------------------


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="JSON on stdout, table on stderr")
    parser.add_argument("--rounds", type=int, default=30, help="crash rounds (default 30)")
    parser.add_argument("--quick", action="store_true", help="10 rounds")
    parser.add_argument(
        "--settle", type=float, default=1.1, help="seconds between rounds (default 1.1)"
    )
    parser.add_argument("--peers-dir", type=Path, help="reuse (and keep) this install dir")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds = min(args.rounds, 10)
    return args


def measure(name: str, opener: Callable[[Path, Path], Any], args: Any) -> dict[str, Any]:
    with temp_dir() as work:
        stamp = work / "stamps"
        try:
            with opener(work, stamp) as track:
                results = crash_rounds(stamp, args.rounds, args.settle, track)
        except Skip as exc:
            return {"name": name, "skipped": str(exc)}
        except (TimeoutError, RuntimeError, OSError) as exc:
            logs = "".join(
                p.read_text(errors="replace")[-400:] for p in work.glob("*.log") if p.is_file()
            )
            return {"name": name, "skipped": f"failed: {exc}", "log": logs}
    return {"name": name, "rounds": results, "respawn": summarize([r["respawn"] for r in results])}


def main() -> None:
    args = parse()
    own_install = args.peers_dir is None
    base = Path(tempfile.mkdtemp(prefix="osk-peers-")) if own_install else args.peers_dir
    base.mkdir(parents=True, exist_ok=True)
    try:
        venv, venv_note = install_python_peers(base)
        pm2, pm2_note = install_pm2(base)
        s6, s6_note = install_s6()
        plan: list[tuple[str, Callable[[Path, Path], Any] | None, str]] = [
            ("osk-daemon", under_osk, ""),
            (
                "supervisord",
                (lambda w, s: under_supervisord(w, s, venv)) if venv else None,
                venv_note,
            ),
            ("circus", (lambda w, s: under_circus(w, s, venv)) if venv else None, venv_note),
            ("PM2", (lambda w, s: under_pm2(w, s, pm2)) if pm2 else None, pm2_note),
            ("s6", (lambda w, s: under_s6(w, s, False)) if s6 else None, s6_note),
            ("s6 + notification-fd", (lambda w, s: under_s6(w, s, True)) if s6 else None, s6_note),
        ]
        versions = peer_versions(venv, pm2, s6)
        results = []
        for name, opener, note in plan:
            if opener is None:
                results.append({"name": name, "skipped": note})
                continue
            print(f"peers: {name} ...", file=sys.stderr, flush=True)
            results.append(measure(name, opener, args))
    finally:
        if own_install:
            shutil.rmtree(base, ignore_errors=True)
    report(results, versions, args)


def peer_versions(venv: Path | None, pm2: Path | None, s6: Path | None) -> dict[str, str]:
    out = {}
    if venv:
        got = run([str(venv / "bin" / "pip"), "list", "--format=json"])
        with contextlib.suppress(ValueError):
            for pkg in json.loads(got.stdout):
                if pkg["name"].lower() in ("supervisor", "circus"):
                    out[pkg["name"].lower()] = pkg["version"]
    if pm2:
        out["pm2"] = pm2_version(pm2)
    if s6:
        got = run(["dpkg-query", "-W", "-f", "${Version}", "s6"])
        out["s6"] = got.stdout.strip() or "?"
    out["node"] = run(["node", "--version"]).stdout.strip() if shutil.which("node") else "-"
    return out


def pm2_version(pm2: Path) -> str:
    package = pm2.resolve().parent.parent / "package.json"
    with contextlib.suppress(OSError, ValueError):
        return str(json.loads(package.read_text())["version"])
    return "?"


def report(results: list[dict[str, Any]], versions: dict[str, str], args: Any) -> None:
    measured = [r for r in results if "respawn" in r]
    osk = next((r for r in measured if r["name"] == "osk-daemon"), None)
    peers = [r for r in measured if r["name"] != "osk-daemon"]
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
        "peers: crash (SIGKILL) -> the replacement's first line of code runs, same child "
        "(bench/plugins/peerstamp.py) under every supervisor",
        f"rounds {args.rounds} per supervisor, {args.settle} s between rounds; "
        f"percentiles: {PERCENTILE_METHOD}",
        f"machine: {machine()}; {os.cpu_count()} cores, other work may be running: "
        "compare within this run only",
        "versions: " + ", ".join(f"{k} {v}" for k, v in sorted(versions.items())),
        "",
        table(["supervisor", "n", "p50", "p99", "max", "note"], rows),
        "",
    ]
    goal_ok = None
    if osk and fastest:
        need = fastest["respawn"]["p50"] / GOAL_FACTOR
        goal_ok = osk["respawn"]["p50"] <= need
        lines.append(
            f"goal crash -> respawn p50 >= {GOAL_FACTOR:g}x faster than the fastest peer "
            f"({fastest['name']}, {ms(fastest['respawn']['p50'])}), i.e. <= {ms(need)}: "
            f"{ms(osk['respawn']['p50'])} -> {verdict(goal_ok)}"
        )
    else:
        lines.append("goal crash -> respawn >= 3x faster than the fastest peer: not measurable")
    lines.append("scale (N = 200/500 idle children): not measured yet")
    data = {
        "machine": machine(),
        "percentiles": PERCENTILE_METHOD,
        "unit": "seconds",
        "rounds": args.rounds,
        "settle": args.settle,
        "versions": versions,
        "crash_respawn": results,
        "goals": {"crash -> respawn p50 >= 3x faster than the fastest peer": goal_ok},
    }
    emit("\n".join(lines), data, args.json)


if __name__ == "__main__":
    run_main(main)
