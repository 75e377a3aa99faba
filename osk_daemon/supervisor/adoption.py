"""Re-adopting the plugins a previous daemon left running.

Why: restarting the daemon (an upgrade, a crash, ``kill -9``) must not restart its
plugins: they keep their pids, their in-memory state and their cgroups, and the new daemon
takes them over within a second.

How, at start-up, before anything is swept or bound (``find_survivors``):

1. Read the previous daemon's records (``runtime_state``). For each, open a pidfd and check
   the pid's start time, so a pid reused since is not mistaken for the plugin.
2. A live process whose instance is in the new config (or was loaded at run time from a
   folder that still holds it), with the same version and config fingerprint, that was
   READY, is a *survivor*: its cgroup is kept (not swept), its output
   FIFOs are kept, and its instance is adopted instead of spawned. Anything else alive
   (its plugin removed or changed meanwhile, or caught mid-start or mid-stop) is killed by
   pidfd, and its instance starts afresh (``plugin:not-adopted`` says why). A record whose
   process died meanwhile is *lost*: its instance starts afresh too, and ``plugin:lost``
   says so.

Then, in the running supervisor: plugins loaded at run time are loaded again from their
folders (``reload_survivors``), and when the tree starts a survivor's leaf,
``claim`` hands it to ``InstanceProcesses.adopt`` (the start gate is skipped: it has been
running all along). The broker binds the worker's routing id (its token) at once; the
worker's socket reconnects by itself and its first frame makes the instance READY (the
start timer bounds the wait). Its exit is seen through the pidfd, with the status unknown
(it is not our child). Survivors never claimed (a shutdown came first) are killed.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from osk_daemon.config import Config
from osk_daemon.errors import ControlError
from osk_daemon.ipc.beats import beat_path
from osk_daemon.supervisor.confinement import instance_cgroup
from osk_daemon.supervisor.dynamic_load import load_plugin, loaded_plugin
from osk_daemon.supervisor.lifecycle import State
from osk_daemon.supervisor.runtime_state import (
    InstanceRecord,
    config_fingerprint,
    daemon_fingerprint,
    load,
    verify,
)

if TYPE_CHECKING:
    from osk_daemon.supervisor.runtime import Supervisor

__all__ = [
    "OUTPUT_DIR",
    "Survivor",
    "Survivors",
    "find_survivors",
    "output_dir",
    "reload_survivors",
]

log = logging.getLogger("osk.supervisor.adoption")

OUTPUT_DIR = "output"  # the instances' stdout/stderr FIFOs, under runtime_dir


def output_dir(runtime_dir: Path) -> Path:
    return runtime_dir / OUTPUT_DIR


@dataclass
class Survivor:
    record: InstanceRecord
    pidfd: int


@dataclass
class Survivors:
    """What a previous daemon left in the runtime dir, sorted against the new config."""

    adopt: dict[str, Survivor] = field(default_factory=dict)  # leaf -> survivor
    # plugins loaded at run time (oskctl load) whose process survives: loaded again from
    # these folders once the supervisor runs, and adopted as they start
    reload: dict[str, str] = field(default_factory=dict)  # plugin -> folder
    lost: list[InstanceRecord] = field(default_factory=list)  # died while unwatched
    # alive but not adoptable, so killed: each with why
    killed: list[tuple[InstanceRecord, str]] = field(default_factory=list)

    @property
    def cgroups(self) -> set[str]:
        """Cgroup names the start-up sweep must keep."""
        return {
            instance_cgroup(s.record.plugin, s.record.index, s.record.slot)
            for s in self.adopt.values()
        }

    def indexes(self, config: Config) -> dict[str, list[int]]:
        """Each plugin's instance numbers: its survivors' (a swap numbers new instances
        on from the old ones), then the lowest free ones, up to its ``instances``."""
        out: dict[str, list[int]] = {}
        for name, cfg in config.plugins.items():
            taken = sorted(s.record.index for s in self.adopt.values() if s.record.plugin == name)
            free = (i for i in itertools.count() if i not in taken)
            out[name] = sorted([*taken, *itertools.islice(free, cfg.instances - len(taken))])
        return out

    def take(self, leaf: str) -> Survivor | None:
        return self.adopt.pop(leaf, None)

    def abandon(self, plugin: str | None = None) -> None:
        """Kill the survivors nobody claimed (of ``plugin``, or all)."""
        for leaf, survivor in list(self.adopt.items()):
            if plugin is None or survivor.record.plugin == plugin:
                _kill(survivor.record, survivor.pidfd)
                del self.adopt[leaf]


def reload_survivors(sup: Supervisor) -> None:
    """Load again, from their folders, the plugins loaded at run time whose processes
    survive; each is adopted as it starts. One that cannot be loaded (what it requires is
    gone) has its process killed."""
    pending = dict(sup.survivors.reload)
    sup.survivors.reload.clear()
    while pending:  # one may require another: load what can be, until nothing more can
        errors: dict[str, str] = {}
        for plugin, folder in list(pending.items()):
            try:
                load_plugin(sup, folder)
            except ControlError as exc:
                errors[plugin] = str(exc)
            else:
                del pending[plugin]
        if len(errors) == len(pending):
            for plugin, why in errors.items():
                log.warning("%s cannot be loaded again (%s); killing its process", plugin, why)
                sup.survivors.abandon(plugin)
            return


def find_survivors(config: Config) -> Survivors:
    """Sort out the previous daemon's processes (see the module docstring); kills the
    ones that cannot be adopted and removes output FIFOs nobody writes any more."""
    runtime_dir = config.daemon.runtime_dir
    found = Survivors()
    for record in sorted(load(runtime_dir), key=lambda r: (r.plugin, r.index)):
        pidfd = verify(record)
        if pidfd is None:
            found.lost.append(record)
            continue
        why = _not_adoptable(config, record, found)
        if why:
            log.warning(
                "%s (pid %d) from the previous daemon is %s: killing it",
                record.leaf,
                record.pid,
                why,
            )
            _kill(record, pidfd)
            found.killed.append((record, why))
            continue
        cfg = config.plugins.get(record.plugin)
        mine = sum(1 for s in found.adopt.values() if s.record.plugin == record.plugin)
        if cfg is not None and mine >= cfg.instances:
            log.warning(
                "%s (pid %d) from the previous daemon is beyond the config's %d instance(s):"
                " killing it",
                record.leaf,
                record.pid,
                cfg.instances,
            )
            _kill(record, pidfd)
            found.killed.append((record, f"beyond the config's {cfg.instances} instance(s)"))
            continue
        found.adopt[record.leaf] = Survivor(record, pidfd)
        if record.plugin not in config.plugins:
            found.reload[record.plugin] = record.loaded_from
    killed = [record for record, _ in found.killed]
    for record in (*found.lost, *killed):  # loaded at run time: loaded again, afresh
        if record.loaded_from and record.plugin not in config.plugins:
            loaded = loaded_plugin(record.loaded_from)
            if loaded is not None and loaded[0] == record.plugin:
                found.reload.setdefault(record.plugin, record.loaded_from)
    for record in found.lost:
        log.warning(
            "%s (pid %d) died while no daemon watched it; it starts again",
            record.leaf,
            record.pid,
        )
    keep = {  # an adopted life's FIFOs and heartbeat page; nothing else survives
        p
        for s in found.adopt.values()
        for p in (s.record.stdout, s.record.stderr, str(beat_path(Path(s.record.stdout))))
    }
    out = output_dir(runtime_dir)
    if out.is_dir():
        for path in out.iterdir():
            if str(path) not in keep:
                path.unlink(missing_ok=True)
    if found.adopt:
        log.info("re-adopting %d plugin process(es)", len(found.adopt))
    return found


def _not_adoptable(config: Config, record: InstanceRecord, found: Survivors) -> str:
    cfg = config.plugins.get(record.plugin)
    if cfg is None and record.loaded_from:  # loaded at run time: as its folder says now
        loaded = loaded_plugin(record.loaded_from)
        if loaded is None or loaded[0] != record.plugin:
            return f"loaded from {record.loaded_from}, which no longer holds it"
        cfg = loaded[1]
    if cfg is None:
        return "no longer in the config"
    if str(cfg.version) != record.version:
        return f"version {record.version}, the config now wants {cfg.version}"
    if config_fingerprint(cfg) != record.fingerprint:
        return "started with another config"
    if record.daemon != daemon_fingerprint(config):
        return "started under other daemon settings or another daemon version"
    if record.state != State.READY.value:
        return f"caught {record.state}"
    if record.leaf in found.adopt:
        return "a duplicate record"
    return ""


def _kill(record: InstanceRecord, pidfd: int) -> None:
    """SIGKILL the process through its pidfd (never a reused pid), then its group (each
    plugin leads its session). The group is signalled only if the leader was alive an
    instant before: dying, it still holds the group's id, which is then not reused."""
    try:
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    except ProcessLookupError:
        return
    else:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(record.pid, signal.SIGKILL)
    finally:
        os.close(pidfd)
