"""The launch plan: what a new plugin process must do to itself before plugin code runs.

Why: the daemon decides *what* confines a plugin (its level, uid, paths, quotas); the child
applies it to itself in a fixed order (``isolation.sequence``). The plan is the one value that
crosses that boundary, so it is a frozen, versioned, msgpack-able dataclass, validated on the
way in (``from_wire``) and nowhere else.

How: ``plan_for_level`` turns a level plus the daemon's facts into a plan; each level is a
superset of the one before (``LaunchPlan.steps`` lists what a plan enforces, and the table in
the README is generated from the same rules):

==========  ================================================================================
none        cgroup join and rlimits (whatever the daemon passes)
minimal     + ``PR_SET_NO_NEW_PRIVS``; ``PR_SET_PDEATHSIG(SIGKILL)`` tied to the daemon when
            a ``parent_pid`` is given (``daemon.orphan_timeout = 0``: plugins die with it)
standard    + empty capability bounding set, no supplementary groups, setresgid/setresuid to
            the plugin's uid/gid, Landlock: read/exec on ``read_paths``, read/write on
            ``write_paths``, everything else EACCES; signals scoped to the sandbox (ABI >= 6)
strict      + own network namespace and Landlock TCP bind/connect denied (ABI >= 4) unless
            the network is granted; seccomp deny-list (ptrace, mount, bpf, ...) -> EPERM and
            ``socket()`` only for AF_UNIX unless the network is granted
paranoid    + user namespace (entered as the plugin uid) and a seccomp allow-list (default
            EPERM) instead of the deny-list; read-only everything but the state dir: the
            extra ``write_paths`` are only readable
==========  ================================================================================

``check_plan`` says what a plan needs that the kernel lacks; with ``require=True`` the daemon
refuses to start the plugin, with ``require=False`` the child skips those steps and reports
them.
"""

from __future__ import annotations

import site
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from osk_daemon.errors import SandboxError
from osk_daemon.isolation.levels import SandboxLevel  # the one definition, re-exported
from osk_daemon.isolation.probe import KernelFeatures, probe_kernel

__all__ = [
    "RLIMIT_NAMES",
    "KernelFeatures",
    "LaunchPlan",
    "SandboxError",
    "SandboxLevel",
    "check_plan",
    "default_read_paths",
    "plan_for_level",
    "probe_kernel",
]

WIRE_VERSION = 1
RLIMIT_NAMES = frozenset({"AS", "CPU", "NOFILE", "NPROC", "FSIZE", "CORE", "STACK"})
SECCOMP_MODES = ("off", "deny", "allow")


@dataclass(frozen=True)
class LaunchPlan:
    """Everything the child applies to itself; see the module docstring for the levels."""

    level: SandboxLevel = SandboxLevel.NONE
    cgroup_procs: tuple[str, ...] = ()
    rlimits: tuple[tuple[str, int, int], ...] = ()
    parent_pid: int | None = None
    uid: int | None = None
    gid: int | None = None
    read_paths: tuple[str, ...] = ()
    write_paths: tuple[str, ...] = ()
    network: bool = True
    user_namespace: bool = False
    seccomp: str = "off"
    require: bool = True

    def __post_init__(self) -> None:
        if self.seccomp not in SECCOMP_MODES:
            raise SandboxError(f"launch plan: seccomp must be one of {SECCOMP_MODES}")
        for name, soft, hard in self.rlimits:
            if name not in RLIMIT_NAMES:
                raise SandboxError(f"launch plan: unknown rlimit {name!r}")
            if soft >= 0 and hard >= 0 and soft > hard:
                raise SandboxError(f"launch plan: rlimit {name} soft {soft} > hard {hard}")

    @property
    def restricts_self(self) -> bool:
        """Level-implied: no_new_privs and the parent-death signal (minimal+)."""
        return self.level.rank >= SandboxLevel.MINIMAL.rank

    @property
    def landlock(self) -> bool:
        """Level-implied: capability bounding set drop and Landlock (standard+)."""
        return self.level.rank >= SandboxLevel.STANDARD.rank

    def steps(self) -> frozenset[str]:
        """The names of the protections this plan enforces (what ``check_plan`` checks)."""
        out = set()
        if self.cgroup_procs:
            out.add("cgroups")
        if self.rlimits:
            out.add("rlimits")
        if self.restricts_self:
            out.add("no_new_privs")
            if self.parent_pid is not None:  # not when plugins must outlive the daemon
                out.add("pdeathsig")
        if self.landlock:
            out |= {"capabilities", "landlock", "landlock_scope"}
        if self.uid is not None or self.gid is not None:
            out.add("drop_privileges")
        if not self.network:
            out.add("net_namespace")
            if self.landlock:
                out.add("landlock_net")
        if self.user_namespace:
            out.add("user_namespace")
        if self.seccomp != "off":
            out.add("seccomp")
        if self.seccomp == "allow":
            out.add("seccomp_allowlist")
        return frozenset(out)

    def to_wire(self) -> dict[str, Any]:
        """A msgpack-able map (lists, ints, strings); ``from_wire`` reverses it."""
        return {
            "v": WIRE_VERSION,
            "level": self.level.value,
            "cgroup_procs": list(self.cgroup_procs),
            "rlimits": [[n, s, h] for n, s, h in self.rlimits],
            "parent_pid": self.parent_pid,
            "uid": self.uid,
            "gid": self.gid,
            "read_paths": list(self.read_paths),
            "write_paths": list(self.write_paths),
            "network": self.network,
            "user_namespace": self.user_namespace,
            "seccomp": self.seccomp,
            "require": self.require,
        }

    @classmethod
    def from_wire(cls, data: Any) -> LaunchPlan:
        """Validate and rebuild a plan; malformed input raises ``SandboxError``."""
        if not isinstance(data, dict):
            raise SandboxError("launch plan must be a map")
        if data.get("v") != WIRE_VERSION:
            raise SandboxError(f"launch plan version {data.get('v')!r}, expected {WIRE_VERSION}")
        unknown = set(data) - _WIRE_KEYS
        if unknown:
            raise SandboxError(f"launch plan has unknown keys {sorted(unknown)}")
        try:
            level = SandboxLevel(data.get("level", "none"))
        except ValueError:
            raise SandboxError(f"launch plan: unknown level {data.get('level')!r}") from None
        rlimits = []
        for item in _list(data, "rlimits"):
            if not (isinstance(item, list | tuple) and len(item) == 3):
                raise SandboxError(f"launch plan: bad rlimit {item!r}")
            name, soft, hard = item
            if not isinstance(name, str) or not _is_int(soft) or not _is_int(hard):
                raise SandboxError(f"launch plan: bad rlimit {item!r}")
            rlimits.append((name, soft, hard))
        return cls(
            level=level,
            cgroup_procs=_strs(data, "cgroup_procs"),
            rlimits=tuple(rlimits),
            parent_pid=_opt_int(data, "parent_pid"),
            uid=_opt_int(data, "uid"),
            gid=_opt_int(data, "gid"),
            read_paths=_strs(data, "read_paths"),
            write_paths=_strs(data, "write_paths"),
            network=_bool(data, "network", True),
            user_namespace=_bool(data, "user_namespace", False),
            seccomp=str(data.get("seccomp", "off")),
            require=_bool(data, "require", True),
        )


_WIRE_KEYS = frozenset(LaunchPlan().to_wire())


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _list(data: dict[str, Any], key: str) -> list[Any]:
    value = data.get(key, [])
    if not isinstance(value, list | tuple):
        raise SandboxError(f"launch plan: {key} must be a list")
    return list(value)


def _strs(data: dict[str, Any], key: str) -> tuple[str, ...]:
    items = _list(data, key)
    if not all(isinstance(item, str) for item in items):
        raise SandboxError(f"launch plan: {key} must be a list of strings")
    return tuple(items)


def _opt_int(data: dict[str, Any], key: str) -> int | None:
    value = data.get(key)
    if value is not None and (not _is_int(value) or value < 0):
        raise SandboxError(f"launch plan: {key} must be a non-negative int or null")
    return value


def _bool(data: dict[str, Any], key: str, default: bool) -> bool:
    value = data.get(key, default)
    if not isinstance(value, bool):
        raise SandboxError(f"launch plan: {key} must be a bool")
    return value


def plan_for_level(
    level: SandboxLevel,
    *,
    cgroup_procs: Sequence[str] = (),
    rlimits: Sequence[tuple[str, int, int]] = (),
    parent_pid: int | None = None,
    uid: int | None = None,
    gid: int | None = None,
    read_paths: Sequence[str] = (),
    state_dir: str | None = None,
    write_paths: Sequence[str] = (),
    network_granted: bool = False,
    require: bool = True,
) -> LaunchPlan:
    """The plan a level implies; facts a level does not use are dropped, not kept.

    none/minimal ignore uid, gid and paths; standard and strict may write ``state_dir``
    (the plugin's own) and ``write_paths`` (the operator's extra grants); the network is only
    taken away from strict up (unless ``network_granted``); paranoid adds the user namespace
    and the seccomp allow-list, and writes only ``state_dir``: its ``write_paths`` are
    readable, not writable. Raises ``SandboxError`` on an unknown rlimit name or soft > hard.
    """
    level = SandboxLevel(level)
    plan = LaunchPlan(
        level=level,
        cgroup_procs=tuple(cgroup_procs),
        rlimits=tuple((str(n), int(s), int(h)) for n, s, h in rlimits),
        require=require,
    )
    if level.rank >= SandboxLevel.MINIMAL.rank:
        plan = replace(plan, parent_pid=parent_pid)
    own = () if state_dir is None else (str(state_dir),)
    if level.rank >= SandboxLevel.STANDARD.rank:
        plan = replace(
            plan,
            uid=uid,
            gid=gid,
            read_paths=tuple(read_paths),
            write_paths=tuple(dict.fromkeys([*own, *write_paths])),
        )
    if level.rank >= SandboxLevel.STRICT.rank:
        plan = replace(plan, network=network_granted, seccomp="deny")
    if level is SandboxLevel.PARANOID:
        read_only = [p for p in write_paths if p not in own]
        plan = replace(
            plan,
            user_namespace=True,
            seccomp="allow",
            read_paths=tuple(dict.fromkeys([*read_paths, *read_only])),
            write_paths=own,
        )
    return plan


# Narrow /etc: the dynamic loader, name service, time zone and TLS trust, not the whole dir.
_SYSTEM_READ = (
    "/usr",
    "/lib",
    "/lib64",
    "/bin",
    "/etc/ld.so.cache",
    "/etc/ld.so.conf",
    "/etc/ld.so.conf.d",
    "/etc/localtime",
    "/etc/nsswitch.conf",
    "/etc/passwd",
    "/etc/group",
    "/etc/hosts",
    "/etc/host.conf",
    "/etc/resolv.conf",
    "/etc/gai.conf",
    "/etc/services",
    "/etc/protocols",
    "/etc/mime.types",
    "/etc/ssl",
    "/etc/ca-certificates",
    "/etc/os-release",
    "/proc",
    "/sys/devices/system/cpu",
    "/dev/null",
    "/dev/zero",
    "/dev/random",
    "/dev/urandom",
)


def default_read_paths(extra: Sequence[str]) -> tuple[str, ...]:
    """System dirs, the running interpreter's prefixes and site-packages, then ``extra``.

    Order is kept and duplicates dropped; paths that do not exist are left in (the Landlock
    step skips them). ``/dev/null`` is also writable under Landlock (see ``landlock``).
    """
    paths = [*_SYSTEM_READ, sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix]
    paths.extend(site.getsitepackages())
    paths.extend(str(p) for p in extra)
    return tuple(dict.fromkeys(paths))


_NEEDS = {
    "no_new_privs": ("no_new_privs", "the kernel has no PR_SET_NO_NEW_PRIVS (Linux >= 3.5)"),
    "landlock": ("landlock_abi", "the kernel has no Landlock (Linux >= 5.13, 'landlock' in lsm=)"),
    "net_namespace": ("net_namespaces", "the kernel has no network namespaces"),
    "user_namespace": ("user_namespaces", "user namespaces are disabled or absent"),
    "seccomp": ("seccomp", "the kernel has no seccomp filter with the errno action"),
}


def check_plan(plan: LaunchPlan, features: KernelFeatures) -> list[str]:
    """What ``plan`` needs that ``features`` lack, as "step: reason" lines ([] = enforceable).

    Landlock's network rules (ABI 4) and scopes (ABI 6) are best effort: the network
    namespace and seccomp already cover the network, so an older ABI is not reported.
    """
    steps = plan.steps()
    missing: list[str] = []
    for step, (attr, reason) in _NEEDS.items():
        if step not in steps:
            continue
        if not getattr(features, attr):
            missing.append(f"{step}: {reason}")
    if "seccomp" in steps and features.seccomp and not features.libseccomp:
        missing.append("seccomp: libseccomp.so.2 is not installed (apt install libseccomp2)")
    return missing
