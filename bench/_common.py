"""What the three benchmarks share: arguments, statistics, tables, temp dirs, real daemons.

Every script is stand-alone and owns what it starts. ``open_daemon`` runs a real
``python -m osk_daemon.cli run`` in a fresh ``osk-b-*`` temp dir and, however the block
ends (error, Ctrl-C, SIGTERM of the bench, which ``run_main`` turns into
``KeyboardInterrupt``), sends SIGTERM to the daemon by pid, waits, SIGKILLs whatever
plugin process is still there and removes the temp dir.

Percentiles are nearest-rank on the sorted samples: ``p(q) = sorted[ceil(q * n) - 1]``,
so p50 and p99 are always real observations (p99 of 30 samples is the maximum).
Durations are measured with ``time.perf_counter`` or ``time.monotonic``, never ``time.time``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import psutil

BENCH = Path(__file__).resolve().parent
PLUGINS = BENCH / "plugins"
ROOT = BENCH.parent
PERCENTILE_METHOD = "nearest-rank on sorted samples: sorted[ceil(q*n)-1]"


# ---- arguments and output ------------------------------------------------------------------


def parse_args(description: str, rounds: int, argv: Sequence[str] | None = None) -> Any:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--json", action="store_true", help="print exact JSON on stdout (the table on stderr)"
    )
    parser.add_argument("--rounds", type=int, default=rounds, help=f"default {rounds}")
    return parser.parse_args(argv)


def exit_on_sigterm() -> None:
    """Make SIGTERM behave like Ctrl-C, so every ``finally`` cleans up."""

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, handler)


def run_main(main: Callable[[], None]) -> None:
    """Run a bench's ``main``; Ctrl-C or SIGTERM ends it with status 130 once cleaned up."""
    exit_on_sigterm()
    try:
        main()
    except KeyboardInterrupt:
        print("interrupted; everything started was stopped and removed", file=sys.stderr)
        sys.exit(130)


def emit(text: str, data: dict[str, Any], as_json: bool) -> None:
    """The table on stdout; with ``--json`` the table goes to stderr and JSON to stdout."""
    if as_json:
        print(text, file=sys.stderr, flush=True)
        print(json.dumps(data, indent=2, sort_keys=True), flush=True)
    else:
        print(text, flush=True)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(c) for c in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row: list[str]) -> str:
        return " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()

    rule = "-+-".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), rule, *(line(r) for r in cells[1:])])


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f} ms"


def us(seconds: float) -> str:
    return f"{seconds * 1e6:.1f} us"


def machine() -> dict[str, Any]:
    return {
        "python": sys.version.split()[0],
        "cpus": os.cpu_count(),
        "platform": sys.platform,
        "kernel": os.uname().release,
    }


# ---- statistics ----------------------------------------------------------------------------


def percentile(samples: Sequence[float], q: float) -> float:
    """Nearest-rank percentile, ``0 < q <= 1``. Raises ``ValueError`` on no samples."""
    if not samples:
        raise ValueError("no samples")
    ordered = sorted(samples)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def summarize(samples: Sequence[float]) -> dict[str, float]:
    """n, p50, p99, max, mean, min of ``samples`` (seconds in, seconds out)."""
    return {
        "n": len(samples),
        "p50": percentile(samples, 0.50),
        "p99": percentile(samples, 0.99),
        "max": max(samples),
        "min": min(samples),
        "mean": sum(samples) / len(samples),
    }


# ---- temp dirs and daemons -----------------------------------------------------------------


@contextlib.contextmanager
def temp_dir() -> Iterator[Path]:
    """A fresh ``osk-b-*`` directory (short, so ipc:// paths fit), removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="osk-b-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def toml_value(value: Any) -> str:
    return json.dumps(value)  # strings, numbers, bools and lists print the same in TOML


def daemon_config(
    plugins: dict[str, dict[str, Any]],
    groups: dict[str, dict[str, Any]] | None = None,
    **daemon: Any,
) -> str:
    """A config text: ``[daemon]`` (runtime_dir ``run``), plugins and groups; nested dicts
    become sub-tables such as ``[plugins.NAME.backoff]``."""
    out = ["[daemon]", 'runtime_dir = "run"']
    out += [f"{k} = {toml_value(v)}" for k, v in daemon.items()]
    for kind, tables in (("plugins", plugins), ("groups", groups or {})):
        for name, options in tables.items():
            out += ["", f"[{kind}.{name}]"]
            out += [f"{k} = {toml_value(v)}" for k, v in options.items() if not isinstance(v, dict)]
            for key, sub in options.items():
                if isinstance(sub, dict):
                    out.append(f"[{kind}.{name}.{key}]")
                    out += [f"{k} = {toml_value(v)}" for k, v in sub.items()]
    return "\n".join(out) + "\n"


def bench_plugin(entry: str = "benchplugins:Stamp", **options: Any) -> dict[str, Any]:
    """Options for a plugin from ``bench/plugins``."""
    return {"entry": entry, "path": [str(PLUGINS)], **options}


class ControlError(Exception):
    pass


def file_identity(path: Path) -> tuple[int, int] | None:
    """Which file is at ``path`` (inode and ctime: a removed file's inode may come back)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_ctime_ns


class BenchDaemon:
    """One real daemon process in ``workdir``; see ``open_daemon``."""

    def __init__(self, workdir: Path, config_text: str) -> None:
        self.workdir = workdir
        self.config = workdir / "osk.toml"
        self.runtime = workdir / "run"
        self.control = self.runtime / "control.sock"
        self.broker = f"ipc://{self.runtime / 'broker.sock'}"
        self.log = workdir / "daemon.log"
        self.config.write_text(config_text)
        self.proc: subprocess.Popen[bytes] | None = None
        self.seen: dict[int, psutil.Process] = {}

    def start(self, timeout: float = 20.0) -> None:
        """Start the daemon; return once its control socket is there (a new one: a daemon
        killed before on this runtime dir leaves its socket file behind)."""
        stale = file_identity(self.control)
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "osk_daemon.cli", "run", "--config", str(self.config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
            )
        deadline = time.monotonic() + timeout
        while file_identity(self.control) in (None, stale):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"daemon did not come up:\n{self.tail()}")
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(0.005)

    def tail(self, chars: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    def ctl(self, cmd: str, timeout: float = 10.0, **args: Any) -> Any:
        """One control-socket command (newline-JSON); raises ``ControlError`` if refused."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(self.control))
            sock.sendall(json.dumps({"cmd": cmd, "args": args}).encode() + b"\n")
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    raise ControlError(f"control socket closed during {cmd!r}")
                buf += chunk
        reply = json.loads(buf)
        if not reply.get("ok"):
            raise ControlError(f"{cmd}: {reply.get('error')}")
        self._remember_children()
        return reply["result"]

    def row(self, plugin: str, instance: int = 0) -> dict[str, Any]:
        rows = self.ctl("status", plugin=plugin)
        return next(r for r in rows if r["instance"] == instance)

    def ready(self) -> bool:
        rows = self.ctl("status")
        return bool(rows) and all(r["state"] == "ready" and r["pid"] for r in rows)

    def wait_until(self, predicate: Callable[[], Any], timeout: float = 20.0) -> Any:
        """Re-check ``predicate`` after every daemon event (``events -f``), up to ``timeout``."""
        deadline = time.monotonic() + timeout
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(str(self.control))
            sock.sendall(b'{"cmd": "events", "args": {"follow": true, "lines": 0}}\n')
            while True:
                result = predicate()
                if result:
                    return result
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"daemon not there in {timeout} s:\n{self.tail()}")
                sock.settimeout(min(left, 0.5))
                with contextlib.suppress(TimeoutError):
                    sock.recv(65536)

    def _remember_children(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(psutil.Error):
            for child in psutil.Process(self.proc.pid).children(recursive=True):
                self.seen.setdefault(child.pid, child)

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM by pid, wait, SIGKILL if needed, then kill any plugin process left."""
        if self.proc is None:
            return
        self._remember_children()
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        finally:
            for child in self.seen.values():
                with contextlib.suppress(psutil.Error):
                    child.kill()  # psutil refuses if the pid was reused meanwhile


@contextlib.contextmanager
def open_daemon(config_text: str, *, wait_ready: bool = True) -> Iterator[BenchDaemon]:
    """Run a daemon for the block; it and its temp dir are gone afterwards, whatever happens."""
    with temp_dir() as workdir:
        daemon = BenchDaemon(workdir, config_text)
        try:
            daemon.start()
            if wait_ready:
                daemon.wait_until(daemon.ready)
            yield daemon
        finally:
            daemon.stop()
