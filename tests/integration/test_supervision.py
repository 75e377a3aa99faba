"""OTP semantics with real processes: strategies, restart types, intensity, backoff."""

from __future__ import annotations

import os
import signal
from typing import Any

import pytest

from tests.integration.harness import Daemon, alive, daemon_config, plugin_block, running_daemon

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


def pids(d: Daemon) -> dict[str, int]:
    return {f"{r['plugin']}/{r['instance']}": r["pid"] for r in d.status()}


def group(name: str, strategy: str, children: list[str], intensity: int = 5) -> str:
    return (
        f'[groups.{name}]\nstrategy = "{strategy}"\nintensity = {intensity}\n'
        f"period = 10.0\nchildren = {children!r}\n".replace("'", '"')
    )


def three(strategy: str, intensity: int = 5) -> str:
    body = "".join(plugin_block(n) for n in ("a", "b", "c"))
    return daemon_config(body + group("root", strategy, ["a", "b", "c"], intensity))


def crash_and_wait(d: Daemon, victim: str, expect_new: set[str]) -> dict[str, int]:
    before = pids(d)
    os.kill(before[victim], signal.SIGKILL)

    seen: list[Any] = []  # the last look, for the message if it never settles

    def settled() -> dict[str, int] | None:
        now = pids(d)
        changed = {k for k in now if now[k] != before.get(k)}
        ready = d.all_ready()
        seen[:] = [now, sorted(changed), ready]
        return now if changed == expect_new and ready else None

    try:
        after: dict[str, int] = d.wait_until(settled, what=f"restart of {sorted(expect_new)}")
    except AssertionError as exc:
        raise AssertionError(f"before {before}; last seen (pids, changed, ready) {seen}") from exc
    return after


@pytest.mark.parametrize(
    ("strategy", "victim", "restarted"),
    [
        ("one_for_one", "b/0", {"b/0"}),
        ("one_for_all", "b/0", {"a/0", "b/0", "c/0"}),
        ("rest_for_one", "b/0", {"b/0", "c/0"}),
        ("rest_for_one", "c/0", {"c/0"}),
    ],
)
def test_strategies(strategy: str, victim: str, restarted: set[str]) -> None:
    with running_daemon(three(strategy)) as d:
        before = pids(d)
        after = crash_and_wait(d, victim, restarted)
        for leaf, pid in before.items():
            assert (after[leaf] != pid) == (leaf in restarted), leaf


def restart_types() -> str:
    body = (
        plugin_block("perm", restart="permanent")
        + plugin_block("trans", restart="transient")
        + plugin_block("temp", restart="temporary")
    )
    return daemon_config(body)


def test_permanent_restarts_even_after_a_clean_exit() -> None:
    with running_daemon(restart_types()) as d:
        old = d.row("perm")["pid"]
        with pytest.raises(Exception):  # noqa: B017 - the connection drops with the process
            d.call("perm", "crash", {"code": 0}, timeout=2)
        d.wait_until(lambda: d.row("perm")["state"] == "ready" and d.row("perm")["pid"] != old)
        assert d.row("perm")["last_exit"] == "exit 0"


def test_transient_restarts_after_a_crash_but_not_a_clean_exit() -> None:
    with running_daemon(restart_types()) as d:
        old = d.row("trans")["pid"]
        os.kill(old, signal.SIGKILL)
        d.wait_until(lambda: d.row("trans")["state"] == "ready" and d.row("trans")["pid"] != old)
        with pytest.raises(Exception):  # noqa: B017
            d.call("trans", "crash", {"code": 0}, timeout=2)
        d.wait_until(lambda: d.row("trans")["state"] == "unloaded", what="trans stays down")
        assert d.row("trans")["last_exit"] == "exit 0"
        assert d.row("trans")["pid"] is None


def test_temporary_is_never_restarted() -> None:
    with running_daemon(restart_types()) as d:
        os.kill(d.row("temp")["pid"], signal.SIGKILL)
        d.wait_until(lambda: d.row("temp")["state"] == "failed", what="temp stays down")
        assert d.row("temp")["restarts"] == 0
        assert d.row("perm")["state"] == "ready"


def test_intensity_exceeded_gives_up_and_escalates() -> None:
    body = (
        plugin_block("steady")
        + plugin_block("flappy", backoff={"base": 0.0, "max": 0.0, "jitter": 0.0})
        + group("root", "one_for_one", ["steady", "inner"], intensity=0)
        + group("inner", "one_for_one", ["flappy"], intensity=1)
    )
    with running_daemon(daemon_config(body)) as d:
        steady = d.row("steady")["pid"]
        old = d.row("flappy")["pid"]
        os.kill(old, signal.SIGKILL)
        d.wait_until(
            lambda: (
                d.row("flappy")["pid"] not in (old, None) and d.row("flappy")["state"] == "ready"
            )
        )
        assert d.row("flappy")["restarts"] == 1
        # a 2nd restart in 10 s exceeds inner's intensity 1: it gives up, the root
        # (intensity 0) cannot restart it either and gives up too: everything stops
        os.kill(d.row("flappy")["pid"], signal.SIGKILL)
        d.wait_until(
            lambda: all(r["state"] in ("unloaded", "failed") for r in d.status()),
            what="the whole tree to give up",
        )
        events = d.ctl("events")
        gave_up = [e["group"] for e in events if e["type"] == "supervisor:gave-up"]
        assert "inner" in gave_up and "root" in gave_up
        assert not alive(steady)
        assert d.proc is not None and d.proc.poll() is None  # the daemon stays up


def test_operator_stop_start_restart() -> None:
    with running_daemon(daemon_config(plugin_block("svc", instances=2))) as d:
        old = d.row("svc", 1)["pid"]
        d.ctl("stop", name="svc", instance=1)
        assert d.row("svc", 1)["state"] == "unloaded"
        assert not alive(old)
        assert d.row("svc", 0)["state"] == "ready"
        d.ctl("start", name="svc", instance=1)
        assert d.row("svc", 1)["state"] == "ready"
        before = d.row("svc", 0)["pid"]
        d.ctl("restart", name="svc")
        assert d.row("svc", 0)["pid"] != before
        assert d.row("svc", 0)["restarts"] == 0  # operator actions are not crashes
