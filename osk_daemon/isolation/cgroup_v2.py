"""cgroup v2 backend, for unified hosts (systemd with ``Delegate=yes`` on our unit).

Why: on a unified host one directory per instance carries every controller, and the kernel
gives ``cgroup.kill``, ``cgroup.events`` and ``memory.events`` for race-free killing and
OOM accounting. But v2 has the "no internal processes" rule: a non-root cgroup that hands
controllers to its children (``cgroup.subtree_control``) may hold no processes itself.

How: ``open`` starts from our own cgroup, the *unit* (or its parent, if we already sit in
our ``<name>.daemon`` leaf from an earlier ``open``). It enables memory, pids and cpu in the
unit's ``cgroup.subtree_control``; if the kernel answers EBUSY because processes sit in the
unit, every process there (under ``Delegate=yes`` they are all ours) is moved into the
leaf ``<unit>/<name>.daemon`` first, as systemd's delegation document and container
runtimes do. Then ``<unit>/<name>.d`` is created with the same controllers enabled, and each
instance is ``<unit>/<name>.d/<instance>``::

    <unit>/                   subtree_control: +memory +pids +cpu   (no processes)
      <name>.daemon/          the daemon (and whatever else ran in the unit)
      <name>.d/               subtree_control: +memory +pids +cpu
        <instance>/           memory.max, memory.swap.max=0, cpu.max, pids.max

Controllers the unit's parent did not delegate are simply unsupported (``supports``), and
``create`` refuses limits that need them. ``close`` undoes the move when we made it and
nothing else lives in the unit. Written from Documentation/admin-guide/cgroup-v2.rst and
systemd's CGROUP_DELEGATION.md; this reference host is hybrid, so only ``cgroup.kill``,
``cgroup.freeze`` and ``cgroup.events`` were exercised here.
"""

from __future__ import annotations

import errno
import time
from pathlib import Path

from osk_daemon.errors import CgroupError
from osk_daemon.isolation.cgroupfs import (
    POLL_S,
    children,
    make_dir,
    read_keyed,
    read_text,
    remove_tree,
    write_value,
)
from osk_daemon.isolation.cgroups import (
    CPU_PERIOD_US,
    RMDIR_TIMEOUT_S,
    WANTED,
    CgroupLimits,
    Cgroups,
    CgroupUsage,
    InstanceCgroup,
    check_name,
    cpu_max,
)

__all__ = ["V2Cgroups", "V2InstanceCgroup"]

_MOVE_ROUNDS = 20  # processes may fork while being moved; stop when no progress is made


def _controllers(path: Path, file: str) -> set[str]:
    return set(read_text(path / file).split())


def _enable(path: Path, controllers: set[str]) -> None:
    if controllers:
        write_value(path / "cgroup.subtree_control", " ".join(f"+{c}" for c in sorted(controllers)))


def move_all(src: Path, dst: Path) -> None:
    """Move every process in ``src`` to ``dst``; unmovable ones (kernel threads) stay."""
    stuck: set[int] = set()
    for _ in range(_MOVE_ROUNDS):
        pids = [int(p) for p in read_text(src / "cgroup.procs").split()]
        todo = [p for p in pids if p not in stuck]
        if not todo:
            return
        for pid in todo:
            try:
                write_value(dst / "cgroup.procs", str(pid))
            except CgroupError as exc:
                if exc.errno == errno.ESRCH:
                    continue  # exited meanwhile
                if exc.errno == errno.EINVAL:
                    stuck.add(pid)  # a kernel thread cannot be moved
                    continue
                raise


class V2Cgroups(Cgroups):
    """Instance cgroups in one unified hierarchy."""

    version = "v2"

    def __init__(
        self, name: str, unit: Path, base: Path, moved_to: Path | None, enabled: set[str]
    ) -> None:
        self.name = name
        self.root_paths = [base]
        self._unit = unit
        self._base = base
        self._moved_to = moved_to  # our leaf, if this object moved processes into it
        self._enabled_by_us = enabled  # controllers this object enabled in the unit
        self._available = _controllers(base, "cgroup.subtree_control") & set(WANTED)
        self._has_kill = (base / "cgroup.kill").exists()
        self._has_freeze = (base / "cgroup.freeze").exists()
        self._has_peak = (base / "memory.peak").exists()

    @classmethod
    def open(cls, name: str, own: Path) -> V2Cgroups:
        """Enable the controllers below our cgroup and create ``<name>.d``.

        Raises ``CgroupError`` if the hierarchy is not writable for us (not root and no
        delegation) or the controllers cannot be enabled.
        """
        leaf_name = f"{name}.daemon"
        unit = own.parent if own.name == leaf_name else own
        leaf = unit / leaf_name
        try:
            offered = _controllers(unit, "cgroup.controllers") & set(WANTED)
            need = offered - _controllers(unit, "cgroup.subtree_control")
            moved_to: Path | None = None
            try:
                _enable(unit, need)
            except CgroupError as exc:
                if exc.errno != errno.EBUSY:
                    raise
                make_dir(leaf, exist_ok=True)
                move_all(unit, leaf)
                moved_to = leaf
                _enable(unit, need)
            base = unit / f"{name}.d"
            make_dir(base, exist_ok=True)
            _enable(base, offered - _controllers(base, "cgroup.subtree_control"))
        except CgroupError as exc:
            raise CgroupError(
                f"{exc} (the daemon needs root or a delegated cgroup: systemd Delegate=yes)",
                exc.path,
                exc.errno,
            ) from exc
        return cls(name, unit, base, moved_to, need)

    def supports(self) -> dict[str, bool]:
        return {
            "memory": "memory" in self._available,
            "cpu": "cpu" in self._available,
            "pids": "pids" in self._available,
            "kill": self._has_kill or self._has_freeze,
            "oom_events": "memory" in self._available,
            "peak": self._has_peak,
        }

    def attach(self, instance: str) -> V2InstanceCgroup:
        return V2InstanceCgroup(instance, self._base / instance, self._has_kill)

    def create(self, instance: str, limits: CgroupLimits) -> V2InstanceCgroup:
        check_name(instance)
        limits.check()
        for controller, value in (
            ("memory", limits.memory_max),
            ("cpu", limits.cpu_quota),
            ("pids", limits.pids_max),
        ):
            if value is not None and controller not in self._available:
                raise CgroupError(
                    f"cgroup {instance}: a {controller} limit was asked for, but the "
                    f"{controller} controller is not delegated to {self._unit} "
                    "(systemd: Delegate=yes, or Delegate=memory pids cpu)"
                )
        cg = self.attach(instance)
        if cg.exists():
            cg.remove()
        make_dir(cg.path)
        try:
            _write_limits(cg.path, limits)
        except CgroupError:
            try:
                remove_tree(cg.path, time.monotonic() + 1.0)
            except CgroupError:
                pass  # the original error is the one worth reporting
            raise
        return cg

    def close(self) -> None:
        super().close()
        if self._moved_to is not None:
            self._restore(self._moved_to)

    def _restore(self, leaf: Path) -> None:
        """Best effort: put the unit back as we found it, unless others now use it."""
        if children(self._unit) != [leaf.name]:
            return
        try:
            if self._enabled_by_us:
                write_value(
                    self._unit / "cgroup.subtree_control",
                    " ".join(f"-{c}" for c in sorted(self._enabled_by_us)),
                )
            move_all(leaf, self._unit)
            remove_tree(leaf, time.monotonic() + RMDIR_TIMEOUT_S)
        except CgroupError:
            pass  # leaving the daemon in its leaf is harmless
        self._moved_to = None


def _write_limits(path: Path, limits: CgroupLimits) -> None:
    if limits.memory_max is not None:
        write_value(path / "memory.max", str(limits.memory_max))
        swap = path / "memory.swap.max"
        if swap.exists():  # only with swap accounting compiled in and enabled
            write_value(swap, "0")
    if limits.cpu_quota is not None:
        _write_cpu_max(path, limits.cpu_quota)
    if limits.pids_max is not None:
        write_value(path / "pids.max", str(limits.pids_max))


def _write_cpu_max(path: Path, cores: float | None) -> None:
    quota, period = cpu_max(cores) if cores is not None else ("max", CPU_PERIOD_US)
    write_value(path / "cpu.max", f"{quota} {period}")


class V2InstanceCgroup(InstanceCgroup):
    """One instance: one directory with every controller."""

    def __init__(self, name: str, path: Path, has_kill: bool) -> None:
        self.path = path
        super().__init__(name, [path], path if has_kill else None)
        self._paths: dict[str, str] = {}

    def set_cpu_max(self, cores: float | None) -> None:
        if not (self.path / "cpu.max").exists():
            raise CgroupError(f"cgroup {self.name}: the cpu controller is not enabled for it")
        _write_cpu_max(self.path, cores)

    def _set_frozen(self, frozen: bool, deadline: float) -> bool:
        freeze = self.path / "cgroup.freeze"
        if not freeze.exists():
            return False
        write_value(freeze, "1" if frozen else "0")
        while time.monotonic() < deadline:
            events = read_keyed(self.path / "cgroup.events") or {}
            if events.get("frozen", 0) == int(frozen):
                break
            time.sleep(POLL_S)
        return True

    def oom_kills(self) -> int:
        return (self.files.read_keyed(self._at("memory.events")) or {}).get("oom_kill", 0)

    def _at(self, name: str) -> str:
        """The path of this cgroup's file ``name``, made once (usage sampling reads six
        files 25 times a second; pathlib each time was a fifth of that)."""
        path = self._paths.get(name)
        if path is None:
            path = self._paths[name] = str(self.path / name)
        return path

    def usage(self) -> CgroupUsage:
        at, kept = self._at, self.files
        cpu_stat = kept.read_keyed(at("cpu.stat"))
        if cpu_stat is None:
            raise CgroupError(f"cgroup {self.name} does not exist", str(self.path))
        usage_us = cpu_stat.get("usage_usec")
        throttled_us = cpu_stat.get("throttled_usec")
        return CgroupUsage(
            memory_current=kept.read_int(at("memory.current")),
            memory_peak=kept.read_int(at("memory.peak")),
            cpu_seconds=usage_us / 1e6 if usage_us is not None else None,
            nr_throttled=cpu_stat.get("nr_throttled"),
            throttled_seconds=throttled_us / 1e6 if throttled_us is not None else None,
            oom_kills=self.oom_kills(),
            pids_current=kept.read_int(at("pids.current")),
            pids_max_hits=(kept.read_keyed(at("pids.events")) or {}).get("max", 0),
        )
