"""The per-supervisor side of ``bench/peers.py``: installs, processes, one runner each.

Every runner is a context manager ``opener(work, stamp, n)`` that starts one supervisor in
the temp dir ``work`` with ``n`` copies of the same child, ``bench/plugins/peerstamp.py``
(which appends ``"<pid> <monotonic time>"`` to ``stamp`` as its first code), and yields a
``Supervised``: when the start command was issued, how to record the processes it started,
which of them are the supervisor itself, and its status command. Afterwards the supervisor
is stopped by pid, every process it was seen to start is killed by pid (a ``Tracker``) and
the caller removes ``work``. ``n = 1`` is the crash workload's configuration; for ``n > 1``
(the scale workload) each supervisor gets its natural way of running ``n`` alike children:
osk-daemon ``n`` plugin tables (``[plugins.sNNN]``, one instance each), supervisord one
``[program]`` with ``numprocs = n``, circus one watcher with ``numprocesses = n``, PM2 ``n``
apps in one ecosystem file, s6 ``n`` service dirs under one ``s6-svscan``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from _common import PLUGINS, BenchDaemon, bench_plugin, daemon_config

CHILD = PLUGINS / "peerstamp.py"
INSTALL_TIMEOUT = 600.0
OSKCTL = Path(sys.executable).parent / "oskctl"


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


def descendants(pid: int) -> list[psutil.Process]:
    """``pid`` and everything under it now (nothing if it is gone)."""
    try:
        proc = psutil.Process(pid)
        return [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return []


@dataclass
class Supervised:
    """One running supervisor, as a runner yields it.

    ``started``: ``time.monotonic()`` just before the start command. ``track()``: record
    every process it has started so far (they are killed by pid at the end). ``own(children)``:
    the supervisor's own processes, given the children's pids. ``status``: its status
    command (argv, env) over all children, ``status_label`` how the table names it;
    ``counted`` says what ``own`` counts."""

    started: float
    track: Callable[[], None]
    roots: Callable[[], list[int]]
    status: list[str]
    status_label: str
    counted: str
    env: dict[str, str] | None = None
    control: Path | None = None  # osk-daemon: its control socket, for a status without oskctl
    own_filter: Callable[[list[psutil.Process], set[int]], list[psutil.Process]] | None = None
    notes: dict[str, Any] = field(default_factory=dict)

    def tree(self) -> list[psutil.Process]:
        out: dict[int, psutil.Process] = {}
        for root in self.roots():
            for proc in descendants(root):
                out.setdefault(proc.pid, proc)
        return list(out.values())

    def own(self, children: set[int]) -> list[psutil.Process]:
        """The supervisor's processes: by default its whole tree but the children."""
        procs = self.tree()
        if self.own_filter is not None:
            return self.own_filter(procs, children)
        return [p for p in procs if p.pid not in children]


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


def peer_versions(venv: Path | None, pm2: Path | None, s6: Path | None) -> dict[str, str]:
    out = {}
    if venv:
        got = run([str(venv / "bin" / "pip"), "list", "--format=json"])
        with contextlib.suppress(ValueError):
            for pkg in json.loads(got.stdout):
                if pkg["name"].lower() in ("supervisor", "circus"):
                    out[pkg["name"].lower()] = pkg["version"]
    if pm2:
        package = pm2.resolve().parent.parent / "package.json"
        out["pm2"] = "?"
        with contextlib.suppress(OSError, ValueError):
            out["pm2"] = str(json.loads(package.read_text())["version"])
    if s6:
        got = run(["dpkg-query", "-W", "-f", "${Version}", "s6"])
        out["s6"] = got.stdout.strip() or "?"
    out["node"] = run(["node", "--version"]).stdout.strip() if shutil.which("node") else "-"
    return out


# ---- one supervisor per context ------------------------------------------------------------


def osk_config(stamp: Path, n: int, standby: bool = False) -> str:
    """The crash workload's plugin (no-delay backoff, intensity 1000/s), ``n`` times as
    ``n`` plugin tables of one instance each (``stamp`` alone for ``n = 1``). ``standby``:
    with ``standby = true``, stamping in ``start()`` (see ``plugins/peerstamp.py``)."""
    names = ["stamp"] if n == 1 else [f"s{i:03d}" for i in range(n)]
    env = {"OSK_PEER_STAMP": str(stamp)}
    if standby:
        env["OSK_PEER_STAMP_AT"] = "start"
    plugin = bench_plugin(
        "peerstamp:Idle",
        restart="permanent",
        env=env,
        backoff={"base": 0.0, "max": 0.0, "jitter": 0.0},
        **({"standby": True} if standby else {}),
    )
    return daemon_config(
        plugins={name: plugin for name in names},
        groups={"root": {"intensity": 1000, "period": 1.0}},
    )


def _osk_own(log: Path) -> Callable[[list[psutil.Process], set[int]], list[psutil.Process]]:
    """The daemon and its zygote (the last pid its log announced as ``zygote PID ready``);
    not the plugins nor the zygote's warm spare children, which share the zygote's command
    line."""

    def own(procs: list[psutil.Process], children: set[int]) -> list[psutil.Process]:
        try:
            found = re.findall(r"zygote (\d+) ready", log.read_text(errors="replace"))
        except OSError:
            found = []
        zygote = int(found[-1]) if found else None
        return procs[:1] + [p for p in procs[1:] if p.pid == zygote and p.pid not in children]

    return own


@contextlib.contextmanager
def under_osk(work: Path, stamp: Path, n: int = 1, standby: bool = False) -> Iterator[Supervised]:
    daemon = BenchDaemon(work, osk_config(stamp, n, standby))
    try:
        started = time.monotonic()
        daemon.start(timeout=60.0)
        assert daemon.proc is not None
        pid = daemon.proc.pid
        yield Supervised(
            started=started,
            track=daemon._remember_children,
            roots=lambda: [pid],
            status=[str(OSKCTL), "status", "--socket", str(daemon.control)],
            status_label="oskctl status",
            counted="daemon + zygote (not the warm spare children)",
            control=daemon.control,
            own_filter=_osk_own(daemon.log),
        )
    finally:
        daemon.stop(timeout=15.0 + n * 0.1)


@contextlib.contextmanager
def _supervise(
    work: Path, argv: list[str], status: tuple[list[str], str], counted: str
) -> Iterator[Supervised]:
    """Run the supervisor ``argv`` in ``work``; afterwards stop it by pid and kill every
    process it was seen to start."""
    track = Tracker()
    proc = None
    try:
        with (work / "out.log").open("wb") as out:
            started = time.monotonic()
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=work)
        pid = proc.pid
        track.add(pid)
        yield Supervised(
            started=started,
            track=lambda: track.add(pid),
            roots=lambda: [pid],
            status=status[0],
            status_label=status[1],
            counted=counted,
        )
    finally:
        if proc is not None:
            track.add(proc.pid)
        stop_popen(proc, timeout=30.0)
        track.kill_all()


@contextlib.contextmanager
def under_supervisord(work: Path, stamp: Path, venv: Path, n: int = 1) -> Iterator[Supervised]:
    conf = work / "supervisord.conf"
    many = f"numprocs = {n}\nprocess_name = %(program_name)s_%(process_num)03d\n" if n > 1 else ""
    conf.write_text(
        f"""[supervisord]
nodaemon = true
logfile = {work}/supervisord.log
pidfile = {work}/supervisord.pid
childlogdir = {work}
minfds = {max(1024, 8 * n)}
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
{many}"""
    )
    with _supervise(
        work,
        [str(venv / "bin" / "supervisord"), "-c", str(conf)],
        ([str(venv / "bin" / "supervisorctl"), "-c", str(conf), "status"], "supervisorctl status"),
        "supervisord",
    ) as sup:
        yield sup


@contextlib.contextmanager
def under_circus(work: Path, stamp: Path, venv: Path, n: int = 1) -> Iterator[Supervised]:
    conf = work / "circus.ini"
    conf.write_text(
        f"""[circus]
endpoint = ipc://{work}/ctl.sock
pubsub_endpoint = ipc://{work}/pub.sock
statsd = false
[watcher:stamp]
cmd = {sys.executable} {CHILD}
numprocesses = {n}
respawn = true
copy_env = true
[env:stamp]
OSK_PEER_STAMP = {stamp}
"""
    )
    endpoint = f"ipc://{work}/ctl.sock"
    with _supervise(
        work,
        [str(venv / "bin" / "circusd"), str(conf)],
        ([str(venv / "bin" / "circusctl"), "--endpoint", endpoint, "status"], "circusctl status"),
        "circusd",
    ) as sup:
        yield sup


@contextlib.contextmanager
def under_pm2(work: Path, stamp: Path, pm2: Path, n: int = 1) -> Iterator[Supervised]:
    home = work / "pm2home"
    env = {**os.environ, "OSK_PEER_STAMP": str(stamp), "PM2_HOME": str(home)}
    ecosystem = work / "ecosystem.config.js"
    app = {
        "script": str(CHILD),
        "interpreter": sys.executable,
        "autorestart": True,
        "restart_delay": 0,
        "min_uptime": 0,
        "max_restarts": 100000,
        "env": {"OSK_PEER_STAMP": str(stamp)},
    }
    names = ["stamp"] if n == 1 else [f"s{i:03d}" for i in range(n)]
    apps = [{"name": name, **app} for name in names]
    ecosystem.write_text(f"module.exports = {json.dumps({'apps': apps})};\n")
    track = Tracker()

    def god() -> int | None:
        with contextlib.suppress(OSError, ValueError):
            return int((home / "pm2.pid").read_text().strip())
        return None

    def remember() -> None:
        pid = god()
        if pid is not None:
            track.add(pid)

    try:
        started = time.monotonic()
        got = run([str(pm2), "start", str(ecosystem)], env=env, cwd=work, timeout=300)
        remember()
        if got.returncode:
            raise Skip(f"pm2 start failed: {got.stderr.strip()[-200:]}")
        yield Supervised(
            started=started,
            track=remember,
            roots=lambda: [pid for pid in [god()] if pid is not None],
            status=[str(pm2), "jlist"],
            status_label="pm2 jlist",
            env=env,
            counted="the PM2 God daemon (node)",
        )
    finally:
        remember()
        with contextlib.suppress(subprocess.TimeoutExpired):
            run([str(pm2), "kill"], env=env, cwd=work, timeout=60)
        track.kill_all()


@contextlib.contextmanager
def under_s6(work: Path, stamp: Path, ready: bool, n: int = 1) -> Iterator[Supervised]:
    scan = work / "scan"
    names = ["stamp"] if n == 1 else [f"s{i:03d}" for i in range(n)]
    notify = "export OSK_PEER_NOTIFY_FD 3\n" if ready else ""
    execline = shutil.which("execlineb")
    if execline:
        script = (
            f"#!{execline} -P\nexport OSK_PEER_STAMP {stamp}\n{notify}{sys.executable} {CHILD}\n"
        )
    else:
        env = f"OSK_PEER_STAMP={stamp}" + (" OSK_PEER_NOTIFY_FD=3" if ready else "")
        script = f"#!/bin/sh\nexec env {env} {sys.executable} {CHILD}\n"
    for name in names:
        service = scan / name
        service.mkdir(parents=True)
        if ready:
            (service / "notification-fd").write_text("3\n")
        (service / "run").write_text(script)
        (service / "run").chmod(0o755)
    loop = f'for d in {scan}/*/; do s6-svstat "$d" || exit 1; done'
    status = (["sh", "-c", loop], f"s6-svstat x {n}")
    argv = ["s6-svscan", "-c", str(max(1000, n + 10)), str(scan)]
    with _supervise(work, argv, status, f"s6-svscan + {n} s6-supervise") as sup:
        yield sup
