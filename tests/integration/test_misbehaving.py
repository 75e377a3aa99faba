"""Plugins that hang, sicken, ignore SIGTERM, fail to start or leave children behind."""

from __future__ import annotations

import os
import signal

import pytest

from tests.integration.harness import (
    alive,
    beat_in,
    daemon_config,
    plugin_block,
    running_daemon,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


def test_hung_event_loop_is_detected_by_heartbeats_and_restarted() -> None:
    cfg = daemon_config(plugin_block("h", health_check={"enabled": False}))
    with running_daemon(cfg) as d:
        old = d.row("h")["pid"]
        with pytest.raises(Exception):  # noqa: B017 - the call times out or the process dies
            d.call("h", "hang", {"seconds": 1000}, timeout=0.5)
        d.wait_until(
            lambda: d.row("h")["pid"] not in (old, None) and d.row("h")["state"] == "ready"
        )
        assert not alive(old)
        assert d.row("h")["last_exit"] == "SIGKILL"
        errors = [e for e in d.ctl("events") if e["type"] == "plugin:error"]
        assert any("hung" in e.get("detail", "") for e in errors)


def test_failing_health_checks_restart_the_instance() -> None:
    hc = {"interval": 0.1, "timeout": 0.05, "failure_threshold": 2, "auto_restart": True}
    with running_daemon(daemon_config(plugin_block("s", health_check=hc))) as d:
        d.wait_until(lambda: d.row("s")["health"] == "healthy")
        old = d.row("s")["pid"]
        d.call("s", "sick")
        d.wait_until(
            lambda: d.row("s")["pid"] not in (old, None) and d.row("s")["state"] == "ready"
        )
        kinds = [e.get("health") for e in d.ctl("events") if e["type"] == "plugin:health"]
        assert "unhealthy" in kinds
        d.wait_until(lambda: d.row("s")["health"] == "healthy")


def test_sigterm_ignoring_plugin_is_killed_after_the_timeout() -> None:
    cfg = daemon_config(plugin_block("stubborn", shutdown_timeout=0.3))
    with running_daemon(cfg) as d:
        pid = d.row("stubborn")["pid"]
        d.call("stubborn", "ignore_sigterm")
        d.ctl("stop", name="stubborn")
        assert d.row("stubborn")["state"] == "unloaded"
        assert d.row("stubborn")["last_exit"] == "SIGKILL"
        assert not alive(pid)


def test_a_plugin_that_fails_to_start_is_reported_and_retried_with_backoff() -> None:
    cfg = daemon_config(
        plugin_block("bad", config={"fail_start": True}, backoff={"base": 0.05, "max": 0.2})
        + plugin_block("good")
        + '[groups.root]\nintensity = 100\nperiod = 10.0\nchildren = ["bad", "good"]\n'
    )
    with running_daemon(cfg, wait_ready=False) as d:
        d.wait_until(lambda: d.row("bad")["restarts"] >= 2, what="repeated start attempts")
        assert d.row("good")["state"] == "ready" or d.wait_until(
            lambda: d.row("good")["state"] == "ready"
        )
        errors = [e for e in d.ctl("events") if e["type"] == "plugin:error"]
        assert any("fail_start" in e.get("detail", "") for e in errors)


def test_plugin_children_die_with_the_plugin() -> None:
    with running_daemon(daemon_config(plugin_block("parent"))) as d:
        grandchild = d.call("parent", "spawn_grandchild")
        d.seen_pids.add(grandchild)
        os.kill(d.row("parent")["pid"], signal.SIGKILL)
        d.wait_until(lambda: not alive(grandchild), what="grandchild gone")


def test_plugin_to_plugin_calls_go_through_the_daemon() -> None:
    cfg = daemon_config(plugin_block("front") + plugin_block("back", instances=2))
    with running_daemon(cfg) as d:
        answer = d.call(
            "front",
            "call_other",
            {"plugin": "back", "method": "echo", "args": {"text": "via front"}},
        )
        assert answer["text"] == "via front"
        back_pids = {r["pid"] for r in d.status("back")}
        assert answer["pid"] in back_pids


def test_heartbeats_go_through_the_shared_page_which_goes_with_the_life() -> None:
    cfg = daemon_config(plugin_block("b", health_check={"enabled": False}))
    with running_daemon(cfg) as d:
        d.wait_until(lambda: d.row("b")["state"] == "ready")
        pages = list((d.runtime / "output").glob("b-0-*.beat"))
        assert len(pages) == 1
        stamp = d.wait_until(lambda: beat_in(pages[0]) or None, what="a first beat")
        d.wait_until(lambda: beat_in(pages[0]) > stamp, what="a later beat")  # the loop runs on
        d.ctl("stop", name="b")
        assert d.row("b")["state"] == "unloaded"
        assert not pages[0].exists()  # removed with the life it belonged to
