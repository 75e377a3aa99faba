"""sd_notify against a real daemon: the test binds the AF_UNIX datagram socket systemd would
(NOTIFY_SOCKET) and reads what the daemon says as it boots, runs, reloads and stops.

Plugins whose ``start`` waits on a unix socket the test holds (``notifyplugins:Gated``)
let the test decide when each plugin is ready, so "READY=1 only after the critical plugin
is up" is checked while that plugin is provably not up, without sleeps.
"""

from __future__ import annotations

import itertools
import os
import signal
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.integration.harness import (
    ControlError,
    Daemon,
    daemon_config,
    plugin_block,
    running_daemon,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

Message = dict[str, str]


class Listener:
    """The NOTIFY_SOCKET end: every datagram, parsed, with the monotonic time it arrived."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.seen: list[tuple[float, Message]] = []

    def _recv(self, timeout: float) -> Message | None:
        """The next datagram within ``timeout`` (0: only one already queued), or None."""
        if timeout > 0:
            self.sock.settimeout(timeout)
        else:
            self.sock.setblocking(False)
        try:
            data = self.sock.recv(4096)
        except (TimeoutError, BlockingIOError):
            return None
        message = dict(line.split("=", 1) for line in data.decode().splitlines())
        self.seen.append((time.monotonic(), message))
        return message

    def until(
        self, match: Callable[[Message], bool], what: str, timeout: float = 20.0
    ) -> list[Message]:
        """Read until a message matches; return what arrived in this call, the match last."""
        deadline = time.monotonic() + timeout
        got: list[Message] = []
        while not got or not match(got[-1]):
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {what} within {timeout}s; last: {got[-10:]}")
            if (message := self._recv(left)) is not None:
                got.append(message)
        return got

    def during(self, seconds: float) -> list[Message]:
        """Everything that arrives in the next ``seconds`` (to check that something does not)."""
        deadline = time.monotonic() + seconds
        got = []
        while (left := deadline - time.monotonic()) > 0:
            if (message := self._recv(left)) is not None:
                got.append(message)
        return got

    def pending(self) -> list[Message]:
        """What has arrived already, without waiting."""
        got = []
        while (message := self._recv(0)) is not None:
            got.append(message)
        return got

    def close(self) -> None:
        self.sock.close()


class Gate:
    """A unix socket a Gated plugin's start connects to and waits on until ``open``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(path))
        self.server.listen(1)
        self.conn: socket.socket | None = None

    def wait_reached(self, timeout: float = 20.0) -> None:
        """Return once the plugin's start is waiting here."""
        self.server.settimeout(timeout)
        self.conn, _ = self.server.accept()

    def open(self) -> None:
        assert self.conn is not None
        self.conn.sendall(b"x")
        self.conn.close()

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
        self.server.close()


@pytest.fixture
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="osk-n-"))
    yield path
    for child in path.iterdir():
        child.unlink()
    path.rmdir()


@pytest.fixture
def listener(workdir: Path) -> Iterator[Listener]:
    lst = Listener(workdir / "notify.sock")
    yield lst
    lst.close()


@pytest.fixture
def gates(workdir: Path) -> Iterator[Callable[[str], Gate]]:
    made: list[Gate] = []

    def gate(name: str) -> Gate:
        made.append(Gate(workdir / f"{name}.gate"))
        return made[-1]

    yield gate
    for g in made:
        g.close()


def gated(name: str, gate: Gate, config: dict[str, object] | None = None, **options: object) -> str:
    """A [plugins.NAME] table of a Gated plugin waiting on ``gate``."""
    config = {"gate": str(gate.path), **(config or {})}
    return plugin_block(
        name, entry="notifyplugins:Gated", start_timeout=60, config=config, **options
    )


def is_(key: str, value: str = "1") -> Callable[[Message], bool]:
    return lambda m: m.get(key) == value


def monotonic_usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def check_reload(listener: Listener, trigger: Callable[[], None]) -> None:
    """``trigger`` reloads: RELOADING=1 with a MONOTONIC_USEC of that moment, then READY=1."""
    before = monotonic_usec()
    trigger()
    got = listener.until(is_("READY"), "READY=1 after the reload")
    after = monotonic_usec()
    reloading = [m for m in got if m.get("RELOADING") == "1"]
    assert len(reloading) == 1, got
    assert before <= int(reloading[0]["MONOTONIC_USEC"]) <= after
    assert got.index(reloading[0]) < len(got) - 1  # READY=1 came after it


def test_ready_after_the_critical_plugin_watchdog_reload_and_stopping(
    workdir: Path, listener: Listener, gates: Callable[[str], Gate]
) -> None:
    core, extra = gates("core"), gates("extra")
    config = daemon_config(
        gated("core", core, critical=True, health_check={"interval": 0.3, "timeout": 0.2})
        + gated("extra", extra, spawn="exec")
    )
    period = 0.4  # WATCHDOG_USEC: the daemon pings every 0.2 s
    env = {"NOTIFY_SOCKET": str(listener.path), "WATCHDOG_USEC": str(int(period * 1e6))}
    with running_daemon(config, wait_ready=False, env=env) as d:
        assert f"NOTIFY_SOCKET={listener.path}" in _environ(d)  # the daemon got it
        core.wait_reached()
        extra.wait_reached()

        # both plugins are held in start: the watchdog runs, READY=1 waits for "core"
        listener.pending()
        held = len(listener.seen)
        listener.until(lambda m: _count(listener, "WATCHDOG", held) >= 3, "3 WATCHDOG=1")
        assert not any("READY" in m for _, m in listener.seen)
        statuses = [m["STATUS"] for _, m in listener.seen if "STATUS" in m]
        assert statuses[-1] == "starting: waiting for core; 0 of 2 plugins up", statuses

        # "core" up (ready, then healthy by its first check): READY=1, though "extra" is not
        core.open()
        listener.until(is_("READY"), "READY=1")
        row = d.row("core")
        assert (row["state"], row["health"]) == ("ready", "healthy")
        assert d.row("extra")["state"] != "ready"

        extra.open()
        d.wait_until(d.all_ready, what="both plugins ready")
        listener.until(is_("STATUS", "running 2 plugins, 2 healthy"), "the running STATUS")

        # WATCHDOG=1 keeps coming, never a whole period apart
        start = len(listener.seen)
        listener.until(lambda m: _count(listener, "WATCHDOG", start) >= 6, "6 more WATCHDOG=1")
        pings = [t for t, m in listener.seen[start:] if "WATCHDOG" in m]
        gaps = [b - a for a, b in itertools.pairwise(pings)]
        assert max(gaps) < period, gaps

        # plugins (zygote and exec spawned) do not see NOTIFY_SOCKET
        assert d.call("core", "environ", {"name": "NOTIFY_SOCKET"}) is None
        assert d.call("extra", "environ", {"name": "NOTIFY_SOCKET"}) is None

        # RELOADING=1 ... READY=1 around oskctl reload, SIGHUP, and a refused reload
        check_reload(listener, lambda: d.ctl("reload"))
        assert d.proc is not None
        pid = d.proc.pid
        check_reload(listener, lambda: os.kill(pid, signal.SIGHUP))
        good = d.config.read_text()
        d.config.write_text(good + "\n[plugins.broken\n")

        def refused() -> None:
            with pytest.raises(ControlError, match="reload refused"):
                d.ctl("reload")

        check_reload(listener, refused)
        d.config.write_text(good)

        # SIGTERM (what systemctl stop sends): STOPPING=1, and no READY=1 after it
        assert d.stop() == 0
        got = listener.until(is_("STOPPING"), "STOPPING=1", timeout=5)
        assert got[-1]["STATUS"] == "stopping"
        assert not any("READY" in m for m in listener.pending())


def test_without_critical_plugins_ready_once_started_and_a_foreign_watchdog_is_not_fed(
    workdir: Path, listener: Listener, gates: Callable[[str], Gate]
) -> None:
    held = gates("held")
    env = {
        "NOTIFY_SOCKET": str(listener.path),
        "WATCHDOG_USEC": "20000",  # a ping every 10 ms, if it were ours
        "WATCHDOG_PID": "1",
    }
    with running_daemon(daemon_config(gated("held", held)), wait_ready=False, env=env) as d:
        held.wait_reached()
        listener.until(is_("READY"), "READY=1")
        assert d.row("held")["state"] != "ready"  # READY=1 did not wait for it
        held.open()
        d.wait_until(d.all_ready, what="held ready")
        listener.until(is_("STATUS", "running 1 plugin, 1 healthy"), "the running STATUS")
        listener.during(0.3)  # an absence needs a window: 30 would-be pings
        assert _count(listener, "WATCHDOG") == 0


def test_a_failed_boot_says_stopping_with_the_reason_and_never_ready(
    workdir: Path, listener: Listener, gates: Callable[[str], Gate]
) -> None:
    bad = gates("bad")
    config = daemon_config(
        gated("bad", bad, critical=True, config={"fail_start": True}), rollback_on_failure=True
    )
    env = {"NOTIFY_SOCKET": str(listener.path)}
    with running_daemon(config, wait_ready=False, env=env) as d:
        bad.wait_reached()
        bad.open()
        got = listener.until(is_("STOPPING"), "STOPPING=1")
        assert got[-1]["STATUS"].startswith("stopping: critical plugin bad/0 failed to start")
        assert d.proc is not None
        assert d.proc.wait(30) == 1
        listener.pending()
        assert not any("READY" in m for _, m in listener.seen)


def _count(listener: Listener, key: str, start: int = 0) -> int:
    return sum(key in m for _, m in listener.seen[start:])


def _environ(d: Daemon) -> str:
    assert d.proc is not None
    return Path(f"/proc/{d.proc.pid}/environ").read_bytes().decode().replace("\0", "\n")
