"""Per-instance cgroups: the interface the daemon uses, host detection, and the shared parts.

Why: every plugin instance gets its own cgroup so the kernel enforces its memory, CPU and
process quotas, counts what it used, and lets the daemon kill its whole process tree at
once (a plugin's own children included) and know when that tree is gone.

How: ``Cgroups.detect`` reads ``/proc/self/mountinfo`` (where each hierarchy is mounted)
and ``/proc/self/cgroup`` (where this process sits in each) and picks a backend:

- ``V2Cgroups`` (``cgroup_v2``) on a unified host whose cgroup offers memory, pids and cpu
  (systemd ``Delegate=yes``). Layout: ``<ours>/<name>.d/<instance>``; the daemon moves
  itself into ``<ours>/<name>.daemon`` first, because v2 forbids processes in a cgroup that
  hands controllers to its children.
- ``V1Cgroups`` (``cgroup_v1``) on legacy and hybrid hosts: one ``<name>.d/<instance>``
  directory in each v1 hierarchy we use (memory, pids, cpu, cpuacct; freezer if nothing
  better can kill), each under this process's own path in that hierarchy (they differ:
  memory may be nested while pids sits at ``/``). On hybrid hosts a directory in the v2
  hierarchy is added only for ``cgroup.kill`` and ``cgroup.events``.

Limits are written before any process joins; the child then writes its own pid into every
file of ``InstanceCgroup.procs_files``. Killing uses ``cgroup.kill`` where the kernel has
it (5.14+), else freeze, SIGKILL everything listed, thaw, until empty. Every cgroup file
access goes through the helpers in ``cgroupfs`` (``read_text``, ``write_value``, ...), which
turn ``OSError`` into ``CgroupError`` naming the file and the errno; the mountinfo and
/proc/self/cgroup parsing lives there too. Nothing is read at import time.
"""

from __future__ import annotations

import errno
import math
import re
import time
from abc import ABC, abstractmethod
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

from osk_daemon.errors import CgroupError
from osk_daemon.isolation.cgroupfs import (
    POLL_S,
    HostLayout,
    KeptFiles,
    Mount,
    children,
    parse_mountinfo,
    parse_proc_cgroup,
    procs_of,
    read_keyed,
    read_layout,
    read_optional,
    read_text,
    remove_tree,
    signal_all,
    write_value,
)

__all__ = [
    "CgroupError",
    "CgroupLimits",
    "CgroupUsage",
    "Cgroups",
    "HostLayout",
    "InstanceCgroup",
    "Mount",
    "check_name",
    "parse_mountinfo",
    "parse_proc_cgroup",
    "read_layout",
]

CPU_PERIOD_US = 100_000
MIN_CPU_QUOTA_US = 1_000  # the kernel's minimum quota (v1 and v2)
MAX_CPU_PERIOD_US = 1_000_000  # and its longest period
KILL_TIMEOUT_S = 5.0
RMDIR_TIMEOUT_S = 2.0

_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_.-]{0,127}")
# A child cgroup named like a kernel attribute file cannot be created (v1 mkdir "tasks"
# fails with EEXIST), so such names are refused up front.
_RESERVED_PREFIXES = (
    "cgroup.", "memory.", "cpu.", "cpuacct.", "cpuset.", "pids.", "io.", "blkio.",
    "freezer.", "devices.", "hugetlb.", "rdma.", "misc.", "net_cls.", "net_prio.",
    "perf_event.",
)  # fmt: skip
_RESERVED_NAMES = frozenset({"tasks", "notify_on_release", "release_agent"})


@dataclass(frozen=True)
class CgroupLimits:
    """Quotas for one instance; ``None`` leaves that resource unlimited.

    ``memory_max`` is in bytes (swap is limited to nothing on top of it where the kernel
    allows); ``cpu_quota`` is in cores (0.2, 1.5; see ``cpu_max``).
    """

    memory_max: int | None = None
    cpu_quota: float | None = None
    pids_max: int | None = None

    def check(self) -> None:
        """Raise ``CgroupError`` for a limit the kernel would reject or misread."""
        if self.memory_max is not None and self.memory_max < 4096:
            raise CgroupError(f"memory_max must be at least 4096 bytes, not {self.memory_max}")
        if self.cpu_quota is not None and not self.cpu_quota > 0:
            raise CgroupError(
                f"cpu_quota must be a positive fraction of a core, not {self.cpu_quota}"
            )
        if self.pids_max is not None and self.pids_max < 1:
            raise CgroupError(f"pids_max must be at least 1, not {self.pids_max}")


def cpu_max(cores: float) -> tuple[int, int]:
    """``(quota_us, period_us)`` that let a cgroup use ``cores`` of CPU time.

    The period is ``CPU_PERIOD_US``, or longer (at most 1 s) where the quota would fall
    under the kernel's 1 ms minimum: 0.01 cores is 1 ms per 100 ms, 0.002 cores 1 ms per
    500 ms. Below 0.001 cores the quota stays 1 ms a second.
    """
    period = CPU_PERIOD_US
    if cores * period < MIN_CPU_QUOTA_US:
        period = min(MAX_CPU_PERIOD_US, math.ceil(MIN_CPU_QUOTA_US / cores))
    return max(MIN_CPU_QUOTA_US, round(cores * period)), period


@dataclass(frozen=True)
class CgroupUsage:
    """One reading of an instance's counters; ``None`` = not available on this host."""

    memory_current: int | None
    memory_peak: int | None
    cpu_seconds: float | None
    nr_throttled: int | None
    throttled_seconds: float | None
    oom_kills: int
    pids_current: int | None
    pids_max_hits: int


def check_name(name: str) -> str:
    """Return ``name`` if it is safe as a cgroup directory name, else raise ``CgroupError``."""
    if (
        not _NAME_RE.fullmatch(name)
        or name in _RESERVED_NAMES
        or name.startswith(_RESERVED_PREFIXES)
    ):
        raise CgroupError(
            f"bad cgroup name {name!r}: use 1-128 of [a-z0-9_.-], starting with a letter or "
            "digit, not named like a kernel attribute file"
        )
    return name


# ---- the interface ----------------------------------------------------------------------

WANTED = ("memory", "pids", "cpu")


class Cgroups(ABC):
    """The daemon's cgroup subtree; one per daemon. Use ``Cgroups.detect``."""

    version: str  # "v1", "hybrid" or "v2"
    name: str
    root_paths: list[Path]  # the ``<name>.d`` directory in every hierarchy used

    @staticmethod
    def detect(name: str = "osk") -> Cgroups:
        """Find a usable cgroup setup and create our subtree in it.

        Returns ``V2Cgroups`` on a unified host whose cgroup offers the controllers (or where
        nothing else is mounted), else ``V1Cgroups``. Raises ``CgroupError`` when neither
        works: nothing mounted, read-only cgroupfs, or not privileged (run as root, or
        with systemd ``Delegate=yes``). Cost: a few /proc reads and mkdirs.
        """
        from osk_daemon.isolation.cgroup_v1 import V1Cgroups
        from osk_daemon.isolation.cgroup_v2 import V2Cgroups

        check_name(name)
        layout = read_layout(
            read_text(Path("/proc/self/mountinfo")), read_text(Path("/proc/self/cgroup"))
        )
        v1_wanted = [c for c in WANTED if c in layout.v1]
        if layout.unified is not None:
            offered = set((read_optional(layout.unified / "cgroup.controllers") or "").split())
            if not v1_wanted or set(WANTED) <= offered:
                return V2Cgroups.open(name, layout.unified)
        if v1_wanted:
            return V1Cgroups.open(name, layout)
        raise CgroupError(
            "no cgroup hierarchy with memory, pids or cpu is mounted here "
            "(see /proc/self/mountinfo); instances cannot get quotas"
        )

    @abstractmethod
    def supports(self) -> dict[str, bool]:
        """Which of memory, cpu, pids, kill, oom_events, peak work on this host."""

    @abstractmethod
    def create(self, instance: str, limits: CgroupLimits) -> InstanceCgroup:
        """Create ``instance``'s cgroup with ``limits`` written before anyone joins.

        A leftover of the same name is killed and removed first. Raises ``CgroupError``
        for a bad name, a controller the limits need but the host lacks, or a limit the
        kernel refused (naming the file and errno); nothing is left behind then.
        """

    @abstractmethod
    def attach(self, instance: str) -> InstanceCgroup:
        """An existing (or absent) instance cgroup, for leftovers; writes nothing."""

    def sweep(self, keep: Collection[str] = ()) -> list[str]:
        """Kill and remove every instance cgroup under our subtree but those in ``keep``
        (instances a restarted daemon re-adopts); returns the names removed."""
        found = {n for root in self.root_paths for n in children(root)}
        names = sorted(found - set(keep))
        for name in names:
            self.attach(name).remove()
        return names

    def close(self) -> None:
        """Kill and remove everything under our subtree, then the subtree itself."""
        self.sweep()
        deadline = time.monotonic() + RMDIR_TIMEOUT_S
        for root in self.root_paths:
            remove_tree(root, deadline)


class InstanceCgroup(ABC):
    """One instance's cgroup: a directory in each hierarchy used.

    ``procs_files`` are the ``cgroup.procs`` files the child writes its own pid into.
    """

    def __init__(self, name: str, dirs: Sequence[Path], kill_dir: Path | None) -> None:
        self.name = name
        self.dirs = tuple(dirs)
        self.procs_files: tuple[str, ...] = tuple(str(d / "cgroup.procs") for d in self.dirs)
        self._kill_dir = kill_dir  # a directory with cgroup.kill, if the kernel has it
        self.files = KeptFiles()  # the counters ``usage`` re-reads (the loop thread's)

    def close_files(self) -> None:
        """Close the counter files kept open: before ``remove``, on the thread that read
        them (the loop's), since ``remove`` runs on another."""
        self.files.close()

    def exists(self) -> bool:
        return any(d.is_dir() for d in self.dirs)

    def add(self, pid: int) -> None:
        """Move ``pid`` into every directory of this cgroup (daemon-side join)."""
        for d in self.dirs:
            write_value(d / "cgroup.procs", str(pid))

    def pids(self) -> list[int]:
        """Every process in this cgroup or below, in any of its hierarchies, sorted."""
        return sorted({p for d in self.dirs for p in procs_of(d)})

    def populated(self) -> bool:
        """True while any process is in this cgroup (or a child cgroup of it)."""
        if self._kill_dir is not None:  # a v2 dir that every member also joined: one read
            events = read_keyed(self._kill_dir / "cgroup.events")
            if events is not None:
                return bool(events.get("populated", 0))
        for d in self.dirs:
            events = read_keyed(d / "cgroup.events")
            if events is not None:
                if events.get("populated", 0):
                    return True
            elif procs_of(d):
                return True
        return False

    def kill(self) -> None:
        """SIGKILL every process in it and return once it is empty.

        Uses ``cgroup.kill`` where present (race-free, includes forks in flight); anything
        outside its reach (or everything, on old kernels) is frozen, killed by pid and
        thawed, repeatedly. Raises ``CgroupError`` if processes remain after
        ``KILL_TIMEOUT_S``. Cost: usually a few milliseconds.
        """
        deadline = time.monotonic() + KILL_TIMEOUT_S
        while True:
            in_reach = False
            if self._kill_dir is not None and self._kill_dir.is_dir():
                try:
                    write_value(self._kill_dir / "cgroup.kill", "1")
                except CgroupError as exc:
                    if exc.errno != errno.ENOENT:
                        raise
                events = read_keyed(self._kill_dir / "cgroup.events") or {}
                in_reach = bool(events.get("populated", 0))
            remaining = self.pids()
            if not remaining and not in_reach:
                return
            if time.monotonic() >= deadline:
                raise CgroupError(
                    f"cgroup {self.name}: processes {remaining[:10]} survived SIGKILL for "
                    f"{KILL_TIMEOUT_S:.0f} s (stuck in the kernel?)"
                )
            if not in_reach:
                # Only frozen pids are safe from reuse between reading and signalling.
                frozen = self._set_frozen(True, deadline)
                try:
                    signal_all(self.pids())
                finally:
                    if frozen:
                        self._set_frozen(False, deadline)
            self._wait_empty(min(deadline, time.monotonic() + 0.05))

    def _wait_empty(self, until: float) -> None:
        while self.populated() and time.monotonic() < until:
            time.sleep(POLL_S)

    def _set_frozen(self, frozen: bool, deadline: float) -> bool:
        """Freeze or thaw where the host can; False if it cannot."""
        return False

    def remove(self) -> None:
        """Kill what is left, then rmdir every directory of this cgroup (idempotent)."""
        self.close_files()  # the daemon closed them already, on its loop (close_files)
        if self.populated():
            self.kill()
        deadline = time.monotonic() + RMDIR_TIMEOUT_S
        for d in self.dirs:
            remove_tree(d, deadline)

    @abstractmethod
    def set_cpu_max(self, cores: float | None) -> None:
        """Let the cgroup use ``cores`` of CPU time from now on (None: no limit). Raises
        ``CgroupError`` if the cpu controller is not there for it."""

    @abstractmethod
    def usage(self) -> CgroupUsage:
        """Read the counters; raises ``CgroupError`` if the cgroup is gone."""

    @abstractmethod
    def oom_kills(self) -> int:
        """How many processes the kernel OOM-killed in this cgroup so far (one file read)."""
