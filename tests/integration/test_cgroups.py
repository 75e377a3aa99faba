"""Per-instance cgroups against the real kernel: limits, OOM, pids, CPU throttling, kill.

Each test gets its own ``Cgroups`` subtree named after the test process and a counter, so
parallel runs never collide; the ``cgroups`` fixture kills the processes the test started
and removes every cgroup it made, even when the test fails. Children join their cgroup
themselves (they write their own pid into every ``procs_files`` entry), as plugins do.
"""

from __future__ import annotations

import itertools
import json
import os
import select
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from osk_daemon.isolation.cgroup_v1 import V1Cgroups
from osk_daemon.isolation.cgroup_v2 import V2Cgroups
from osk_daemon.isolation.cgroups import (
    CgroupError,
    CgroupLimits,
    Cgroups,
    HostLayout,
    InstanceCgroup,
    parse_mountinfo,
    read_layout,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

MiB = 1 << 20
_counter = itertools.count()

JOIN = """
import json, os, sys
for path in json.loads(sys.argv[1]):
    with open(path, "w") as f:
        f.write(str(os.getpid()))
"""

MEMORY_HOG = """
chunks = []
for _ in range(256):
    chunks.append(b"x" * (1 << 20))
print("allocated", flush=True)
"""

FORK_BOMB = """
r, w = os.pipe()
ok = failed = 0
kids = []
for _ in range(30):
    try:
        pid = os.fork()
    except BlockingIOError:
        failed += 1
        continue
    if pid == 0:
        os.close(w)
        os.read(r, 1)
        os._exit(0)
    ok += 1
    kids.append(pid)
os.close(w)
for pid in kids:
    os.waitpid(pid, 0)
print(json.dumps({"ok": ok, "failed": failed}), flush=True)
"""

SPINNER = """
print("joined", flush=True)
while True:
    pass
"""

# Burns 50 ms of CPU *inside* the cgroup, then says so and keeps spinning. Under a quota of
# 10 ms per 100 ms period that cannot happen without being throttled in at least one period,
# so once the line arrives the counter must show it (no waiting on the clock).
SPIN_PAST_QUOTA = """
from time import process_time
start = process_time()
while process_time() - start < 0.05:
    pass
print("spun", flush=True)
while True:
    pass
"""

TREE = """
import subprocess
kids = [subprocess.Popen([sys.executable, "-c", "import time\\nwhile True: time.sleep(1)"])
        for _ in range(2)]
print(json.dumps([k.pid for k in kids]), flush=True)
import signal
while True:
    signal.pause()
"""

MakeCgroups = Callable[..., Cgroups]
Spawn = Callable[[InstanceCgroup, str], subprocess.Popen[str]]


@pytest.fixture
def make_cgroups() -> Iterator[MakeCgroups]:
    """Detect a fresh subtree per call (or reuse a name); close all of them afterwards."""
    made: list[Cgroups] = []

    def make(name: str | None = None, backend: str = "detect") -> Cgroups:
        if name is None:
            name = f"osktest-{os.getpid()}-{next(_counter)}"
        try:
            cgs = _open(name, backend)
        except CgroupError as exc:
            pytest.skip(f"no usable cgroups on this host: {exc}")
        made.append(cgs)
        return cgs

    try:
        yield make
    finally:
        errors = []
        for cgs in reversed(made):
            try:
                cgs.close()
            except CgroupError as exc:
                errors.append(exc)
        leftovers = [p for cgs in made for p in cgs.root_paths if p.exists()]
        assert not errors and not leftovers, (errors, leftovers)


def _open(name: str, backend: str) -> Cgroups:
    """``detect``, or force a backend: "legacy" = v1 without the v2 tree (freezer kill),
    "unified" = the v2 backend on whatever the v2 tree offers (kill only on hybrid hosts).
    """
    if backend == "detect":
        return Cgroups.detect(name)
    layout = read_layout(
        Path("/proc/self/mountinfo").read_text(), Path("/proc/self/cgroup").read_text()
    )
    if backend == "legacy":
        if "freezer" not in layout.v1 or not layout.v1.keys() & {"memory", "pids", "cpu"}:
            pytest.skip("no v1 freezer and controllers mounted here")
        return V1Cgroups.open(name, HostLayout(None, layout.v1))
    if layout.unified is None:
        pytest.skip("no cgroup2 tree mounted here")
    return V2Cgroups.open(name, layout.unified)


@pytest.fixture
def cgroups(make_cgroups: MakeCgroups) -> Cgroups:
    return make_cgroups()


@pytest.fixture
def spawn() -> Iterator[Spawn]:
    """Start a child that joins ``cg`` itself, then runs ``body``; reaped afterwards."""
    started: list[subprocess.Popen[str]] = []

    def start(cg: InstanceCgroup, body: str) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [sys.executable, "-c", JOIN + body, json.dumps(cg.procs_files)],
            stdout=subprocess.PIPE,
            text=True,
        )
        started.append(proc)
        return proc

    try:
        yield start
    finally:
        for proc in started:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)
            if proc.stdout is not None:
                proc.stdout.close()


def need(cgs: Cgroups, *features: str) -> None:
    have = cgs.supports()
    missing = [f for f in features if not have.get(f)]
    if missing:
        pytest.skip(f"this host's cgroups lack {', '.join(missing)} ({cgs.version})")


def read_line(proc: subprocess.Popen[str], timeout: float = 20.0) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, "child did not report in time"
    return proc.stdout.readline().strip()


def dirs_of(cg: InstanceCgroup) -> list[Path]:
    return [Path(p).parent for p in cg.procs_files]


def find_file(cg: InstanceCgroup, name: str) -> Path | None:
    for d in dirs_of(cg):
        if (d / name).exists():
            return d / name
    return None


# ---- detection -------------------------------------------------------------------------


def test_detect_matches_the_mounts(cgroups: Cgroups) -> None:
    mounts = parse_mountinfo(Path("/proc/self/mountinfo").read_text())
    v1 = {o for m in mounts if m.fstype == "cgroup" for o in m.options}
    has_v2 = any(m.fstype == "cgroup2" for m in mounts)
    if {"memory", "pids", "cpu"} & v1:
        assert cgroups.version == ("hybrid" if has_v2 else "v1")
    else:
        assert cgroups.version == "v2"
    have = cgroups.supports()
    assert set(have) == {"memory", "cpu", "pids", "kill", "oom_events", "peak"}
    need(cgroups, "memory", "cpu", "pids", "kill")
    assert all(p.is_dir() for p in cgroups.root_paths)


def test_layout_parsing_handles_comounts_and_nesting() -> None:
    mountinfo = (
        "31 23 0:28 / /sys/fs/cgroup rw - tmpfs tmpfs rw,mode=755\n"
        "32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n"
        "35 31 0:32 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n"
        "41 31 0:38 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw,nsdelegate\n"
    )
    proc_cgroup = "4:memory:/process_api/abc\n2:cpu,cpuacct:/\n0::/svc\n"
    layout = read_layout(mountinfo, proc_cgroup)
    assert layout.unified == Path("/sys/fs/cgroup/unified/svc")
    assert layout.v1["memory"] == Path("/sys/fs/cgroup/memory/process_api/abc")
    assert layout.v1["cpu"] == layout.v1["cpuacct"] == Path("/sys/fs/cgroup/cpu,cpuacct")
    pure = read_layout("30 1 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n", "0::/a/b\n")
    assert pure.unified == Path("/sys/fs/cgroup/a/b") and not pure.v1


@pytest.mark.parametrize("bad", ["", "Echo", "../x", "a/b", "tasks", "memory.max", "-x"])
def test_unsafe_names_are_refused(cgroups: Cgroups, bad: str) -> None:
    with pytest.raises(CgroupError, match="bad cgroup name"):
        cgroups.create(bad, CgroupLimits())


# ---- limits ----------------------------------------------------------------------------


def _cpu_bandwidth(cgroups: Cgroups, cg: InstanceCgroup) -> list[str]:
    """[quota, period] as the kernel shows them (v1: -1 for none; v2: max)."""
    if cgroups.version == "v2":
        return (cg.dirs[0] / "cpu.max").read_text().split()
    quota, period = find_file(cg, "cpu.cfs_quota_us"), find_file(cg, "cpu.cfs_period_us")
    assert quota is not None and period is not None
    return [quota.read_text().strip(), period.read_text().strip()]


def test_cpu_max_changes_a_live_cgroup_and_lifts_back(cgroups: Cgroups) -> None:
    need(cgroups, "cpu")
    cg = cgroups.create("cpumax-0", CgroupLimits(cpu_quota=0.005))  # under 1 ms per 100 ms
    none = "max" if cgroups.version == "v2" else "-1"
    try:
        assert _cpu_bandwidth(cgroups, cg) == ["1000", "200000"]  # a longer period instead
        cg.set_cpu_max(0.001)  # a start's cap
        assert _cpu_bandwidth(cgroups, cg) == ["1000", "1000000"]
        cg.set_cpu_max(0.5)
        assert _cpu_bandwidth(cgroups, cg) == ["50000", "100000"]
        cg.set_cpu_max(None)
        assert _cpu_bandwidth(cgroups, cg) == [none, "100000"]
    finally:
        cg.remove()


def test_limits_are_written_before_anyone_joins(cgroups: Cgroups) -> None:
    need(cgroups, "memory", "cpu", "pids")
    cg = cgroups.create("limits-0", CgroupLimits(64 * MiB, 0.25, 16))
    assert not cg.populated() and cg.pids() == []
    if cgroups.version == "v2":
        assert (cg.dirs[0] / "memory.max").read_text().strip() == str(64 * MiB)
        assert (cg.dirs[0] / "cpu.max").read_text().split() == ["25000", "100000"]
        swap = cg.dirs[0] / "memory.swap.max"
        assert not swap.exists() or swap.read_text().strip() == "0"
    else:
        memory = find_file(cg, "memory.limit_in_bytes")
        assert memory is not None and memory.read_text().strip() == str(64 * MiB)
        memsw = find_file(cg, "memory.memsw.limit_in_bytes")
        assert memsw is None or memsw.read_text().strip() == str(64 * MiB)
        quota, period = find_file(cg, "cpu.cfs_quota_us"), find_file(cg, "cpu.cfs_period_us")
        assert quota is not None and quota.read_text().strip() == "25000"
        assert period is not None and period.read_text().strip() == "100000"
    pids = find_file(cg, "pids.max")
    assert pids is not None and pids.read_text().strip() == "16"


def test_memory_hog_is_oom_killed_and_counted(cgroups: Cgroups, spawn: Spawn) -> None:
    need(cgroups, "memory", "oom_events")
    cg = cgroups.create("hog-0", CgroupLimits(memory_max=64 * MiB))
    assert cg.oom_kills() == 0
    proc = spawn(cg, MEMORY_HOG)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    assert proc.stdout is not None and "allocated" not in proc.stdout.read()
    assert cg.oom_kills() == 1
    usage = cg.usage()
    assert usage.oom_kills == 1
    if usage.memory_peak is not None:
        assert usage.memory_peak >= 32 * MiB


def test_fork_bomb_stops_at_pids_max(cgroups: Cgroups, spawn: Spawn) -> None:
    need(cgroups, "pids")
    cg = cgroups.create("forks-0", CgroupLimits(pids_max=8))
    proc = spawn(cg, FORK_BOMB)
    result = json.loads(read_line(proc))
    assert proc.wait(timeout=20) == 0
    assert result["ok"] <= 7 and result["failed"] > 0
    assert cg.usage().pids_max_hits > 0
    outside = subprocess.run([sys.executable, "-c", "pass"], timeout=20, check=False)
    assert outside.returncode == 0  # the limit binds the cgroup, not the test process


def test_cpu_spinner_is_throttled(cgroups: Cgroups, spawn: Spawn) -> None:
    need(cgroups, "cpu")
    cg = cgroups.create("spin-0", CgroupLimits(cpu_quota=0.1))
    proc = spawn(cg, SPIN_PAST_QUOTA)
    assert read_line(proc) == "spun"
    usage = cg.usage()
    assert (usage.nr_throttled or 0) > 0, usage
    assert usage.throttled_seconds is None or usage.throttled_seconds > 0
    assert usage.cpu_seconds is None or usage.cpu_seconds > 0
    cg.kill()
    assert proc.wait(timeout=10) == -signal.SIGKILL


# ---- kill, remove, sweep -----------------------------------------------------------------


def test_kill_ends_the_whole_tree(cgroups: Cgroups, spawn: Spawn) -> None:
    need(cgroups, "kill")
    cg = cgroups.create("tree-0", CgroupLimits())
    proc = spawn(cg, TREE)
    grandchildren = json.loads(read_line(proc))
    assert set(cg.pids()) == {proc.pid, *grandchildren}
    assert cg.populated()
    cg.kill()
    assert not cg.populated() and cg.pids() == []
    assert proc.wait(timeout=10) == -signal.SIGKILL
    cg.remove()
    assert not any(d.exists() for d in dirs_of(cg))


def test_remove_kills_first_and_leaves_nothing(cgroups: Cgroups, spawn: Spawn) -> None:
    cg = cgroups.create("rm-0", CgroupLimits())
    proc = spawn(cg, SPINNER)
    assert read_line(proc) == "joined"
    cg.remove()
    assert proc.wait(timeout=10) == -signal.SIGKILL
    assert not any(d.exists() for d in dirs_of(cg))
    cg.remove()  # idempotent


def test_add_moves_a_pid_in_from_the_daemon_side(cgroups: Cgroups) -> None:
    cg = cgroups.create("add-0", CgroupLimits(pids_max=4))
    proc = subprocess.Popen([sys.executable, "-c", "import signal\nwhile True: signal.pause()"])
    try:
        cg.add(proc.pid)
        assert cg.pids() == [proc.pid]
        cg.kill()
        assert proc.wait(timeout=10) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)


def test_sweep_removes_what_a_previous_daemon_left(make_cgroups: MakeCgroups, spawn: Spawn) -> None:
    crashed = make_cgroups()
    left = crashed.create("left-0", CgroupLimits(pids_max=16))
    proc = spawn(left, SPINNER)
    assert read_line(proc) == "joined"
    # The "previous daemon" died without close(); a new one starts with the same name.
    fresh = make_cgroups(crashed.name)
    assert fresh.sweep() == ["left-0"]
    assert proc.wait(timeout=10) == -signal.SIGKILL
    assert not any(d.exists() for d in dirs_of(left))
    assert fresh.sweep() == []


def test_create_replaces_a_leftover_of_the_same_name(cgroups: Cgroups, spawn: Spawn) -> None:
    old = cgroups.create("dup-0", CgroupLimits())
    proc = spawn(old, SPINNER)
    assert read_line(proc) == "joined"
    new = cgroups.create("dup-0", CgroupLimits(pids_max=5))
    assert proc.wait(timeout=10) == -signal.SIGKILL
    assert not new.populated()
    pids = find_file(new, "pids.max")
    assert pids is None or pids.read_text().strip() == "5"


def test_close_removes_the_subtree(make_cgroups: MakeCgroups, spawn: Spawn) -> None:
    cgs = make_cgroups()
    cg = cgs.create("close-0", CgroupLimits())
    proc = spawn(cg, SPINNER)
    assert read_line(proc) == "joined"
    cgs.close()
    assert proc.wait(timeout=10) == -signal.SIGKILL
    assert not any(p.exists() for p in cgs.root_paths)


# ---- the fallbacks, forced ---------------------------------------------------------------


def test_legacy_v1_kill_freezes_and_kills_the_tree(make_cgroups: MakeCgroups, spawn: Spawn) -> None:
    cgs = make_cgroups(backend="legacy")
    assert cgs.version == "v1" and cgs.supports()["kill"]
    cg = cgs.create("tree-0", CgroupLimits(pids_max=16))
    assert any("freezer" in f for f in cg.procs_files)
    proc = spawn(cg, TREE)
    grandchildren = json.loads(read_line(proc))
    assert set(cg.pids()) == {proc.pid, *grandchildren}
    cg.kill()
    assert not cg.populated()
    assert proc.wait(timeout=10) == -signal.SIGKILL
    cg.remove()
    assert not any(d.exists() for d in dirs_of(cg))


def test_v2_backend_kills_and_reads_on_the_unified_tree(
    make_cgroups: MakeCgroups, spawn: Spawn
) -> None:
    cgs = make_cgroups(backend="unified")
    assert cgs.version == "v2"
    need(cgs, "kill")
    have = cgs.supports()
    if not have["memory"]:
        with pytest.raises(CgroupError, match="not delegated"):
            cgs.create("nomem-0", CgroupLimits(memory_max=64 * MiB))
    cg = cgs.create("tree-0", CgroupLimits())
    assert len(cg.procs_files) == 1
    proc = spawn(cg, TREE)
    grandchildren = json.loads(read_line(proc))
    assert set(cg.pids()) == {proc.pid, *grandchildren}
    usage = cg.usage()
    assert usage.cpu_seconds is not None and usage.cpu_seconds > 0
    cg.kill()
    assert not cg.populated()
    assert proc.wait(timeout=10) == -signal.SIGKILL
    assert cgs.sweep() == ["tree-0"]
    assert not any(d.exists() for d in dirs_of(cg))
