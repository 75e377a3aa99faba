"""Health checks a worker runs itself (worker.health), on real daemons and plugins."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.harness import (
    Daemon,
    daemon_config,
    health_in,
    plugin_block,
    running_daemon,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

FAST = {"interval": 0.1, "timeout": 0.05, "failure_threshold": 2, "auto_restart": True}


def _page(d: Daemon, name: str) -> Path:
    pages = list((d.runtime / "output").glob(f"{name}-0-*.beat"))
    assert len(pages) == 1, pages
    return pages[0]


def test_a_healthy_worker_checks_itself_and_only_its_page_moves() -> None:
    with running_daemon(daemon_config(plugin_block("w", health_check=FAST))) as d:
        d.wait_until(lambda: d.row("w")["health"] == "healthy")
        page = _page(d, "w")
        pushes, first = health_in(page)
        assert pushes  # marked before READY: the daemon sends it no HEALTH frames
        d.wait_until(
            lambda: health_in(page)[1] >= first + 5,
            what="five more healthy checks counted in the page",
        )
        assert d.row("w")["health"] == "healthy"
        health = [e for e in d.ctl("events") if e["type"] == "plugin:health"]
        assert [e["health"] for e in health] == ["healthy"]  # news once, then silence


def test_a_health_check_that_never_ends_is_no_answer_and_restarts_the_plugin() -> None:
    with running_daemon(daemon_config(plugin_block("n", health_check=FAST))) as d:
        d.wait_until(lambda: d.row("n")["health"] == "healthy")
        old = d.row("n")["pid"]
        d.call("n", "hang_health")
        d.wait_until(
            lambda: d.row("n")["pid"] not in (old, None) and d.row("n")["state"] == "ready"
        )
        details = [e.get("detail", "") for e in d.ctl("events") if e["type"] == "plugin:health"]
        assert any("no answer within 0.05s" in text for text in details), details
        d.wait_until(lambda: d.row("n")["health"] == "healthy")  # the new life checks itself


def test_a_reload_that_changes_the_health_policy_hands_the_checks_to_the_daemon() -> None:
    with running_daemon(daemon_config(plugin_block("r", health_check=FAST))) as d:
        d.wait_until(lambda: d.row("r")["health"] == "healthy")
        page = _page(d, "r")
        assert health_in(page)[0]
        pid = d.row("r")["pid"]
        slower = {**FAST, "interval": 0.2}
        d.config.write_text(daemon_config(plugin_block("r", health_check=slower)))
        d.ctl("reload")
        # the daemon's first probe told the worker to stop its own checks (old policy)
        d.wait_until(
            lambda: not health_in(page)[0],
            what="the worker's own checks stopped",
        )
        assert d.row("r")["pid"] == pid  # a health policy is retuned in place
        d.call("r", "sick")  # now the daemon's probes find it
        d.wait_until(
            lambda: d.row("r")["pid"] not in (pid, None) and d.row("r")["state"] == "ready"
        )
        kinds = [e.get("health") for e in d.ctl("events") if e["type"] == "plugin:health"]
        assert "unhealthy" in kinds
