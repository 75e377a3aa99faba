"""The driver of dependencies: start gating, graceful degradation and boot rollback.

Theory of operation
-------------------
The supervisor calls ``refresh(plugin)`` whenever an instance of ``plugin`` changes life
state or health. The plugin's status is recomputed from its instances (``plugin_status``);
only a change is passed on, to two pure cores:

- the ``StartGate``, which holds the start of instances whose required plugins are not up
  and releases them when they are (the supervisor feeds the released instances their
  ``StartRequested``);
- the ``DependencyTracker``, whose effects are performed here: ``MarkDegraded`` /
  ``ClearDegraded`` change what status shows for the dependent, ``Notify`` sends each live
  instance of the dependent an EVENT frame (``dependency_down`` / ``dependency_up``, which
  the SDK turns into a call of the plugin's hook of that name) and publishes the
  ``plugin:dependency-down`` / ``plugin:dependency-up`` event.

Boot: until every plugin has been up once, the daemon is booting. With
``daemon.rollback_on_failure``, a ``critical`` plugin whose instance ends before it was
ever ready fails the boot: ``boot_failed`` names why and the supervisor stops everything,
dependents first, and the daemon exits with that reason.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from osk_daemon.ipc.codec import Header, Kind, pack
from osk_daemon.supervisor import lifecycle as lc
from osk_daemon.supervisor.dependencies import (
    STOPPED,
    ClearDegraded,
    DependencyGraph,
    DependencyStatusChanged,
    DependencyTracker,
    MarkDegraded,
    Notify,
    Status,
)
from osk_daemon.supervisor.start_gate import UP_STATUSES, StartGate, plugin_status
from osk_daemon.supervisor.tree_types import LeafState
from osk_daemon.versioning.planning import StartPlan
from osk_daemon.worker.sdk import HealthStatus

if TYPE_CHECKING:
    from osk_daemon.supervisor.instance import Instance
    from osk_daemon.supervisor.runtime import Supervisor

log = logging.getLogger("osk.dependencies")

_STARTING = frozenset({lc.State.LOADING, lc.State.INITIALIZING})
_TO_START = frozenset({LeafState.STARTING, LeafState.RESTARTING})


class DependencyWatch:
    def __init__(self, supervisor: Supervisor, plan: StartPlan) -> None:
        self._sup = supervisor
        self._status: dict[str, Status] = {}
        self._ever_up: set[str] = set()
        self.boot_failure: str | None = None
        self.rolled_back: list[str] = []  # what a failed boot stopped, dependents first
        self.gate = StartGate({})
        self.replan(plan)

    def replan(self, plan: StartPlan) -> None:
        """A reload changed the plugins or their requirements: rebuild the graph, then
        recompute every plugin's status (an unchanged one keeps its verdict)."""
        self.plan = plan
        plugins = list(plan.config.plugins)
        held = self.gate.held_leaves()
        edges = [(p, d, False) for p in plugins for d in sorted(plan.requires.get(p, ()))]
        edges += [(p, d, True) for p in plugins for d in sorted(plan.optional.get(p, ()))]
        self.tracker = DependencyTracker(DependencyGraph(plugins, edges, plan.offline_capable))
        self.gate = StartGate({p: plan.requires.get(p, frozenset()) for p in plugins})
        known = self._status
        self._status = {}
        self._ever_up &= set(plugins)
        for plugin in plugins:
            if plugin in known:
                self.refresh(plugin)
        for leaf, plugin in held:  # what waited under the old graph asks the new one
            inst = self._sup.instances.get(leaf)
            if (
                inst is not None
                and plugin in plan.config.plugins
                and self.gate.request(leaf, plugin)
            ):
                self._sup.feed(inst, lc.StartRequested())

    # ---- queries for status and oskctl graph --------------------------------------------

    @property
    def booting(self) -> bool:
        return len(self._ever_up) < len(self.plan.config.plugins)

    def status_of(self, plugin: str) -> Status:
        return self._status.get(plugin, HealthStatus.UNKNOWN)

    def overlay(self, inst: Instance, row: dict[str, Any]) -> dict[str, Any]:
        """Add what dependencies do to an instance's status row."""
        row["waiting_for"] = []
        if self.gate.held(inst.leaf):
            row["state"] = "waiting"
            row["waiting_for"] = list(self.gate.waiting_for(inst.plugin))
            row["detail"] = f"waiting for {', '.join(row['waiting_for'])}"
        degraded = self.tracker.is_degraded(inst.plugin)
        row["degraded_by"] = list(self.tracker.down_requirements(inst.plugin)) if degraded else []
        if row["degraded_by"] and row["health"] in (HealthStatus.HEALTHY, HealthStatus.RECOVERING):
            row["health"] = HealthStatus.DEGRADED.value
            row["detail"] = self.tracker.explain(inst.plugin)
        return row

    def graph(self) -> dict[str, Any]:
        """What ``oskctl graph`` shows: plugins by start wave, their edges and status."""
        rows = []
        for wave, names in enumerate(self.plan.waves):
            for name in names:
                status = str(self.status_of(name))
                leaves = [i for i in self._sup.instances.values() if i.plugin == name]
                if leaves and all(self.gate.held(i.leaf) for i in leaves):
                    status = "waiting"
                elif self.tracker.is_degraded(name) and status in UP_STATUSES:
                    status = HealthStatus.DEGRADED.value
                rows.append(
                    {
                        "name": name,
                        "version": self.plan.config.plugins[name].version,
                        "wave": wave,
                        "requires": sorted(self.plan.requires.get(name, ())),
                        "optional": sorted(self.plan.optional.get(name, ())),
                        "status": status,
                        "degraded_by": list(self.tracker.down_requirements(name))
                        if self.tracker.is_degraded(name)
                        else [],
                        "offline_capable": name in self.plan.offline_capable,
                        "pulled_in": name in self.plan.pulled_in,
                    }
                )
        return {"plugins": rows, "waves": self.plan.waves}

    # ---- the supervisor's hooks ---------------------------------------------------------

    def may_start(self, inst: Instance) -> bool:
        """The tree wants ``inst`` started: True to go ahead, False if it is held."""
        if self.gate.request(inst.leaf, inst.plugin):
            return True
        waiting = self.gate.waiting_for(inst.plugin)
        log.info("%s waits for %s", inst.leaf, ", ".join(waiting))
        self._sup.publish(inst, "plugin:waiting", waitingFor=list(waiting))
        return False

    def cancel(self, inst: Instance) -> bool:
        """``inst`` is being stopped: forget it if it is held. True if it was."""
        if not self.gate.cancel(inst.leaf):
            return False
        self.refresh(inst.plugin)
        return True

    def life_ended(self, inst: Instance) -> None:
        """Check for a failed boot: a critical plugin that never became ready."""
        d = self._sup.config.daemon
        if (
            self.boot_failure is None
            and d.rollback_on_failure
            and inst.config.critical
            and self.booting
            and inst.plugin not in self._ever_up
            and not inst.life.stop_requested
        ):
            why = inst.life.failure or lc.describe_exit(inst.life.last_exit)
            self.boot_failure = f"critical plugin {inst.leaf} failed to start: {why}"
            started = {i.plugin for i in self._sup.instances.values() if i.live}
            self.rolled_back = [
                p for wave in reversed(self.plan.waves) for p in wave if p in started
            ]
            log.error("%s; rolling back: %s", self.boot_failure, ", ".join(self.rolled_back))

    def refresh(self, plugin: str) -> None:
        """Recompute ``plugin``'s status; pass a change on to the gate and the tracker.
        Not while the daemon shuts down: everything goes down then, and nothing restarts."""
        if self._sup.shutting_down:
            return
        status = plugin_status(
            self._instance_status(i) for i in self._sup.instances.values() if i.plugin == plugin
        )
        if self._status.get(plugin) == status:
            return
        self._status[plugin] = status
        up = status in UP_STATUSES
        if up:
            self._ever_up.add(plugin)
        for effect in self.tracker.step(DependencyStatusChanged(plugin, status)):
            if isinstance(effect, MarkDegraded):
                log.warning("%s", self.tracker.explain(effect.plugin))
            elif isinstance(effect, ClearDegraded):
                log.info("%s is no longer degraded", effect.plugin)
            elif isinstance(effect, Notify):
                self._notify(effect)
        for leaf in self.gate.set_up(plugin, up):
            inst = self._sup.instances[leaf]
            log.info("%s: what it requires is up; starting it", leaf)
            self._sup.feed(inst, lc.StartRequested())

    def _instance_status(self, inst: Instance) -> Status:
        state = inst.life.state
        if state is lc.State.READY:
            return inst.health.status
        if state in _STARTING or self.gate.held(inst.leaf):
            return HealthStatus.UNKNOWN  # no verdict yet: the tracker keeps its last one
        if inst.health.status is HealthStatus.FAILED and not inst.life.stop_requested:
            return HealthStatus.FAILED  # crashed, hung or failed its checks
        if self._sup.tree.leaf_state(inst.leaf) in _TO_START:
            return HealthStatus.UNKNOWN  # about to be started
        return STOPPED

    def _notify(self, effect: Notify) -> None:
        body = pack({"dependency": effect.dependency, "optional": effect.optional})
        header = Header(Kind.EVENT, method=effect.event)
        for inst in self._sup.instances.values():
            if inst.plugin == effect.plugin and inst.life.state is lc.State.READY:
                self._sup.broker.send_to(inst.key, header, body)
                self._sup.publish(
                    inst,
                    f"plugin:{effect.event.replace('_', '-')}",
                    dependency=effect.dependency,
                    optional=effect.optional,
                )
