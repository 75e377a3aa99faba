"""cgroup v1 backend, for legacy hosts and hybrid ones (v1 controllers plus a bare v2 tree).

Why: on v1 each controller is its own hierarchy, mounted on its own (``cpu`` and
``cpuacct`` may or may not be co-mounted), and this process may sit at a different path in
each (on the reference host, memory is nested under ``/process_api/<id>`` while pids is at
``/``). So an instance is a set of directories, one per hierarchy, all named alike.

How: ``open`` creates ``<our dir>/<name>.d`` in each hierarchy that carries memory, pids,
cpu or cpuacct (deduplicated, so a ``cpu,cpuacct`` co-mount is used once), and in the v2
tree when one is mounted: there it gives ``cgroup.kill`` and ``cgroup.events`` (Linux 5.14+)
even with no v2 controllers. Without ``cgroup.kill`` the freezer hierarchy joins the set,
so killing can freeze, SIGKILL every pid listed and thaw. Limits map to
``memory.limit_in_bytes`` (+ ``memory.memsw.limit_in_bytes`` equal to it, so no swap on
top), ``cpu.cfs_period_us``/``cpu.cfs_quota_us`` and ``pids.max``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import NamedTuple

from osk_daemon.errors import CgroupError
from osk_daemon.isolation.cgroupfs import (
    POLL_S,
    HostLayout,
    make_dir,
    read_keyed,
    read_optional,
    remove_tree,
    write_value,
)
from osk_daemon.isolation.cgroups import (
    CPU_PERIOD_US,
    CgroupLimits,
    Cgroups,
    CgroupUsage,
    InstanceCgroup,
    check_name,
    cpu_max,
)

__all__ = ["V1Cgroups", "V1InstanceCgroup"]

_USED = ("memory", "pids", "cpu", "cpuacct")


class V1Cgroups(Cgroups):
    """Instance cgroups across the v1 hierarchies (plus the v2 tree on hybrid hosts)."""

    def __init__(
        self,
        name: str,
        bases: dict[str, Path],
        unified: Path | None,
        has_kill: bool,
        oom_events: bool,
    ) -> None:
        self.name = name
        self.version = "hybrid" if unified is not None else "v1"
        self._bases = bases  # controller -> our <name>.d in its hierarchy
        self._unified = unified  # our <name>.d in the v2 tree, if usable
        self._has_kill = has_kill
        self._oom_events = oom_events
        dirs = sorted(set(bases.values()))
        self.root_paths = [*dirs, *([unified] if unified is not None else [])]

    @classmethod
    def open(cls, name: str, layout: HostLayout) -> V1Cgroups:
        """Create ``<name>.d`` in every hierarchy used; ``CgroupError`` if we may not."""
        bases = {c: layout.v1[c] / f"{name}.d" for c in _USED if c in layout.v1}
        unified: Path | None = None
        has_kill = False
        if layout.unified is not None:
            candidate = layout.unified / f"{name}.d"
            try:
                make_dir(candidate, exist_ok=True)
            except CgroupError:
                pass  # a read-only or foreign v2 tree: hybrid features are just missing
            else:
                unified = candidate
                has_kill = (candidate / "cgroup.kill").exists()
        if not has_kill and "freezer" in layout.v1:
            bases["freezer"] = layout.v1["freezer"] / f"{name}.d"
        try:
            for base in sorted(set(bases.values())):
                make_dir(base, exist_ok=True)
        except CgroupError as exc:
            raise CgroupError(
                f"{exc} (run the daemon as root, or disable cgroups in the config)",
                exc.path,
                exc.errno,
            ) from exc
        oom_control = None
        if "memory" in bases:
            oom_control = read_keyed(bases["memory"] / "memory.oom_control")
        return cls(name, bases, unified, has_kill, "oom_kill" in (oom_control or {}))

    def supports(self) -> dict[str, bool]:
        return {
            "memory": "memory" in self._bases,
            "cpu": "cpu" in self._bases,
            "pids": "pids" in self._bases,
            "kill": self._has_kill or "freezer" in self._bases,
            "oom_events": self._oom_events,
            "peak": "memory" in self._bases,
        }

    def attach(self, instance: str) -> V1InstanceCgroup:
        dirs = {c: base / instance for c, base in self._bases.items()}
        unified = self._unified / instance if self._unified is not None else None
        return V1InstanceCgroup(instance, dirs, unified, self._has_kill)

    def create(self, instance: str, limits: CgroupLimits) -> V1InstanceCgroup:
        check_name(instance)
        limits.check()
        for controller, value in (
            ("memory", limits.memory_max),
            ("cpu", limits.cpu_quota),
            ("pids", limits.pids_max),
        ):
            if value is not None and controller not in self._bases:
                raise CgroupError(
                    f"cgroup {instance}: a {controller} limit was asked for, but no v1 "
                    f"{controller} hierarchy is mounted here"
                )
        cg = self.attach(instance)
        if cg.exists():
            cg.remove()
        made: list[Path] = []
        try:
            for d in cg.dirs:
                make_dir(d)
                made.append(d)
            _write_limits(cg.by_controller, limits)
        except CgroupError:
            deadline = time.monotonic() + 1.0
            for d in reversed(made):
                try:
                    remove_tree(d, deadline)
                except CgroupError:
                    pass  # the original error is the one worth reporting
            raise
        return cg


def _write_limits(dirs: dict[str, Path], limits: CgroupLimits) -> None:
    if limits.memory_max is not None:
        memory = dirs["memory"]
        write_value(memory / "memory.limit_in_bytes", str(limits.memory_max))
        memsw = memory / "memory.memsw.limit_in_bytes"
        if memsw.exists():  # only with swap accounting; must not be below the memory limit
            write_value(memsw, str(limits.memory_max))
    if limits.cpu_quota is not None:
        _write_cpu_max(dirs["cpu"], limits.cpu_quota)
    if limits.pids_max is not None:
        write_value(dirs["pids"] / "pids.max", str(limits.pids_max))


def _write_cpu_max(cpu: Path, cores: float | None) -> None:
    """CFS bandwidth: the quota is lifted first, so that no intermediate quota and period
    pair is refused (a quota may not exceed the period's bounds)."""
    write_value(cpu / "cpu.cfs_quota_us", "-1")
    if cores is None:
        write_value(cpu / "cpu.cfs_period_us", str(CPU_PERIOD_US))
        return
    quota, period = cpu_max(cores)
    write_value(cpu / "cpu.cfs_period_us", str(period))
    write_value(cpu / "cpu.cfs_quota_us", str(quota))


class _UsageFiles(NamedTuple):
    """The files of one instance's v1 cgroups that ``usage`` reads (None: no such one)."""

    cpu: str | None
    cpu_stat: str | None
    pids_events: str | None
    pids: str | None
    memory: str | None
    memory_peak: str | None
    oom: str | None


class V1InstanceCgroup(InstanceCgroup):
    """One instance: a directory per v1 hierarchy, plus one in the v2 tree if mounted."""

    def __init__(
        self, name: str, by_controller: dict[str, Path], unified: Path | None, has_kill: bool
    ) -> None:
        self.by_controller = by_controller
        self._files: _UsageFiles | None = None
        dirs = sorted(set(by_controller.values()))
        if unified is not None:
            dirs.append(unified)
        super().__init__(name, dirs, unified if has_kill else None)

    def _set_frozen(self, frozen: bool, deadline: float) -> bool:
        freezer = self.by_controller.get("freezer")
        if freezer is None or not freezer.is_dir():
            return False
        state = freezer / "freezer.state"
        write_value(state, "FROZEN" if frozen else "THAWED")
        want = "FROZEN" if frozen else "THAWED"
        while (read_optional(state) or want).strip() != want and time.monotonic() < deadline:
            time.sleep(POLL_S)  # FREEZING until every task has stopped
        return True

    def set_cpu_max(self, cores: float | None) -> None:
        cpu = self.by_controller.get("cpu")
        if cpu is None:
            raise CgroupError(f"cgroup {self.name}: no v1 cpu hierarchy is mounted here")
        _write_cpu_max(cpu, cores)

    def _file(self, controller: str, name: str) -> str | None:
        d = self.by_controller.get(controller)
        return str(d / name) if d is not None else None

    def _usage_files(self) -> _UsageFiles:
        """The paths ``usage`` reads (through ``files``, kept open), made once: at 25
        samples a second, building them with pathlib each time was a fifth of an idle
        daemon's sampling."""
        files = self._files
        if files is None:
            f = self._file
            files = self._files = _UsageFiles(
                cpu=f("cpuacct", "cpuacct.usage"),
                cpu_stat=f("cpu", "cpu.stat"),
                pids_events=f("pids", "pids.events"),
                pids=f("pids", "pids.current"),
                memory=f("memory", "memory.usage_in_bytes"),
                memory_peak=f("memory", "memory.max_usage_in_bytes"),
                oom=f("memory", "memory.oom_control"),
            )
        return files

    def oom_kills(self) -> int:
        path = self._usage_files().oom
        if path is None:
            return 0
        return (self.files.read_keyed(path) or {}).get("oom_kill", 0)

    def usage(self) -> CgroupUsage:
        files, kept = self._usage_files(), self.files
        cpu_ns = kept.read_int(files.cpu) if files.cpu is not None else None
        memory = kept.read_int(files.memory) if files.memory is not None else None
        pids = kept.read_int(files.pids) if files.pids is not None else None
        if cpu_ns is None and memory is None and pids is None and not self.exists():
            raise CgroupError(f"cgroup {self.name} does not exist", str(self.dirs[0]))
        cpu_stat = kept.read_keyed(files.cpu_stat) if files.cpu_stat is not None else None
        throttled_ns = cpu_stat.get("throttled_time") if cpu_stat else None
        events = kept.read_keyed(files.pids_events) if files.pids_events is not None else None
        peak = kept.read_int(files.memory_peak) if files.memory_peak is not None else None
        return CgroupUsage(
            memory_current=memory,
            memory_peak=peak,
            cpu_seconds=cpu_ns / 1e9 if cpu_ns is not None else None,
            nr_throttled=cpu_stat.get("nr_throttled") if cpu_stat else None,
            throttled_seconds=throttled_ns / 1e9 if throttled_ns is not None else None,
            oom_kills=self.oom_kills(),
            pids_current=pids,
            pids_max_hits=(events or {}).get("max", 0),
        )
