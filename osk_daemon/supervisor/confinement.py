"""Per-instance confinement, daemon side: cgroup, state dir and the child's launch plan.

Theory of operation
-------------------
Before an instance is spawned the driver asks ``Confinement.prepare`` for a cgroup with the
plugin's quotas (limits are written before any process joins) and a ``LaunchPlan`` that the
child applies to itself in the fixed order of ``isolation.sequence`` before plugin code
runs. After the process is gone, ``release`` kills whatever is left in the cgroup (a
plugin's own children included) and, for an instance that is not coming back, removes it
on a worker thread (a few milliseconds the serving path must not wait for), and tells
whether the kernel OOM-killed something in it. ``sample`` reads usage for status and
reports newly hit limits (pids, OOM) as events.

Whether a plugin's sandbox can be enforced at all is decided once, at daemon start
(``check``): a level the kernel cannot enforce stops the daemon with a clear message,
unless the plugin says ``sandbox.require = false`` — then it runs degraded, and says so:
the daemon logs it and ``degradation(name)`` keeps what was not enforced for status. An
unknown ``sandbox.user`` or ``sandbox.group`` is the operator's mistake, not a missing
kernel feature, so it stops the daemon whatever ``require`` says.
"""

from __future__ import annotations

import contextlib
import grp
import hashlib
import logging
import os
import pwd
from collections.abc import Collection
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from osk_daemon.config import Config, PluginConfig, SandboxLevel
from osk_daemon.errors import ConfigError, OskError
from osk_daemon.isolation.cgroups import CgroupLimits, Cgroups, InstanceCgroup
from osk_daemon.isolation.plan import (
    KernelFeatures,
    LaunchPlan,
    check_plan,
    default_read_paths,
    plan_for_level,
    probe_kernel,
)
from osk_daemon.isolation.rlimits import inherited_open_files

log = logging.getLogger("osk.isolation")

_RLIMITS = {
    "address_space": "AS",
    "cpu_seconds": "CPU",
    "open_files": "NOFILE",
    "processes": "NPROC",
    "file_size": "FSIZE",
    "core": "CORE",
    "stack": "STACK",
}


@dataclass
class Prepared:
    cgroup: InstanceCgroup | None
    plan: LaunchPlan
    oom_before: int = 0
    wire: dict[str, Any] = field(default_factory=dict)  # plan.to_wire(), made once

    def __post_init__(self) -> None:
        self.wire = self.plan.to_wire()


@dataclass
class _Seen:
    oom_kills: int = 0
    pids_max_hits: int = 0


@dataclass
class Confinement:
    config: Config
    cgroups: Cgroups | None
    features: KernelFeatures = field(default_factory=probe_kernel)
    _seen: dict[str, _Seen] = field(default_factory=dict)
    _kept: dict[str, Prepared] = field(default_factory=dict)  # reused across restarts
    _degraded: dict[str, tuple[str, ...]] = field(default_factory=dict)  # from check()
    # removing a stopped instance's cgroup (kill, wait until empty, rmdir: a few ms) runs
    # on this thread, off the daemon's loop; the name is busy until it is done
    _disposer: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="osk-cgroup")
    )
    _disposing: dict[str, Future[None]] = field(default_factory=dict)

    @classmethod
    def open(cls, config: Config, keep: Collection[str] = ()) -> Confinement:
        """Detect cgroups (and sweep a previous run's leftovers, but the cgroups named in
        ``keep``: instances this daemon re-adopts) and probe the kernel."""
        cgroups: Cgroups | None = None
        if config.daemon.cgroups:
            try:
                cgroups = Cgroups.detect(cgroup_name(config.daemon.runtime_dir))
                removed = cgroups.sweep(keep)
                if removed:
                    log.warning("removed cgroups left by a previous run: %s", removed)
            except OskError as exc:
                log.warning("cgroups unavailable, instances run without quotas: %s", exc)
        return cls(config, cgroups)

    def close(self, keep: Collection[str] | None = ()) -> None:
        """Kill and remove every instance cgroup but those in ``keep`` (plugins left
        running for the next daemon; ``None``: all of them), and the subtree if empty."""
        self._disposer.shutdown(wait=True)
        if self.cgroups is None or keep is None:
            return
        if keep:
            self.cgroups.sweep(keep)
        else:
            self.cgroups.close()

    # ---- at daemon start ------------------------------------------------------------

    def check(self) -> list[str]:
        """Refuse what cannot be enforced; returns warnings for degraded plugins.

        Raises ``ConfigError`` naming the config file and key for an unknown sandbox user
        or group (always), and for a sandbox the host cannot enforce (unless the plugin
        has ``sandbox.require = false``; then what was skipped is kept for
        ``degradation``). Cost: one passwd/group lookup and one plan per plugin.
        """
        warnings: list[str] = []
        self._degraded.clear()
        for name, plugin in self.config.plugins.items():
            if plugin.sandbox.level.rank >= SandboxLevel.STANDARD.rank:
                sandbox = plugin.sandbox
                resolve_user(name, sandbox.user, sandbox.group, file=str(self.config.source))
            if plugin.sandbox.level is SandboxLevel.PARANOID and plugin.sandbox.filesystem.write:
                log.warning(
                    "%s: plugins.%s.sandbox.filesystem.write is read-only at the paranoid "
                    "level (only its state dir is writable)",
                    self.config.source,
                    name,
                )
            problems = self._problems(name, plugin)
            if not problems:
                continue
            text = "; ".join(problems)
            if plugin.sandbox.require:
                raise ConfigError(
                    str(self.config.source),
                    f"plugins.{name}.sandbox",
                    f"cannot be enforced on this host: {text} "
                    "(set sandbox.require = false to run it degraded)",
                )
            self._degraded[name] = tuple(problems)
            warnings.append(f"{name}: running degraded, not enforced: {text}")
        return warnings

    def degradation(self, name: str) -> tuple[str, ...]:
        """What ``check`` found unenforceable for a ``require = false`` plugin, as
        "step: reason" lines; () when everything is enforced (or before ``check``)."""
        return self._degraded.get(name, ())

    def _problems(self, name: str, plugin: PluginConfig) -> list[str]:
        problems: list[str] = []
        limits = plugin.limits
        wanted = {"memory": limits.memory, "cpu": limits.cpu, "pids": limits.pids}
        have = self.cgroups.supports() if self.cgroups is not None else {}
        why = "cgroups are off" if self.cgroups is None else "this host's cgroups lack it"
        for key, value in wanted.items():
            if value is not None and not have.get(key, False):
                problems.append(f"limits.{key}: needs the {key} cgroup controller ({why})")
        problems.extend(check_plan(self._plan(name, plugin, 0, ()), self.features))
        return problems

    # ---- per spawn ------------------------------------------------------------------

    def prepare(self, name: str, plugin: PluginConfig, index: int, slot: int = 0) -> Prepared:
        """The instance's cgroup (in ``slot``: 0, or 1 for a standby's turn, see
        ``instance_cgroup``), state dir and launch plan.

        Made on the first start and kept across restarts (a restart is on the crash
        path, where every millisecond counts); ``release(final=True)`` drops them.
        """
        key = instance_cgroup(name, index, slot)
        self._settle(key)
        kept = self._kept.get(key)
        if kept is not None:
            kept.oom_before = kept.cgroup.oom_kills() if kept.cgroup is not None else 0
            return kept
        cgroup = None
        if self.cgroups is not None:
            limits = plugin.limits
            cgroup = self.cgroups.create(
                key,
                CgroupLimits(memory_max=limits.memory, cpu_quota=limits.cpu, pids_max=limits.pids),
            )
        procs = cgroup.procs_files if cgroup is not None else ()
        plan = self._plan(name, plugin, index, procs)
        self._make_state_dir(name, plan)
        _keep_counters_open(cgroup)
        prepared = Prepared(cgroup, plan, cgroup.oom_kills() if cgroup is not None else 0)
        self._kept[key] = prepared
        return prepared

    def adopt(self, name: str, plugin: PluginConfig, index: int, slot: int = 0) -> Prepared:
        """What a re-adopted instance runs in: its existing cgroup (nothing is written to
        it; limits are the ones it was created with) and the plan it would get now."""
        key = instance_cgroup(name, index, slot)
        self._settle(key)
        cgroup = None
        if self.cgroups is not None:
            cgroup = self.cgroups.attach(key)
            if not cgroup.exists():
                cgroup = None
            _keep_counters_open(cgroup)
        plan = self._plan(name, plugin, index, cgroup.procs_files if cgroup is not None else ())
        prepared = Prepared(cgroup, plan, cgroup.oom_kills() if cgroup is not None else 0)
        self._kept[key] = prepared
        return prepared

    def release(self, prepared: Prepared, *, final: bool) -> bool:
        """Kill what is left of the instance; True if the kernel OOM-killed in it.

        ``final``: the instance is not coming back (stopped): remove its cgroup too.
        """
        cgroup = prepared.cgroup
        if final:
            for key, kept in list(self._kept.items()):
                if kept is prepared:
                    del self._kept[key]
        if cgroup is None:
            return False
        oom = False
        try:
            if not final and cgroup.populated():
                cgroup.kill()  # before the restart joins it: now, on the crash path
            oom = cgroup.oom_kills() > prepared.oom_before
        except OskError as exc:
            log.warning("cgroup %s: %s", cgroup.name, exc)
        if final:
            self._dispose_later(cgroup)
        return oom

    def _dispose_later(self, cgroup: InstanceCgroup) -> None:
        """Kill and remove ``cgroup`` on the worker thread; its name is busy until then."""
        cgroup.close_files()  # here, on the loop thread that sampled it
        self._disposing[cgroup.name] = self._disposer.submit(_dispose, cgroup)

    def dispose_slots(self, name: str, index: int, keep: Collection[Prepared] = ()) -> None:
        """The instance is gone for good (stopped or removed): remove the kept cgroups of
        both its slots but those in ``keep`` (a dropped standby's, which goes when that
        process is reaped). A promotion leaves the dead life's slot kept for the next
        standby; without this it would stay until the daemon exits."""
        for slot in (0, 1):
            key = instance_cgroup(name, index, slot)
            kept = self._kept.get(key)
            if kept is None or any(kept is k for k in keep):
                continue
            del self._kept[key]
            if kept.cgroup is not None:
                self._dispose_later(kept.cgroup)

    def _settle(self, key: str) -> None:
        """Wait for the removal of an earlier cgroup of this name, if one is running."""
        pending = self._disposing.pop(key, None)
        if pending is not None:
            pending.result()

    def sample(self, key: str, prepared: Prepared) -> tuple[dict[str, Any], list[str]]:
        """Usage for status, and the limits newly hit since the last sample."""
        if prepared.cgroup is None:
            return {}, []
        try:
            usage = prepared.cgroup.usage()
        except OskError:
            return {}, []
        seen = self._seen.setdefault(key, _Seen())
        hits: list[str] = []
        if usage.pids_max_hits > seen.pids_max_hits:
            hits.append("pids")
        if usage.oom_kills > seen.oom_kills:
            hits.append("memory")
        seen.pids_max_hits, seen.oom_kills = usage.pids_max_hits, usage.oom_kills
        fields = {
            "memory_bytes": usage.memory_current,
            "memory_peak_bytes": usage.memory_peak,
            "cpu_s": None if usage.cpu_seconds is None else round(usage.cpu_seconds, 3),
            "cpu_throttled": usage.nr_throttled,
            "pids": usage.pids_current,
        }
        return fields, hits

    # ---- helpers --------------------------------------------------------------------

    def state_dir(self, name: str) -> Path:
        return self.config.daemon.state_dir / name

    def _plan(
        self, name: str, plugin: PluginConfig, index: int, procs: tuple[str, ...]
    ) -> LaunchPlan:
        sandbox = plugin.sandbox
        level = sandbox.level
        rlimits = []
        for field_name, rname in _RLIMITS.items():
            value = getattr(plugin.limits, field_name)
            if value is not None:
                rlimits.append((rname, int(value), int(value)))
        inherited = inherited_open_files()  # the daemon raised its own: plugins get theirs
        if plugin.limits.open_files is None and inherited is not None:
            rlimits.append(("NOFILE", *inherited))
        uid = gid = None
        if sandbox.level.rank >= SandboxLevel.STANDARD.rank:
            uid, gid = resolve_user(name, sandbox.user, sandbox.group, file=str(self.config.source))
        code = [str(p) for p in plugin.path] + [str(p) for p in sandbox.filesystem.read]
        return plan_for_level(
            level,
            cgroup_procs=procs,
            rlimits=tuple(rlimits),
            # tied to the daemon only when plugins must not outlive it (orphan_timeout 0)
            parent_pid=os.getpid() if self.config.daemon.orphan_timeout == 0 else None,
            uid=uid,
            gid=gid,
            read_paths=default_read_paths(code),
            state_dir=str(self.state_dir(name)),
            write_paths=tuple(str(p) for p in sandbox.filesystem.write),
            network_granted=sandbox.network,
            require=sandbox.require,
        )

    def _make_state_dir(self, name: str, plan: LaunchPlan) -> None:
        path = self.state_dir(name)
        path.mkdir(parents=True, exist_ok=True)
        path.parent.chmod(0o711)  # plugin uids may traverse to their own dir, not list
        path.chmod(0o700)
        if plan.uid is not None:
            os.chown(path, plan.uid, plan.gid if plan.gid is not None else -1)


def _keep_counters_open(cgroup: InstanceCgroup | None) -> None:
    """Open the counter files usage sampling reads, once, as the cgroup is made: sampling
    then only ``pread``s them (``cgroupfs.KeptFiles``), from its first look on."""
    if cgroup is not None:
        with contextlib.suppress(OskError):
            cgroup.usage()


def _dispose(cgroup: InstanceCgroup) -> None:
    """Kill what is left in a stopped instance's cgroup and remove it (worker thread)."""
    try:
        cgroup.remove()  # kills first if anything is left
    except OskError as exc:
        log.warning("could not remove cgroup %s: %s", cgroup.name, exc)


def instance_cgroup(plugin: str, index: int, slot: int = 0) -> str:
    """The name of an instance's cgroup under the daemon's subtree. An instance with a
    standby has two, taken in turn (slot 0 and 1): the standby waits in the one the live
    process is not in. Plugin names have no ".", so the names never collide."""
    return f"{plugin}-{index}" if slot == 0 else f"{plugin}-{index}.{slot}"


def cgroup_name(runtime_dir: Path) -> str:
    """The daemon's cgroup subtree name: one per runtime dir, so two daemons on a host
    never sweep each other's plugins, and a restarted daemon finds its own leftovers."""
    digest = hashlib.sha1(str(runtime_dir.absolute()).encode(), usedforsecurity=False)
    return f"osk-{digest.hexdigest()[:10]}"


def resolve_user(
    plugin: str, user: str | int, group: str | int | None, *, file: str = ""
) -> tuple[int, int]:
    """The uid and gid a plugin runs as.

    Raises ``ConfigError`` (``file``, key ``plugins.NAME.sandbox.user`` or ``.group``) for a
    user or group this host does not know, whatever ``sandbox.require`` says.
    """
    try:
        entry = pwd.getpwuid(user) if isinstance(user, int) else pwd.getpwnam(user)
    except KeyError:
        raise ConfigError(
            file,
            f"plugins.{plugin}.sandbox.user",
            f"no such user {user!r} on this host (create it, or name an existing user; "
            "sandbox.require = false does not cover this)",
        ) from None
    if group is None:
        return entry.pw_uid, entry.pw_gid
    try:
        gentry = grp.getgrgid(group) if isinstance(group, int) else grp.getgrnam(group)
    except KeyError:
        raise ConfigError(
            file,
            f"plugins.{plugin}.sandbox.group",
            f"no such group {group!r} on this host (create it, or name an existing group; "
            "sandbox.require = false does not cover this)",
        ) from None
    return entry.pw_uid, gentry.gr_gid
