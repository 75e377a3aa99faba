"""Hot standbys (``standby = true``): a crash promotes the instance's armed spare process;
requested restarts and stops drop it; one that cannot load is not replaced in a loop."""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path
from typing import Any

import pytest

from tests.integration.harness import (
    Daemon,
    adopting_parent,
    alive,
    daemon_config,
    leftover_cgroups,
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


def instance_cgroups(d: Daemon) -> set[str]:
    """The instance cgroups under the daemon's subtree, in any hierarchy."""
    return {
        entry.name
        for top in leftover_cgroups(d.runtime)
        for entry in Path(top).iterdir()
        if entry.is_dir()
    }


def test_a_temporary_plugins_standby_goes_when_it_is_not_restarted() -> None:
    config = daemon_config(plugin_block("echo", standby=True, restart="temporary"))
    with running_daemon(config) as d:
        row = d.wait_until(lambda: armed(d), what="an armed standby")
        os.kill(row["pid"], signal.SIGKILL)
        d.wait_until(lambda: gone(row["standby"]["pid"]), what="the standby gone too")
        after = d.row("echo")
        assert after["pid"] is None and after["standby"] is None
        assert after["state"] != "ready"


def test_a_retuned_plugin_gets_a_standby_made_for_its_new_config() -> None:
    def config(start_timeout: float) -> str:
        return daemon_config(plugin_block("echo", standby=True, start_timeout=start_timeout))

    with running_daemon(config(10.0)) as d:
        old = d.wait_until(lambda: armed(d), what="an armed standby")["standby"]["pid"]
        d.config.write_text(config(11.0))  # a retune: the instance keeps running
        d.ctl("reload")
        new = d.wait_until(
            lambda: (r := armed(d)) and r["standby"]["pid"] != old and r,
            what="a new standby",
        )
        assert gone(old)
        os.kill(new["pid"], signal.SIGKILL)  # the new one is promoted
        d.wait_until(lambda: d.row("echo")["pid"] == new["standby"]["pid"], what="the promotion")


def test_an_instance_removed_after_a_promotion_leaves_neither_cgroup_slot() -> None:
    def config(instances: int) -> str:
        return daemon_config(
            plugin_block("echo", standby=True, instances=instances, backoff=NO_DELAY)
        )

    with running_daemon(config(2)) as d:
        row = d.wait_until(
            lambda: (
                armed(d, "echo")
                and (r := d.row("echo", 1))
                and r["standby"]
                and r["standby"]["armed"]
                and r
            ),
            what="two armed",
        )
        os.kill(row["pid"], signal.SIGKILL)  # instance 1 now lives in its second slot
        d.wait_until(lambda: d.row("echo", 1)["pid"] == row["standby"]["pid"], what="promoted")
        assert "echo-1.1" in instance_cgroups(d)
        d.config.write_text(config(1))
        d.ctl("reload")
        d.wait_until(
            lambda: (
                [r["instance"] for r in d.status()] == [0]
                and not {"echo-1", "echo-1.1"} & instance_cgroups(d)
            ),
            what="instance 1 and both its cgroups gone",
        )
        assert gone(row["standby"]["pid"])


def test_a_standby_dropped_while_it_is_spawned_never_takes_the_next_ones_cgroup() -> None:
    config = daemon_config(plugin_block("echo", standby=True, backoff=NO_DELAY))
    with running_daemon(config) as d:
        first = d.wait_until(lambda: armed(d), what="an armed standby")
        zygote = int(re.findall(r"zygote (\d+) ready", d.log.read_text())[-1])
        os.kill(zygote, signal.SIGSTOP)  # the next standby's spawn (the zygote's) hangs
        try:
            os.kill(first["pid"], signal.SIGKILL)
            promoted = first["standby"]["pid"]
            d.wait_until(
                lambda: (r := d.row("echo"))["pid"] == promoted and r["standby"],
                what="the next standby being spawned",
            )
            os.kill(promoted, signal.SIGKILL)  # drops it unspawned; a warm child restarts
            d.wait_until(
                lambda: (
                    (r := d.row("echo"))["state"] == "ready"
                    and r["pid"] != promoted
                    and r["standby"] is not None
                ),  # its next standby is due
                what="a restart from the warm pool",
            )
        finally:
            os.kill(zygote, signal.SIGCONT)
        last = d.wait_until(lambda: armed(d), what="a standby once the dropped one is gone")
        assert alive(last["standby"]["pid"])
        assert "ended by itself" not in d.log.read_text()
