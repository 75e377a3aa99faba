"""The daemon dies (kill -9) and comes back: its plugins keep running and are re-adopted.

While no daemon runs, the plugins a killed daemon leaves are re-parented. Here the test
process makes itself a child subreaper for the test, so they are re-parented to it (not
to PID 1, which reaps late here) and it reaps them by pid once they end.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.integration.harness import (
    ControlError,
    Daemon,
    adopting_parent,
    alive,
    beat_in,
    daemon_config,
    plugin_block,
    reap_the_rest,
    running_daemon,
    wait_in,
    wait_recorded,
)

pytestmark = pytest.mark.timeout(120)


class Load:
    """Calls ``counter.incr`` in a loop from a thread, through the control socket, each
    call with a deadline; keeps what came back and how long the slowest call took."""

    def __init__(self, d: Daemon, timeout: float = 2.0) -> None:
        self.d = d
        self.timeout = timeout
        self.counts: list[int] = []
        self.failures = 0
        self.slowest = 0.0
        self.stop = threading.Event()
        self.progress = threading.Condition()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            t0 = time.monotonic()
            try:
                # the daemon's call_timeout is the call's deadline; this one the socket's
                count = self.d.ctl(
                    "call", timeout=self.timeout + 1, plugin="counter", method="incr", args=None
                )
            except (OSError, ControlError, ValueError):
                self.failures += 1
                self.stop.wait(0.01)  # pacing while no daemon listens, not a sync
                continue
            finally:
                self.slowest = max(self.slowest, time.monotonic() - t0)
            with self.progress:
                self.counts.append(count)
                self.progress.notify_all()

    def wait_for(self, n: int, timeout: float = 20.0) -> None:
        """Until ``n`` more calls have succeeded."""
        with self.progress:
            goal = len(self.counts) + n
            assert self.progress.wait_for(lambda: len(self.counts) >= goal, timeout), (
                f"only {len(self.counts)} of {goal} calls succeeded"
            )

    def __enter__(self) -> Load:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(10)


def _config(mark: str, orphan_timeout: float = 30.0) -> str:
    return daemon_config(
        plugin_block("counter", "testplugins:Counter")
        + plugin_block("echo")
        + plugin_block("other", env={"MARK": mark}),
        orphan_timeout=orphan_timeout,
        call_timeout=2.0,
    )


def _pids(d: Daemon) -> dict[str, int]:
    return {r["plugin"]: r["pid"] for r in d.status()}


def test_kill_9_the_daemon_under_load_and_its_plugins_keep_running() -> None:
    with adopting_parent() as reap, running_daemon(_config("one")) as d:
        before = _pids(d)
        said = d.workdir / "said"
        with Load(d) as load:
            load.wait_for(20)
            d.call(
                "counter",
                "say_later",
                {"text": "said while no daemon ran", "delay": 0.2, "marker": str(said)},
            )
            wait_recorded(d, before)
            d.kill(signal.SIGKILL)
            reap_the_rest(d, before, reap)
            last_before = max(load.counts)
            assert all(alive(pid) for pid in before.values()), "plugins died with the daemon"
            os.kill(before["echo"], signal.SIGKILL)  # dies while no daemon watches it
            assert reap([before["echo"]]) == {before["echo"]: -signal.SIGKILL}
            # the counter printed while no daemon read its output
            wait_in(said.parent, said.exists, f"{said}")
            d.config.write_text(_config("two"))  # and "other" now has another config
            d.start()
            d.wait_until(d.all_ready, what="all plugins ready after the restart")
            load.wait_for(20)
        after = _pids(d)
        assert after["counter"] == before["counter"], "the counter was restarted, not adopted"
        assert after["echo"] != before["echo"]  # lost: started again
        assert after["other"] != before["other"]  # its config changed: replaced
        # its memory survived: the count went on from where the load left it
        assert any(c > last_before for c in load.counts)
        assert len(set(load.counts)) == len(load.counts), "a count came twice: state reset"
        assert d.call("counter", "incr") > max(load.counts)
        assert load.slowest < load.timeout + 1.5, f"a call hung for {load.slowest:.1f}s"
        lines = [x["line"] for x in d.ctl("logs", name="counter", lines=1000)]
        assert "said while no daemon ran" in lines
        events = d.ctl("events", lines=1000)
        adopted = [e for e in events if e["type"] == "plugin:adopted"]
        assert [e["pluginName"] for e in adopted] == ["counter"]
        lost = [e for e in events if e["type"] == "plugin:lost"]
        assert [(e["pluginName"], e["pid"]) for e in lost] == [("echo", before["echo"])]
        killed = [e for e in events if e["type"] == "plugin:not-adopted"]
        assert [(e["pluginName"], e["pid"]) for e in killed] == [("other", before["other"])]
        assert killed[0]["detail"] == "started with another config: killed; starting it again"
        # the adopted worker checks its own health on and tells the new daemon at once
        d.wait_until(lambda: d.row("counter")["health"] == "healthy", timeout=5)
        assert d.row("counter")["state"] == "ready"
        d.stop()  # oskctl shutdown's path: stops adopted plugins too
        exits = reap([before["counter"], before["other"]])
        assert exits[before["counter"]] == 0  # asked to stop, it stopped cleanly
        assert exits[before["other"]] == -signal.SIGKILL  # not adoptable: killed at start


def test_a_plugin_stops_by_itself_when_no_daemon_comes_back() -> None:
    with adopting_parent() as reap, running_daemon(_config("one", orphan_timeout=0.3)) as d:
        before = _pids(d)
        wait_recorded(d, before)
        d.kill(signal.SIGKILL)
        reap_the_rest(d, before, reap)
        exits = reap(list(before.values()))
        assert exits == {pid: 0 for pid in before.values()}, "each ran stop() and exited 0"
        assert (d.runtime / "instances.json").exists()  # what a daemon would have re-adopted
        d.start()  # nothing left to adopt: every instance starts afresh
        d.wait_until(d.all_ready, what="all plugins ready")
        assert not set(_pids(d).values()) & set(before.values())
        lost = {e["pluginName"] for e in d.ctl("events", lines=1000) if e["type"] == "plugin:lost"}
        assert lost == set(before)


def test_a_second_daemon_on_the_same_runtime_dir_is_refused() -> None:
    with running_daemon(_config("one")) as d:
        pids = _pids(d)
        out = subprocess.run(
            [sys.executable, "-m", "osk_daemon.cli", "run", "--config", str(d.config)],
            check=False,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode != 0
        assert "another daemon" in out.stderr and str(d.runtime) in out.stderr
        assert _pids(d) == pids  # the first one's plugins were not touched
        assert d.call("counter", "incr") == 1


def test_oskctl_reexec_restarts_the_daemon_in_place_and_keeps_exact_exit_statuses() -> None:
    with running_daemon(_config("one")) as d:
        assert d.proc is not None
        before = _pids(d)
        assert d.call("counter", "incr") == 1
        reply = d.reexec()
        assert reply["pid"] == d.proc.pid and d.proc.poll() is None  # the same process
        d.wait_until(d.all_ready, what="all plugins ready after the re-exec")
        assert _pids(d) == before
        # the new daemon reads the same heartbeat pages: past heartbeat_timeout (1 s here)
        # the adopted plugins are not taken for hung
        back = time.monotonic()
        (page,) = (d.runtime / "output").glob("counter-0-*.beat")
        d.wait_until(lambda: beat_in(page) > back + 1.5, what="beats past heartbeat_timeout")
        assert _pids(d) == before
        assert d.call("counter", "incr") == 2  # same memory
        events = d.ctl("events", lines=1000)
        assert {e["pluginName"] for e in events if e["type"] == "plugin:adopted"} == set(before)
        # still the daemon's children: a crash's exact status is known
        with pytest.raises(ControlError):
            d.call("counter", "crash", {"code": 7})
        d.wait_until(
            lambda: (
                d.row("counter")["pid"] not in (None, before["counter"])
                and d.row("counter")["state"] == "ready"
            ),
            what="counter restarted",
        )
        assert d.row("counter")["last_exit"] == "exit 7"


def test_a_plugin_loaded_at_run_time_is_readopted_too() -> None:
    with adopting_parent() as reap, running_daemon(_config("one")) as d:
        folder = d.workdir / "tally"
        folder.mkdir()
        (folder / "tally_plugin.py").write_text(
            "from osk_daemon.worker import Plugin, rpc\n\n\n"
            "class Tally(Plugin):\n"
            "    async def start(self) -> None:\n"
            "        self.n = 0\n\n"
            "    @rpc\n"
            "    def incr(self) -> int:\n"
            "        self.n += 1\n"
            "        return self.n\n"
        )
        (folder / "osk-plugin.toml").write_text(
            'name = "tally"\nversion = "0.1.0"\nentry = "tally_plugin:Tally"\n'
        )
        folder.chmod(0o755)
        d.ctl("load", path=str(folder))
        d.wait_until(d.all_ready, what="tally loaded")
        assert d.call("tally", "incr") == 1
        before = _pids(d)
        wait_recorded(d, before)
        d.kill(signal.SIGKILL)
        reap_the_rest(d, before, reap)
        d.start()
        d.wait_until(lambda: d.all_ready() and "tally" in _pids(d), what="tally back")
        assert _pids(d) == before  # every one re-adopted, the loaded one included
        assert d.call("tally", "incr") == 2
        d.stop()
        reap(list(before.values()))


def test_instances_a_swap_renumbered_are_readopted_under_their_numbers() -> None:
    with adopting_parent() as reap, running_daemon(_config("one")) as d:
        d.config.write_text(_config("two"))  # "other" changes: swapped to a new instance
        d.ctl("reload")

        def swapped() -> bool:
            rows = [r for r in d.status() if r["plugin"] == "other"]
            return len(rows) == 1 and rows[0]["instance"] != 0 and rows[0]["state"] == "ready"

        d.wait_until(swapped, what="other swapped")
        before = {(r["plugin"], r["instance"]): r["pid"] for r in d.status()}
        wait_recorded(d, _pids(d))
        d.kill(signal.SIGKILL)
        reap_the_rest(d, _pids_of(before), reap)
        d.start()
        d.wait_until(d.all_ready, what="all ready after the restart")
        assert {(r["plugin"], r["instance"]): r["pid"] for r in d.status()} == before
        d.stop()
        reap(list(before.values()))


def _pids_of(rows: dict[tuple[str, int], int]) -> dict[str, int]:
    return {f"{plugin}/{index}": pid for (plugin, index), pid in rows.items()}


def test_the_runtime_dir_lock_is_held_across_the_reexec_execv(tmp_path: Path) -> None:
    from osk_daemon.daemon import LOCK_FD_ENV, lock_runtime_dir

    lock = lock_runtime_dir(tmp_path)
    os.set_inheritable(lock, True)
    # what the new image does: before its own lock_runtime_dir, another opener is refused
    code = (
        "import fcntl, os, sys\n"
        "from pathlib import Path\n"
        "from osk_daemon.daemon import lock_runtime_dir\n"
        f"other = os.open({str(tmp_path / 'daemon.lock')!r}, os.O_RDWR)\n"
        "try:\n"
        "    fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
        "    print('free')\n"
        "except BlockingIOError:\n"
        "    print('held')\n"
        f"fd = lock_runtime_dir(Path({str(tmp_path)!r}))\n"
        f"print(fd, os.get_inheritable(fd), {LOCK_FD_ENV!r} in os.environ)\n"
    )
    env = {**os.environ, LOCK_FD_ENV: str(lock)}
    try:
        out = subprocess.run(
            [sys.executable, "-c", code],
            env=env,
            pass_fds=[lock],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
    finally:
        os.close(lock)
    assert out.stdout.split() == ["held", str(lock), "False", "False"]
