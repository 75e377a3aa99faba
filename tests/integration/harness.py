"""Run a real osk-daemon for a test, talk to it, and make sure it leaves nothing behind.

The daemon is a subprocess (``python -m osk_daemon.cli run``) with its own short
runtime dir. Tests wait on the daemon's event stream (``events -f`` on the control
socket), never on sleeps: ``wait_until`` re-checks a condition whenever an event
arrives, up to a deadline.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil

PLUGINS = Path(__file__).parent / "plugins"


class ControlError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


class Daemon:
    def __init__(self, workdir: Path, config_text: str, env: dict[str, str] | None = None) -> None:
        self.workdir = workdir
        self.env = env  # added to the daemon's environment (the test's own is inherited)
        self.config = workdir / "osk.toml"
        self.runtime = workdir / "run"
        self.socket = self.runtime / "control.sock"
        self.log = workdir / "daemon.log"
        self.config.write_text(config_text)
        self.proc: subprocess.Popen[bytes] | None = None
        self.seen_pids: set[int] = set()

    # ---- process -----------------------------------------------------------------------

    def start(self, timeout: float = 20.0) -> None:
        """Start the daemon; return once its control socket accepts connections."""
        self.runtime.mkdir(mode=0o711, exist_ok=True)  # to watch it before the daemon runs
        stale = _inode(self.socket)  # a killed daemon's socket, which the new one replaces
        with _DirWatch(self.runtime) as watch, self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "osk_daemon.cli", "run", "--config", str(self.config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=None if self.env is None else {**os.environ, **self.env},
            )
            self._wait_socket(watch, stale, timeout)

    def reexec(self, timeout: float = 20.0) -> dict[str, Any]:
        """``oskctl reexec``; return its reply once the new image's socket is there."""
        with _DirWatch(self.runtime) as watch:
            stale = _inode(self.socket)
            reply: dict[str, Any] = self.ctl("reexec")
            self._wait_socket(watch, stale, timeout)
        return reply

    def _wait_socket(self, watch: _DirWatch, stale: tuple[int, int] | None, timeout: float) -> None:
        """Wait on two fds, up to ``timeout``: an inotify watch on the runtime dir (the daemon
        renames the listening socket into place) and a pidfd (the daemon exited early)."""
        assert self.proc is not None
        pidfd = os.pidfd_open(self.proc.pid)
        try:
            deadline = time.monotonic() + timeout
            while _inode(self.socket) in (None, stale):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no control socket:\n{self.log.read_text()}")
                ready, _, _ = select.select([watch.fd, pidfd], [], [], left)
                if pidfd in ready:
                    self.proc.wait()
                    raise AssertionError(f"daemon exited early:\n{self.log.read_text()}")
                if watch.fd in ready:
                    watch.drain()
        finally:
            os.close(pidfd)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM the daemon (by pid), wait, and check that every plugin is gone."""
        assert self.proc is not None
        self._remember_pids()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"daemon ignored SIGTERM:\n{self.log.read_text()}") from None
        return code

    def kill(self, signum: int = signal.SIGKILL, timeout: float = 10.0) -> None:
        """Signal the daemon (by pid) and wait until it is gone; its plugins may live on."""
        assert self.proc is not None
        self._remember_pids()
        self.proc.send_signal(signum)
        self.proc.wait(timeout)

    def _remember_pids(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(psutil.Error):
            for child in psutil.Process(self.proc.pid).children(recursive=True):
                self.seen_pids.add(child.pid)

    def leftovers(self) -> list[int]:
        """Plugin processes (seen while running) that are still alive or zombies."""
        return [pid for pid in self.seen_pids if psutil.pid_exists(pid)]

    def kill_leftovers(self) -> None:
        for pid in self.leftovers():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    # ---- control socket ----------------------------------------------------------------

    def ctl(self, cmd: str, timeout: float = 30.0, **args: Any) -> Any:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(self.socket))
            sock.sendall(json.dumps({"cmd": cmd, "args": args}).encode() + b"\n")
            reply = json.loads(_readline(sock))
        if not reply.get("ok"):
            raise ControlError(reply["error"]["code"], reply["error"]["message"])
        self._remember_pids()
        return reply["result"]

    def status(self, plugin: str | None = None) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = self.ctl("status", plugin=plugin)
        return rows

    def row(self, plugin: str, instance: int = 0) -> dict[str, Any]:
        return next(r for r in self.status(plugin) if r["instance"] == instance)

    def call(self, plugin: str, method: str, args: Any = None, timeout: float = 5.0) -> Any:
        return self.ctl("call", plugin=plugin, method=method, args=args, timeout=timeout)

    def wait_until(
        self, predicate: Callable[[], Any], timeout: float = 20.0, what: str = ""
    ) -> Any:
        """Re-check ``predicate`` after every daemon event until it is truthy."""
        deadline = time.monotonic() + timeout
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(str(self.socket))
            sock.sendall(b'{"cmd": "events", "args": {"follow": true, "lines": 0}}\n')
            buf = b""
            while True:
                result = predicate()
                if result:
                    return result
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"timed out waiting for {what or predicate}; status: "
                        f"{json.dumps(self.status(), indent=1)}\n"
                        f"log:\n{self.log.read_text()[-4000:]}"
                    )
                sock.settimeout(min(left, 0.5))
                with contextlib.suppress(TimeoutError):
                    buf += sock.recv(65536) or b""

    def all_ready(self) -> bool:
        rows = self.status()
        return bool(rows) and all(
            r["state"] == "ready" and r["health"] in ("healthy", "unknown", "recovering")
            for r in rows
        )


class _DirWatch:
    """An inotify watch for names created or moved into ``path`` (glibc's calls, via ctypes:
    the stdlib has no inotify). ``fd`` turns readable when something happened there."""

    _IN_NONBLOCK_CLOEXEC = os.O_NONBLOCK | os.O_CLOEXEC
    _IN_CREATE, _IN_MOVED_TO = 0x100, 0x80

    def __init__(self, path: Path) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        self.fd: int = libc.inotify_init1(self._IN_NONBLOCK_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        mask = self._IN_CREATE | self._IN_MOVED_TO
        if libc.inotify_add_watch(self.fd, os.fsencode(path), mask) < 0:
            errno = ctypes.get_errno()
            os.close(self.fd)
            raise OSError(errno, f"inotify_add_watch {path}")

    def drain(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while os.read(self.fd, 4096):
                pass

    def __enter__(self) -> _DirWatch:
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)


def leftover_cgroups(runtime_dir: Path) -> list[str]:
    """The daemon's cgroup subtree dirs that still exist (in any hierarchy we can see)."""
    from osk_daemon.supervisor.confinement import cgroup_name

    name = f"{cgroup_name(runtime_dir)}.d"
    found = []
    # os.walk skips what vanishes under it (other daemons' cgroups come and go); no daemon
    # subtree is entered: ours is the answer, the others are not ours to look at
    for top, dirs, _files in os.walk("/sys/fs/cgroup"):
        found += [str(Path(top) / d) for d in dirs if d == name]
        dirs[:] = [d for d in dirs if not (d.startswith("osk-") and d.endswith(".d"))]
    return found


def _inode(path: Path) -> tuple[int, int] | None:
    """Which file is at ``path`` (a removed file's inode number may come back)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_ctime_ns


def wait_in(directory: Path, done: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Re-check ``done`` whenever a name is created or renamed into ``directory``."""
    with _DirWatch(directory) as watch:
        deadline = time.monotonic() + timeout
        while not done():
            left = deadline - time.monotonic()
            assert left > 0, f"timed out waiting for {what}"
            if select.select([watch.fd], [], [], left)[0]:
                watch.drain()


def wait_recorded(d: Daemon, pids: dict[str, int]) -> None:
    """Until the daemon's state file records each of ``pids`` as ready (it is written at
    most every 50 ms: a daemon killed sooner after a change leaves the older file)."""
    want = {(name, pid, "ready") for name, pid in pids.items()}

    def recorded() -> bool:
        try:
            got = json.loads((d.runtime / "instances.json").read_text())["instances"]
        except (OSError, ValueError):
            return False
        return want <= {(r["plugin"], r["pid"], r["state"]) for r in got}

    wait_in(d.runtime, recorded, f"the state file to record {sorted(want)}")


def beat_in(page: Path) -> float:
    """The last heartbeat a worker stored in its page (``ipc.beats``), read without taking
    the page from the daemon; 0.0 before the first."""
    raw = page.read_bytes()[:8]
    return float(struct.unpack("<d", raw)[0]) if len(raw) == 8 else 0.0


def health_in(page: Path) -> tuple[bool, int]:
    """What a worker's page says of its own health checks (``ipc.beats``): whether it runs
    them, and how many unchanged healthy ones it counted so far."""
    raw = page.read_bytes()
    if len(raw) < 24:
        return False, 0
    count, flags = struct.unpack_from("<II", raw, 8)
    return bool(flags & 1), count


def alive(pid: int) -> bool:
    """Is there still a process (or zombie) with this pid?"""
    return Path(f"/proc/{pid}").exists()


_PR_SET_CHILD_SUBREAPER = 36
Reap = Callable[[list[int]], dict[int, int]]  # pids -> exit code, or -signal


def reap_the_rest(d: Daemon, plugins: dict[str, int], reap: Reap, timeout: float = 20.0) -> None:
    """Reap the killed daemon's other processes (its zygote and warm children end by
    themselves on EOF from it): each one that is ours (re-parented to us) is reaped; one
    with another parent still (the zygote's) is waited for, and may be ours next."""
    deadline = time.monotonic() + timeout
    while True:
        left = [pid for pid in d.seen_pids - set(plugins.values()) if alive(pid)]
        if not left:
            return
        assert time.monotonic() < deadline, f"processes of the killed daemon linger: {left}"
        for pid in left:
            with contextlib.suppress(psutil.Error):
                if psutil.Process(pid).ppid() == os.getpid():
                    reap([pid])
                    continue
            with contextlib.suppress(ProcessLookupError):
                pidfd = os.pidfd_open(pid)
                try:
                    select.select([pidfd], [], [], max(0.0, deadline - time.monotonic()))
                finally:
                    os.close(pidfd)


@contextlib.contextmanager
def adopting_parent(timeout: float = 20.0) -> Iterator[Reap]:
    """Be the subreaper for the test; yields ``reap(pids) -> {pid: exit code or -signal}``,
    which waits (pidfd, up to ``timeout``) for each of those pids to end and reaps it."""
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0

    def reap(pids: list[int]) -> dict[int, int]:
        out: dict[int, int] = {}
        deadline = time.monotonic() + timeout
        for pid in pids:
            pidfd = os.pidfd_open(pid)
            try:
                ready, _, _ = select.select([pidfd], [], [], max(0.0, deadline - time.monotonic()))
                assert ready, f"pid {pid} did not end within {timeout}s"
                info = os.waitid(os.P_PIDFD, pidfd, os.WEXITED)
                assert info is not None
                killed = info.si_code in (os.CLD_KILLED, os.CLD_DUMPED)
                out[pid] = -info.si_status if killed else info.si_status
            finally:
                os.close(pidfd)
        return out

    try:
        yield reap
    finally:
        libc.prctl(_PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)


def _readline(sock: socket.socket) -> bytes:
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("control socket closed")
        buf += chunk
    return buf


def plugin_block(
    name: str, entry: str = "testplugins:Echo", plugins: Path = PLUGINS, **options: Any
) -> str:
    """A [plugins.NAME] table using the test plugins (from ``plugins``)."""
    lines = [f"[plugins.{name}]", f'entry = "{entry}"', f'path = ["{plugins}"]']
    tables = {k: v for k, v in options.items() if isinstance(v, dict)}
    for key, value in options.items():
        if key not in tables:
            lines.append(f"{key} = {json.dumps(value)}")
    for key, table in tables.items():
        lines.append(f"[plugins.{name}.{key}]")
        lines.extend(f"{k} = {_toml_value(v)}" for k, v in table.items())
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    return json.dumps(value)


def daemon_config(body: str, **daemon: Any) -> str:
    settings = {
        "runtime_dir": "run",
        "state_dir": "state",
        "heartbeat_interval": 0.1,
        "heartbeat_timeout": 1.0,
    }
    settings.update(daemon)
    head = "[daemon]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in settings.items())
    return head + "\n" + textwrap.dedent(body)


@contextlib.contextmanager
def running_daemon(
    config_text: str, wait_ready: bool = True, env: dict[str, str] | None = None
) -> Iterator[Daemon]:
    workdir = Path(tempfile.mkdtemp(prefix="osk-t-"))
    workdir.chmod(0o711)  # sandboxed plugins (another uid) must reach run/workers.sock
    daemon = Daemon(workdir, config_text, env)
    try:
        daemon.start()
        if wait_ready:
            daemon.wait_until(daemon.all_ready, what="all plugins ready")
        yield daemon
    except BaseException:
        print(f"---- daemon log ----\n{daemon.log.read_text()[-20000:]}")  # shown on failure
        raise
    finally:
        try:
            if daemon.proc is not None and daemon.proc.poll() is None:
                daemon.stop()
            left = daemon.leftovers()
            cgroups_left = leftover_cgroups(daemon.runtime)
        finally:
            daemon.kill_leftovers()
            shutil.rmtree(workdir, ignore_errors=True)
        assert not left, f"plugin processes left behind: {left}"
        assert not cgroups_left, f"cgroups left behind: {cgroups_left}"
