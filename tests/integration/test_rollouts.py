"""Version swaps on a real daemon under real load: no failed call, state carried, rollback.

A load thread calls the plugin non-stop through the broker's client socket (the external
client API) and counts every failure; the swap is driven through the control socket, and
its end is awaited on the daemon's event stream.
"""

from __future__ import annotations

import contextlib
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from osk_daemon.errors import OskError
from osk_daemon.ipc.client import Client
from tests.integration.harness import ControlError, Daemon, daemon_config, running_daemon

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

COUNTER = """
import asyncio
import os
import time

from osk_daemon.worker import Plugin, rpc

VERSION = "{version}"
BROKEN = {broken}
CRASH_AFTER = {crash_after}  # seconds after start(): the process exits with 3
HEALTH = "{health}"


def spin(ms):  # burn this much CPU time
    begin = time.process_time()
    while time.process_time() - begin < ms / 1000:
        pass


class Counter(Plugin):
    def __init__(self, ctx) -> None:
        super().__init__(ctx)
        spin(ctx.config.get("init_spin_ms", 0))  # before a hand-over

    async def start(self) -> None:
        self.count = getattr(self, "count", 0)
        spin(self.ctx.config.get("start_spin_ms", 0))  # after a hand-over, blocking the loop
        if CRASH_AFTER is not None:
            asyncio.get_running_loop().call_later(CRASH_AFTER, os._exit, 3)
        await asyncio.to_thread(spin, self.ctx.config.get("start_work_ms", 0))  # not blocking

    @rpc
    def incr(self) -> dict:
        if BROKEN:
            raise RuntimeError("this version is broken")
        self.count += 1
        return {{"count": self.count, "version": VERSION}}

    @rpc
    def get(self) -> dict:
        return {{"count": self.count, "version": VERSION}}

    async def health(self):
        return HEALTH

    async def export_state(self) -> dict:
        return {{"count": self.count}}

    async def import_state(self, state) -> None:
        self.count = state["count"]
"""


def install_counter(
    root: Path,
    version: str,
    broken: bool = False,
    crash_after: float | None = None,
    health: str = "healthy",
) -> None:
    folder = root / "counter" / version
    folder.mkdir(parents=True)
    source = COUNTER.format(version=version, broken=broken, crash_after=crash_after, health=health)
    (folder / "counter_plugin.py").write_text(source)
    (folder / "osk-plugin.toml").write_text(
        f'name = "counter"\nversion = "{version}"\nentry = "counter_plugin:Counter"\n'
    )


@pytest.fixture
def installed(tmp_path: Path) -> Path:
    root = tmp_path / "installed"
    install_counter(root, "1.0.0")
    install_counter(root, "2.0.0")
    install_counter(root, "3.0.0", broken=True)
    install_counter(root, "4.0.0", crash_after=0.3)
    install_counter(root, "5.0.0", health="degraded")
    root.chmod(0o755)
    return root


class Load:
    """Calls ``counter.incr`` in a loop from a thread until stopped; counts what failed."""

    def __init__(self, d: Daemon) -> None:
        self.endpoint = f"ipc://{d.runtime / 'broker.sock'}"
        self.ok = 0
        self.failed: list[str] = []
        self.versions: set[str] = set()
        self.last: dict[str, Any] = {}
        self.replies: list[tuple[str, int]] = []  # (version, count), in order
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with Client(self.endpoint) as client:
            deadline = time.monotonic() + 90  # bounded even if the test forgets to stop it
            while not self._stop.is_set() and time.monotonic() < deadline:
                try:
                    self.last = client.call("counter", "incr", timeout=5.0)
                    self.replies.append((self.last["version"], self.last["count"]))
                    self.ok += 1
                    self.versions.add(self.last["version"])
                except OskError as exc:
                    self.failed.append(f"{type(exc).__name__}: {exc}")

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)


def rollout_ended(d: Daemon) -> dict[str, Any] | None:
    rows = d.ctl("rollout", action="status")
    done = [r for r in rows if r["state"] in ("succeeded", "rolled-back")]
    return done[0] if done else None


def config(installed: Path, instances: int = 1, rollout: str = "") -> str:
    body = f"""
        [plugins.counter]
        version = "1.0.0"
        instances = {instances}
        [plugins.counter.health_check]
        interval = 0.2
        timeout = 0.2
        [plugins.counter.rollout]
        drain_timeout = 5.0
        {rollout}
        """
    return daemon_config(body, plugins_dir=str(installed))


# a short analysis that judges errors, not latency: a new instance's first 0.3 s on a
# loaded 2-core CI machine can be a few ms slower (tests/unit/test_rollout_traffic judges
# latency, test_a_bad_canary_is_rolled_back_by_itself errors)
QUICK_ANALYSIS = (
    "analysis_window = 0.3\nmin_requests = 5\nsteps = [25, 50, 100]\nmax_latency_ratio = 100"
)


@pytest.mark.parametrize(
    ("strategy", "instances"),
    [("rolling", 1), ("rolling", 3), ("blue-green", 2), ("canary", 2), ("ab", 2)],
)
def test_a_swap_under_load_fails_no_call_and_carries_state(
    installed: Path, strategy: str, instances: int
) -> None:
    with running_daemon(config(installed, instances, QUICK_ANALYSIS)) as d, Load(d) as load:
        d.wait_until(lambda: load.ok >= 300, what="load flowing")
        before_deploy = load.ok
        d.ctl("deploy", plugin="counter", version="^2", strategy=strategy)
        if strategy == "ab":  # both versions serve until the operator promotes
            d.wait_until(
                lambda: d.ctl("rollout", action="status", plugin="counter")["state"] == "serving",
                what="A/B serving",
            )
            mark = load.ok
            d.wait_until(lambda: load.ok >= mark + 100, what="calls to both versions")
            assert {"1.0.0", "2.0.0"} <= load.versions
            d.ctl("rollout", action="promote", plugin="counter")
        done = d.wait_until(lambda: rollout_ended(d), timeout=60, what="rollout ended")
        assert done["state"] == "succeeded", done
        before = load.ok
        d.wait_until(lambda: load.ok >= before + 50, what="load after the swap")
        assert load.failed == []
        rows = d.status("counter")
        assert {r["version"] for r in rows} == {"2.0.0"}
        assert len(rows) == instances
        assert load.last["version"] == "2.0.0"
        if strategy == "blue-green":  # one cut-over: no call reached 2.0.0 before it
            served = [v for v, _ in load.replies[before_deploy:]]
            assert "1.0.0" not in served[served.index("2.0.0") :]
        if instances == 1:
            # one instance: its count went on from where 1.0.0 handed it over; only the
            # calls 1.0.0 answered between the export and the cut-over are not in it,
            # far fewer than it answered during the new instance's whole (capped) start
            replies = load.replies[before_deploy:]
            imported = min(c for v, c in replies if v == "2.0.0") - 1
            old = [c for v, c in replies if v == "1.0.0"]
            assert imported >= before_deploy
            assert max(old) - imported < len(old) / 2, (max(old) - imported, len(old))
        # and back again, the same way
        d.ctl("rollout", action="rollback", plugin="counter")
        d.wait_until(
            lambda: {r["version"] for r in d.status("counter")} == {"1.0.0"},
            timeout=60,
            what="rolled back to 1.0.0",
        )
    assert load.failed == []
    assert {"1.0.0", "2.0.0"} <= load.versions


def test_disk_state_survives_a_restart(installed: Path) -> None:
    body = config(installed).replace(
        "[plugins.counter.health_check]", 'state_strategy = "disk"\n[plugins.counter.health_check]'
    )
    with running_daemon(body) as d:
        for _ in range(7):
            d.call("counter", "incr")
        pid = d.row("counter")["pid"]
        d.ctl("restart", name="counter")  # a graceful stop saves, the next start loads
        assert d.row("counter")["pid"] != pid
        assert d.call("counter", "get")["count"] == 7
        saved = list((d.workdir / "state" / "counter").glob("state-*.msgpack"))
        assert [p.name for p in saved] == ["state-0.msgpack"]


def test_a_bad_canary_is_rolled_back_by_itself(installed: Path) -> None:
    rollout = "analysis_window = 0.5\nmin_requests = 5\nsteps = [50, 100]"
    with running_daemon(config(installed, 2, rollout)) as d, Load(d) as load:
        d.wait_until(lambda: load.ok >= 20, what="load flowing")
        d.ctl("deploy", plugin="counter", version="3.0.0", strategy="canary")
        done = d.wait_until(lambda: rollout_ended(d), timeout=60, what="rollout ended")
        assert done["state"] == "rolled-back"
        assert "analysis failed: error rate" in done["reason"]
        events = [e for e in d.ctl("events", lines=1000) if e["type"] == "rollout:rolled-back"]
        assert events and "error rate" in events[0]["reason"]
        assert {r["version"] for r in d.status("counter")} == {"1.0.0"}
        failed_before = len(load.failed)
        before = load.ok
        d.wait_until(lambda: load.ok >= before + 30, what="load after the rollback")
        assert len(load.failed) == failed_before  # once rolled back, nothing fails


def test_a_canary_less_healthy_than_the_stable_version_is_rolled_back(installed: Path) -> None:
    # 5.0.0 answers every call, as fast, but says it is degraded
    with running_daemon(config(installed, 2, QUICK_ANALYSIS)) as d, Load(d) as load:
        d.wait_until(lambda: load.ok >= 20, what="load flowing")
        d.ctl("deploy", plugin="counter", version="5.0.0", strategy="canary")
        done = d.wait_until(lambda: rollout_ended(d), timeout=60, what="rollout ended")
        assert done["state"] == "rolled-back", done
        assert "analysis failed: health: counter/" in done["reason"]
        assert "is degraded (stable: healthy)" in done["reason"]
        assert {r["version"] for r in d.status("counter")} == {"1.0.0"}
    assert load.failed == []


def test_rollout_commands_are_safe_and_explained(installed: Path) -> None:
    with running_daemon(config(installed)) as d:
        with pytest.raises(ControlError, match="no rollout of 'counter'"):
            d.ctl("rollout", action="pause", plugin="counter")
        with pytest.raises(
            ControlError, match=re.escape("no installed version of 'counter' fits ^9")
        ):
            d.ctl("deploy", plugin="counter", version="^9")
        with pytest.raises(ControlError, match=re.escape("already runs 1.0.0")):
            d.ctl("deploy", plugin="counter", version="1.0.0")
        status = d.ctl("deploy", plugin="counter", version="2.0.0", strategy="ab", follow=False)
        assert status["strategy"] == "ab"
        d.wait_until(
            lambda: d.ctl("rollout", action="status", plugin="counter")["state"] == "serving",
            what="A/B serving both",
        )
        pinned = {d.call("counter", "get", timeout=5.0)["version"] for _ in range(10)}
        assert pinned <= {"1.0.0", "2.0.0"}
        v2 = d.ctl("call", plugin="counter", method="get", version="2.0.0", timeout=5.0)
        assert v2["version"] == "2.0.0"
        with pytest.raises(ControlError, match=re.escape("runs no version 9.9.9")):
            d.ctl("call", plugin="counter", method="get", version="9.9.9", timeout=5.0)
        with pytest.raises(ControlError, match="is serving; abort or promote it first"):
            d.ctl("deploy", plugin="counter", version="3.0.0")
        d.ctl("rollout", action="pause", plugin="counter")
        d.ctl("rollout", action="pause", plugin="counter")  # twice: a no-op
        d.ctl("rollout", action="promote", plugin="counter")
        done = d.wait_until(lambda: rollout_ended(d), timeout=60, what="promoted")
        assert done["state"] == "succeeded"
        with contextlib.suppress(ControlError):
            d.ctl("rollout", action="abort", plugin="counter")
        with pytest.raises(ControlError, match=re.escape("succeeded; deploy 1.0.0 to go back")):
            d.ctl("rollout", action="promote", plugin="counter")
        assert {r["version"] for r in d.status("counter")} == {"2.0.0"}


def _cpu_bandwidth(pid: int) -> tuple[str, str, str] | None:
    """(cgroup path, quota, period) of ``pid``'s CPU bandwidth: v1 ``cpu.cfs_*``, else v2
    ``cpu.max``; None if its cgroup has no cpu controller."""
    mounts = [line.split() for line in Path("/proc/mounts").read_text().splitlines()]
    lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "cpu" in controllers.split(","):
            for _, where, kind, options, *_ in mounts:
                if kind == "cgroup" and "cpu" in options.split(","):
                    d = Path(where) / path.lstrip("/")
                    quota = (d / "cpu.cfs_quota_us").read_text().strip()
                    return path, quota, (d / "cpu.cfs_period_us").read_text().strip()
    for line in lines:
        if line.startswith("0::"):
            for _, where, kind, *_ in mounts:
                cpu_max = Path(where) / line[3:].lstrip("/") / "cpu.max"
                if kind == "cgroup2" and cpu_max.exists():
                    quota, period = cpu_max.read_text().split()
                    return line[3:], quota, period
    return None


def test_start_cpu_caps_a_new_instance_until_ready_or_its_time_is_up(installed: Path) -> None:
    # 50 ms of CPU a second against a start() that burns 250 ms: the new instance is
    # capped until start_cpu_for ends, then starts at full speed. Its start() blocks its
    # event loop for seconds of the cap, past the 1 s heartbeat timeout: a capped start
    # is not taken for a hung one (the daemon withholds its CPU)
    # (no state to hand over: a hand-over would lift the cap before start())
    cap = "start_cpu = 0.05\nstart_cpu_for = 3.0\n[plugins.counter.config]\nstart_spin_ms = 250"
    body = config(installed, 1, cap).replace(
        "[plugins.counter.health_check]", "preserve_state = false\n[plugins.counter.health_check]"
    )
    with running_daemon(body) as d:
        old = d.status("counter")[0]
        first = _cpu_bandwidth(old["pid"])
        if first is None or "counter" not in first[0]:
            pytest.skip("the plugins' cgroups have no cpu controller here")
        assert first[1] in ("-1", "max")  # nothing else served at its start: no cap
        d.ctl("deploy", plugin="counter", version="^2", strategy="rolling")

        def new_in_its_cgroup() -> tuple[int, tuple[str, str, str]] | None:
            for row in d.status("counter"):
                if row["version"] == "2.0.0" and row["pid"]:
                    found = _cpu_bandwidth(row["pid"])
                    if found is not None and "counter" in found[0]:
                        return row["pid"], found
            return None

        pid, (_, quota, period) = d.wait_until(new_in_its_cgroup, what="the new instance")
        assert (quota, period) == ("5000", "100000")
        done = d.wait_until(lambda: rollout_ended(d), timeout=60, what="rollout ended")
        assert done["state"] == "succeeded", done  # the cap ended by its time, not a timeout
        [row] = d.status("counter")
        assert row["pid"] == pid and row["version"] == "2.0.0"
        lifted = _cpu_bandwidth(pid)
        assert lifted is not None and lifted[1] in ("-1", "max")


def test_the_state_is_handed_over_when_the_new_instance_is_ready_for_it(installed: Path) -> None:
    # the new instance's __init__ burns 100 ms of CPU under a 0.05-core start cap (~2 s)
    # and its start() 1 s after the hand-over (in a thread: its loop still beats). The
    # state is asked for between the two: the cap is lifted then (start() runs at full
    # speed), and the state lacks only the calls answered after it, not those of the
    # whole capped start
    cap = (
        "start_cpu = 0.05\nstart_cpu_for = 60.0\n"
        "[plugins.counter.config]\ninit_spin_ms = 100\nstart_work_ms = 1000"
    )
    with running_daemon(config(installed, 1, cap)) as d, Load(d) as load:
        d.wait_until(lambda: load.ok >= 100, what="load flowing")
        if _cpu_bandwidth(d.status("counter")[0]["pid"]) is None:
            pytest.skip("the plugins' cgroups have no cpu controller here")
        d.ctl("deploy", plugin="counter", version="^2", strategy="rolling")

        def handed_over() -> dict[str, Any] | None:
            events = d.ctl("events", lines=1000)
            return next((e for e in events if e["type"] == "rollout:handed-over"), None)

        event = d.wait_until(handed_over, what="the hand-over")
        [new] = [r for r in d.status("counter") if r["version"] == "2.0.0"]
        quota = _cpu_bandwidth(new["pid"])
        still_starting = d.status("counter")
        assert event["source"] == "1.0.0" and event["instance"] == new["instance"]
        assert event["bytes"] > 0 and "detail" not in event
        assert quota is not None and quota[1] in ("-1", "max")  # lifted at the hand-over,
        assert any(r["state"] != "ready" for r in still_starting if r["version"] == "2.0.0")
        done = d.wait_until(lambda: rollout_ended(d), timeout=60, what="rollout ended")
        assert done["state"] == "succeeded", done
        d.wait_until(lambda: load.last.get("version") == "2.0.0", what="calls to 2.0.0")
    replies = load.replies
    old_after_deploy = [c for v, c in replies if v == "1.0.0"]
    imported = min(c for v, c in replies if v == "2.0.0") - 1
    lost = max(old_after_deploy) - imported
    answered_while_capped = sum(1 for v, c in replies if v == "1.0.0" and c > 100)
    assert imported > 0 and load.failed == []
    # handed over before start(), after __init__: the state lacks only the calls 1.0.0
    # answered during start() (1 s of CPU), far fewer than during the ~2 s capped start
    assert lost < answered_while_capped / 2, (lost, answered_while_capped)


def test_min_ready_keeps_the_old_instance_until_the_new_one_has_lasted(installed: Path) -> None:
    # 4.0.0 is ready, then exits 0.3 s later: without min_ready the old instance would be
    # gone by then, and the plugin left crash-looping on 4.0.0
    with running_daemon(config(installed, 1, "min_ready = 2.0")) as d:
        [old] = d.status("counter")
        d.ctl("deploy", plugin="counter", version="4.0.0", strategy="rolling")
        done = d.wait_until(lambda: rollout_ended(d), timeout=60, what="rollout ended")
        assert done["state"] == "rolled-back", done
        assert "exit 3" in done["reason"], done
        [row] = d.status("counter")
        assert (row["pid"], row["version"]) == (old["pid"], "1.0.0")  # never retired
        # a version that lasts is kept waiting until it has been ready for min_ready
        d.ctl("deploy", plugin="counter", version="2.0.0", strategy="rolling")
        done = d.wait_until(lambda: rollout_ended(d), timeout=60, what="rollout ended")
        assert done["state"] == "succeeded", done
        events = d.ctl("events", lines=1000)
        started = [
            e["timestamp"]
            for e in events
            if e["type"] == "plugin:started" and str(e.get("version")) == "2.0.0"
        ]
        drained = [e["timestamp"] for e in events if e["type"] == "rollout:drained"]
        assert started and drained and drained[-1] - started[-1] >= 1999  # ms, truncated


@pytest.mark.parametrize("unavailable", [0, 1])
def test_each_new_instance_takes_over_the_state_of_the_one_it_replaces(
    installed: Path, unavailable: int
) -> None:
    # two instances with two counts: a swap hands over both (not one of them twice), and
    # with the disk strategy the state files stay theirs across a daemon restart. With
    # max_unavailable = 1 an old instance is stopped as its replacement starts: it hands
    # its state over as it goes
    body = config(installed, 2, f"max_unavailable = {unavailable}").replace(
        "[plugins.counter.health_check]", 'state_strategy = "disk"\n[plugins.counter.health_check]'
    )
    with running_daemon(body) as d:
        endpoint = f"ipc://{d.runtime / 'broker.sock'}"

        def counts() -> list[int]:
            with Client(endpoint) as c:
                rows = d.status("counter")
                return sorted(
                    c.call("counter", "get", instance=r["instance"])["count"] for r in rows
                )

        with Client(endpoint) as c:
            for instance, calls in ((0, 3), (1, 7)):
                for _ in range(calls):
                    assert c.call("counter", "incr", instance=instance)["version"] == "1.0.0"
        assert counts() == [3, 7]
        d.ctl("deploy", plugin="counter", version="^2", strategy="rolling")
        done = d.wait_until(lambda: rollout_ended(d), timeout=60, what="rollout ended")
        assert done["state"] == "succeeded", done
        assert {r["version"] for r in d.status("counter")} == {"2.0.0"}
        assert counts() == [3, 7]
        handed = [e for e in d.ctl("events", lines=1000) if e["type"] == "rollout:handed-over"]
        assert sorted(e["donor"] for e in handed) == [0, 1]
        assert all(e["bytes"] > 0 for e in handed)
        d.stop()  # a graceful stop saves each state; the new daemon's instances 0 and 1
        d.start()  # read the files the swapped instances kept, not their donors' older ones
        d.wait_until(d.all_ready, what="all ready again")
        assert counts() == [3, 7]
        saved = sorted(p.name for p in (d.workdir / "state" / "counter").glob("state-*"))
        assert saved == ["state-0.msgpack", "state-1.msgpack"]


def test_rollout_status_follows_a_rollout_someone_else_started(installed: Path) -> None:
    with running_daemon(config(installed, 2)) as d:
        d.ctl("deploy", plugin="counter", version="2.0.0", strategy="ab")
        d.wait_until(
            lambda: d.ctl("rollout", action="status", plugin="counter")["state"] == "serving",
            what="A/B serving",
        )
        cmd = [sys.executable, "-m", "osk_daemon.control.oskctl", "--socket", str(d.socket)]
        with subprocess.Popen(
            [*cmd, "rollout", "status", "counter", "-f"], stdout=subprocess.PIPE, text=True
        ) as proc:
            try:
                assert proc.stdout is not None
                first = proc.stdout.readline()  # the status at once, then live
                assert "counter 1.0.0 -> 2.0.0 (ab): serving" in first, first
                d.ctl("rollout", action="promote", plugin="counter")
                rest, _ = proc.communicate(timeout=60)
            finally:
                if proc.poll() is None:
                    proc.kill()
        assert proc.returncode == 0
        assert "succeeded: version=2.0.0" in rest, rest
        with pytest.raises(subprocess.CalledProcessError):  # -f without a plugin: usage
            subprocess.run([*cmd, "rollout", "status", "-f"], check=True, capture_output=True)


def test_deploy_takes_the_rollouts_settings_and_refuses_bad_ones(installed: Path) -> None:
    with running_daemon(config(installed, 2)) as d:
        with pytest.raises(ControlError, match="cannot both be 0"):
            d.ctl("deploy", plugin="counter", version="2.0.0", max_surge=0, max_unavailable=0)
        with pytest.raises(ControlError, match="min_ready must be seconds >= 0"):
            d.ctl("deploy", plugin="counter", version="2.0.0", min_ready=-1)
        assert d.ctl("rollout", action="status") == []  # nothing started
        d.ctl("deploy", plugin="counter", version="2.0.0", strategy="ab", ab_split=30)
        d.wait_until(
            lambda: d.ctl("rollout", action="status", plugin="counter")["state"] == "serving",
            what="A/B serving",
        )
        assert d.ctl("rollout", action="status", plugin="counter")["weights"] == [70, 30]
        d.ctl("rollout", action="abort", plugin="counter")
        d.wait_until(lambda: rollout_ended(d), timeout=60, what="aborted")
