"""Chaos soak: a seeded random schedule of abuse while a client keeps calling.

The daemon runs three permanent plugins (``echo`` with two instances, ``hog`` with a
memory limit, ``sick`` whose health checks can be failed) and one that crash-loops at
start (``looper``, transient: it is expected to give up, not to take the others along).
For ``OSK_CHAOS_SECONDS`` (default 20) a seeded schedule (``OSK_CHAOS_SEED``) picks, a
few times a second, one of: SIGKILL an instance, SIGSTOP one (its heartbeats stop: the
daemon must kill and replace it), block one's event loop (``hang``), make one allocate
past its memory limit (OOM), make one fail its health checks, make one exit; and, now
and then (at least once, at most ``DAEMON_KILLS`` times), SIGKILL the daemon itself and
start it again on the same runtime dir, which must re-adopt what runs. A client thread
calls ``echo`` the whole time with a deadline.

While no daemon runs, its plugins are re-parented: this test is their child subreaper
(``adopting_parent``), and reaps every one of them by pid at the end.

Afterwards: every permanent plugin is ready and healthy again within a bound; no call
took longer than its deadline plus a margin (nothing hung); the daemon is still
answering; and at the end no plugin process, zombie or cgroup is left (the harness
checks that for every daemon it runs).
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import threading
import time

import pytest

from osk_daemon.errors import OskError
from osk_daemon.ipc.client import Client
from tests.integration.harness import (
    ControlError,
    Daemon,
    adopting_parent,
    daemon_config,
    plugin_block,
    reap_the_rest,
    running_daemon,
)

SECONDS = float(os.environ.get("OSK_CHAOS_SECONDS", "20"))
SEED = int(os.environ.get("OSK_CHAOS_SEED", "1"))
CALL_TIMEOUT = 1.0
DAEMON_KILLS = 3

pytestmark = [pytest.mark.integration, pytest.mark.timeout(SECONDS * 3 + 120)]


def config() -> str:
    hc = {"interval": 0.2, "timeout": 0.2, "failure_threshold": 2}
    fast = {"base": 0.0, "max": 0.2, "jitter": 0.0}
    return daemon_config(
        plugin_block("echo", instances=2, health_check=hc, backoff=fast)
        + plugin_block(
            "hog", entry="testplugins:Confined", limits={"memory": "96MiB"}, backoff=fast
        )
        + plugin_block("sick", health_check=hc, backoff=fast)
        + plugin_block("looper", restart="transient", config={"fail_start": True})
        # the crash loop is contained in its own group, which gives up after 3 restarts
        + '\n[groups.root]\nintensity = 1000\nperiod = 1.0\nchildren = ["echo", "hog", '
        '"sick", "loopy"]\n[groups.loopy]\nintensity = 3\nperiod = 5.0\n'
        'children = ["looper"]\n',
        heartbeat_interval=0.1,
        heartbeat_timeout=0.6,
    )


class Caller:
    def __init__(self, d: Daemon) -> None:
        self.endpoint = f"ipc://{d.runtime / 'broker.sock'}"
        self.slowest = 0.0
        self.ok = 0
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with Client(self.endpoint) as client:
            end = time.monotonic() + SECONDS * 3 + 60
            while not self._stop.is_set() and time.monotonic() < end:
                start = time.monotonic()
                try:
                    client.call("echo", "echo", {"text": "x"}, timeout=CALL_TIMEOUT)
                    self.ok += 1
                except OskError:
                    self.errors += 1
                self.slowest = max(self.slowest, time.monotonic() - start)

    def __enter__(self) -> Caller:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)


def abuse(d: Daemon, rng: random.Random, daemon_kills: int, force: bool = False) -> str:
    """One abusive act; ``force`` kills the daemon (so every soak does it at least once)."""
    if force or (daemon_kills < DAEMON_KILLS and rng.random() < 0.05):
        d.kill(signal.SIGKILL)
        d.start()  # on the same runtime dir: it re-adopts what still runs
        # checked now, in the new daemon's young event ring: by the end of a long soak
        # later events have pushed its adoption out of the ring
        d.wait_until(lambda: readopted(d), timeout=10, what="re-adoption after a kill -9")
        return "daemon-kill"
    rows = [r for r in d.status() if r["plugin"] != "looper" and r["pid"]]
    if not rows:
        return "nothing running"
    row = rng.choice(rows)
    plugin, pid = row["plugin"], row["pid"]
    action = rng.choice(["kill", "stop", "hang", "oom", "sick", "exit"])
    # the abusive calls are not waited for: a short socket timeout cuts them off
    with contextlib.suppress(ProcessLookupError, ControlError, TimeoutError):
        if action == "kill":
            os.kill(pid, signal.SIGKILL)
        elif action == "stop":
            os.kill(pid, signal.SIGSTOP)  # frozen: no heartbeats, the daemon kills it
        elif action == "hang":
            d.ctl("call", plugin=plugin, method="hang", args={"seconds": 30}, timeout=0.2)
        elif action == "oom" and plugin == "hog":
            d.ctl("call", plugin="hog", method="hog", args={"mib": 512}, timeout=2.0)
        elif action == "sick" and plugin in ("sick", "echo"):
            d.ctl("call", plugin=plugin, method="sick", timeout=1.0)
        elif action == "exit":
            d.ctl("call", plugin=plugin, method="crash", args={"code": 3}, timeout=0.5)
    return f"{action} {plugin}/{row['instance']}"


def readopted(d: Daemon) -> bool:
    """The daemon's events say it took over (or found gone, or killed) what the killed one
    ran."""
    types = {e["type"] for e in d.ctl("events", lines=1000)}
    # a kill that lands while the instances start leaves only records caught loading
    return bool(types & {"plugin:adopted", "plugin:lost", "plugin:not-adopted"})


def recovered(d: Daemon) -> bool:
    rows = [r for r in d.status() if r["plugin"] != "looper"]
    return len(rows) == 4 and all(
        r["state"] == "ready" and r["health"] in ("healthy", "recovering") for r in rows
    )


def test_the_daemon_survives_a_seeded_soak() -> None:
    rng = random.Random(SEED)
    done: list[str] = []
    with adopting_parent() as reap, running_daemon(config(), wait_ready=False) as d:
        d.wait_until(lambda: recovered(d), what="all permanent plugins up")
        with Caller(d) as caller:
            end = time.monotonic() + SECONDS
            while time.monotonic() < end:
                kills = done.count("daemon-kill")
                done.append(abuse(d, rng, kills, force=not kills and time.monotonic() > end - 8))
                # pace the schedule on the daemon's own events, not on a fixed sleep
                with contextlib.suppress(AssertionError):
                    d.wait_until(lambda: False, timeout=rng.uniform(0.05, 0.4))
            d.wait_until(lambda: recovered(d), timeout=30, what="recovery after the soak")
            ok_before = caller.ok
            d.wait_until(lambda: caller.ok >= ok_before + 20, what="calls succeed again")
        # a call the killed daemon never answered ends at the client's own bound: the
        # deadline plus its 0.5 s grace (plus scheduling, on a loaded 2-core machine)
        assert caller.slowest <= CALL_TIMEOUT + 0.75, f"a call hung: {caller.slowest:.2f}s"
        assert caller.ok > 0
        kinds = {entry.split()[0] for entry in done}
        assert len(kinds) >= 4, f"the schedule did too little: {done}"
        looper = [r for r in d.status() if r["plugin"] == "looper"]
        assert looper and looper[0]["state"] in ("failed", "unloaded", "pending", "loading")
        events = {e["type"] for e in d.ctl("events", lines=1000)}
        assert "plugin:destroyed" in events
        assert "daemon-kill" in done  # each one checked for re-adoption (abuse)
        d.stop()
        reap_the_rest(d, {}, reap)  # what the killed daemons left, now ours to reap
