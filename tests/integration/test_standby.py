"""Hot standbys (``standby = true``): a crash promotes the instance's armed spare process;
requested restarts and stops drop it; one that cannot load is not replaced in a loop."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import pytest

from tests.integration.harness import (
    Daemon,
    adopting_parent,
    alive,
    daemon_config,
    plugin_block,
    reap_the_rest,
    running_daemon,
    wait_recorded,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

NO_DELAY = {"base": 0.0, "max": 0.0, "jitter": 0.0}


def armed(d: Daemon, plugin: str = "echo") -> dict[str, Any] | None:
    """The row of a READY instance whose standby is armed, else None."""
    row = d.row(plugin)
    standby = row["standby"]
    if row["state"] == "ready" and standby and standby["armed"]:
        return row
    return None


def gone(pid: int) -> bool:
    return not alive(pid)


def test_a_crash_promotes_the_armed_standby() -> None:
    config = daemon_config(plugin_block("echo", standby=True, backoff=NO_DELAY))
    with running_daemon(config) as d:
        first = d.wait_until(lambda: armed(d), what="an armed standby")
        standby_pid = first["standby"]["pid"]
        assert standby_pid != first["pid"]
        assert alive(standby_pid)

        os.kill(first["pid"], signal.SIGKILL)
        second = d.wait_until(
            lambda: (r := d.row("echo"))["pid"] == standby_pid and r["state"] == "ready" and r,
            what="the standby as the new life",
        )
        assert second["restarts"] == 1
        assert d.call("echo", "pid") == standby_pid  # it answers calls
        assert d.call("echo", "echo", {"text": "hi"})["text"] == "hi"
        third = d.wait_until(lambda: armed(d), what="the next standby")
        assert third["standby"]["pid"] not in (first["pid"], standby_pid)
        events = d.ctl("events", lines=200)
        assert any(e.get("type") == "plugin:standby" for e in events), events


def test_requested_restart_and_stop_drop_the_standby() -> None:
    config = daemon_config(plugin_block("echo", standby=True))
    with running_daemon(config) as d:
        row = d.wait_until(lambda: armed(d), what="an armed standby")
        standby_pid = row["standby"]["pid"]
        d.ctl("restart", name="echo")  # the operator's restart starts afresh
        d.wait_until(lambda: gone(standby_pid), what="the dropped standby reaped")
        after = d.wait_until(lambda: armed(d), what="a standby for the new life")
        assert after["pid"] not in (row["pid"], standby_pid)

        standby_pid = after["standby"]["pid"]
        d.ctl("stop", name="echo")
        d.wait_until(lambda: gone(standby_pid) and gone(after["pid"]), what="both gone")
        assert d.row("echo")["standby"] is None


def test_a_standby_stopped_by_sigterm_is_replaced_at_the_next_ready() -> None:
    config = daemon_config(plugin_block("echo", standby=True, backoff=NO_DELAY))
    with running_daemon(config) as d:
        row = d.wait_until(lambda: armed(d), what="an armed standby")
        os.kill(row["standby"]["pid"], signal.SIGTERM)
        d.wait_until(lambda: d.row("echo")["standby"] is None, what="the standby gone")
        assert "ended by itself" in d.log.read_text()
        assert d.row("echo")["pid"] == row["pid"]  # the live process is untouched
        os.kill(row["pid"], signal.SIGKILL)  # restarts the usual way, then arms again
        again = d.wait_until(lambda: armed(d), what="a new standby after the restart")
        assert again["pid"] not in (row["pid"], row["standby"]["pid"])


def test_a_standby_that_cannot_load_is_logged_and_restarts_spawn_as_usual(
    tmp_path: Path,
) -> None:
    count = tmp_path / "imports"
    env = {"OSK_IMPORT_COUNT": str(count), "OSK_FAIL_IMPORT": "2"}  # the standby's import
    config = daemon_config(
        plugin_block("flaky", entry="flakyplugins:Flaky", standby=True, env=env, backoff=NO_DELAY)
    )
    with running_daemon(config) as d:
        d.wait_until(lambda: "ended by itself" in d.log.read_text(), what="the standby's end")
        logs = "\n".join(line["line"] for line in d.ctl("logs", name="flaky"))
        assert "import number 2 fails on purpose" in logs
        row = d.row("flaky")
        assert row["state"] == "ready" and row["standby"] is None
        assert count.stat().st_size == 2  # not made again while the instance lives on
        os.kill(row["pid"], signal.SIGKILL)
        again = d.wait_until(lambda: armed(d, "flaky"), what="a restart, then a standby")
        assert again["pid"] != row["pid"]
        assert d.call("flaky", "echo", {"text": "ok"})["text"] == "ok"


def test_after_kill_9_of_the_daemon_the_standby_exits_and_the_live_one_is_readopted() -> None:
    config = daemon_config(
        plugin_block("echo", standby=True, backoff=NO_DELAY), orphan_timeout=30.0
    )
    with adopting_parent() as reap, running_daemon(config) as d:
        first = d.wait_until(lambda: armed(d), what="an armed standby")
        os.kill(first["pid"], signal.SIGKILL)  # the live life moves to the other cgroup slot
        row = d.wait_until(
            lambda: (r := armed(d)) and r["pid"] == first["standby"]["pid"] and r,
            what="the promoted standby with a standby of its own",
        )
        standby_pid = row["standby"]["pid"]
        wait_recorded(d, {"echo": row["pid"]})
        d.kill(signal.SIGKILL)
        assert reap([standby_pid]) == {standby_pid: 0}  # EOF on its go socket: it left
        reap_the_rest(d, {"echo": row["pid"]}, reap)
        d.start()
        again = d.wait_until(lambda: armed(d), what="re-adopted, with a new standby")
        assert again["pid"] == row["pid"]
        assert again["standby"]["pid"] != standby_pid
        assert d.call("echo", "pid") == row["pid"]
        d.stop()
        reap([row["pid"]])
