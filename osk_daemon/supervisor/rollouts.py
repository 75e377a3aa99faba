"""The driver of version swaps: one ``rollout.engine.Rollout`` per plugin being swapped.

Theory of operation
-------------------
``Rollouts.deploy`` checks the request (the version must be installed or be the config's
own; one rollout per plugin at a time), builds the canary's ``PluginConfig`` and an engine,
and performs the engine's effects:

- ``StartInstances``: a new instance record (and tree leaf) per instance at once, so the
  next observation counts it, and its start. The broker routes to it only once it is
  ready *and healthy* (the recount that sees it so lets it in), and under the weights
  of a weighted strategy, which hold the stable version at 100 % until then. With
  ``preserve_state`` it takes the other role's state when its worker asks for it
  (``supervisor.handover``), before its ``start()``.
- ``StopInstances``: pick instances of the role (not-ready ones first, then those a new
  instance replaces, newest first), mark them retiring (one whose replacement has not
  asked for its state yet exports it first, for the replacement to take), drain them in
  the broker (no new requests; the future resolves when their in-flight requests are
  answered, bounded by ``drain_timeout``), stop them through the tree and remove their
  leaves.
- ``SetWeights``: the broker's traffic split for the plugin (None: by ready instances).
- ``Analyze``: judge the canary against the stable version over the window from the
  broker's per-version ``Recorder``; the verdict goes back to the engine.
- ``ArmTimer`` / ``Publish``: loop timers, and events (``rollout:*``) on the event stream.

The supervisor calls ``changed(inst)`` on every life or health change; the driver
recounts the plugin's instances by role (``Observed``) and reports a canary instance
that ended on its own as ``CanaryFailed``. An instance the rollout started counts as
ready once it is healthy and ``rollout.min_ready`` seconds have passed since its READY
(Kubernetes' ``minReadySeconds``): it takes calls once healthy, but old instances are
retired, and steps taken, only then, so one that crashes soon after its start rolls the
swap back with the old ones still up. A timer recounts when the first of them comes of
age. When the engine succeeds, the plugin's running config becomes the canary's; when it
rolls back, nothing of the canary is left.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import anyio

from osk_daemon.config import PluginConfig
from osk_daemon.errors import ControlError
from osk_daemon.rollout.analysis import AnalysisPolicy, Recorder, Verdict, judge, judge_health
from osk_daemon.rollout.engine import (
    AnalysisDone,
    Analyze,
    ArmTimer,
    CanaryFailed,
    Effect,
    Observed,
    Publish,
    Rollout,
    SetWeights,
    StartInstances,
    State,
    StopInstances,
    TimerFired,
)
from osk_daemon.rollout.plan import Role, RolloutSpec, Strategy
from osk_daemon.supervisor import lifecycle as lc
from osk_daemon.supervisor.handover import export_state
from osk_daemon.supervisor.instance import Instance
from osk_daemon.supervisor.priority import GENTLE_NICE, renice
from osk_daemon.supervisor.start_gate import UP_STATUSES
from osk_daemon.supervisor.tree_types import LeafState

if TYPE_CHECKING:
    from osk_daemon.supervisor.runtime import Supervisor

log = logging.getLogger("osk.rollout")

__all__ = ["RolloutRun", "Rollouts"]


class RolloutRun:
    """One plugin's rollout: the engine, the canary config, timers and the recorder."""

    def __init__(
        self, sup: Supervisor, spec: RolloutSpec, canary: PluginConfig, drain_timeout: float
    ) -> None:
        self._sup = sup
        self.spec = spec
        self.canary_config = canary
        self.stable_config = sup.config.plugins[spec.plugin]
        self.engine = Rollout(spec)
        self.drain_timeout = drain_timeout
        self.recorder = Recorder()
        r = canary.rollout
        self.policy = AnalysisPolicy(
            min_requests=r.min_requests,
            max_error_rate_increase=r.max_error_rate_increase,
            max_latency_ratio=r.max_latency_ratio,
            latency_floor=r.latency_floor,
        )
        self.started_at = time.monotonic()
        self.min_ready = r.min_ready
        self._loop_timer: Any = None
        self._recount: asyncio.TimerHandle | None = None  # when an instance comes of age
        self._started: set[str] = set()  # leaves of the instances this rollout started
        # the instances those replace: donor leaf -> the new instance that takes its place
        self._replacements: dict[str, Instance] = {}
        self._retiring: set[str] = set()
        self._held_end: Publish | None = None  # the end, once the retiring are gone
        self._span: Any = None  # tracing: the whole rollout
        self.finished = anyio.Event()

    # ---- what the supervisor tells us ---------------------------------------------------

    def role_of(self, inst: Instance) -> Role:
        """Canary: the instances this rollout started (their config is its canary config,
        which may keep the version and change only settings, as a reload does)."""
        return Role.CANARY if inst.config is self.canary_config else Role.STABLE

    def observed(self) -> Observed:
        """The instances by role, and how many of them are ready: ready and healthy, for
        ``min_ready`` seconds if this rollout started them (a recount is armed for the
        first one not yet)."""
        counts = {Role.STABLE: [0, 0], Role.CANARY: [0, 0]}
        now = time.monotonic()
        of_age: float | None = None  # seconds until the next one has been ready long enough
        for inst in self._sup.members.of_plugin(self.spec.plugin):
            if inst.retiring:
                continue
            role = self.role_of(inst)
            counts[role][1] += 1
            if inst.life.state is lc.State.READY and inst.health.status in UP_STATUSES:
                self._let_in(inst)
                ready_for = now - (inst.ready_at or now)
                left = self.min_ready - ready_for if inst.leaf in self._started else 0.0
                if left > 0:
                    of_age = left if of_age is None else min(of_age, left)
                else:
                    counts[role][0] += 1
        if of_age is not None:
            self._recount_in(of_age)
        (sr, st), (cr, ct) = counts[Role.STABLE], counts[Role.CANARY]
        return Observed(sr, st, cr, ct)

    def _let_in(self, inst: Instance) -> None:
        """Route calls to ``inst``, a new instance held until it is ready and healthy."""
        if inst.traffic_held:
            inst.traffic_held = False
            self._sup.broker.set_ready(inst.key, True)

    def _recount_in(self, delay: float) -> None:
        when = self._sup.loop.time() + delay + 0.001  # past the boundary, not on it
        if self._recount is not None and self._recount.when() <= when:
            return
        if self._recount is not None:
            self._recount.cancel()
        self._recount = self._sup.loop.call_at(when, self._recounted)

    def _recounted(self) -> None:
        self._recount = None
        if self.engine.state not in (State.SUCCEEDED, State.ROLLED_BACK):
            self.perform(self.engine.observe(self.observed()))

    def changed(self, inst: Instance) -> None:
        if self.engine.state in (State.SUCCEEDED, State.ROLLED_BACK):
            return
        life = inst.life
        if (
            self.role_of(inst) is Role.CANARY
            and not inst.retiring
            and life.state in (lc.State.UNLOADED, lc.State.FAILED)
            and not life.stop_requested
        ):
            why = life.failure or lc.describe_exit(life.last_exit)
            self.perform(self.engine.canary_failed(CanaryFailed(f"{inst.leaf}: {why}")))
        self.perform(self.engine.observe(self.observed()))

    def command(self, name: str) -> dict[str, Any]:
        """pause | resume | promote | abort; raises RolloutCommandError where it cannot apply."""
        actions: dict[str, Callable[[], list[Effect]]] = {
            "pause": self.engine.pause,
            "resume": self.engine.resume,
            "promote": self.engine.promote,
            "abort": self.engine.abort,
        }
        if name not in actions:
            raise ControlError(f"unknown rollout command '{name}' (known: {', '.join(actions)})")
        self.perform(actions[name]())
        self.perform(self.engine.observe(self.observed()))
        return self.status()

    # ---- effects --------------------------------------------------------------------------

    def begin(self) -> None:
        if self._sup.tracer is not None:
            self._span = self._sup.tracer.begin(
                f"osk.rollout {self.spec.plugin}",
                **{
                    "osk.stable": self.spec.stable,
                    "osk.canary": self.spec.canary,
                    "osk.strategy": str(self.spec.strategy),
                },
            )
        self._sup.broker.set_recorder(self.spec.plugin, self.recorder)
        self.perform(self.engine.begin())
        self.perform(self.engine.observe(self.observed()))

    def perform(self, effects: list[Effect]) -> None:
        for effect in effects:
            if isinstance(effect, StartInstances):
                for _ in range(effect.count):
                    self._start(effect.role)
            elif isinstance(effect, StopInstances):
                for inst in self._pick(effect.role, effect.count):
                    inst.retiring = True
                    self._retiring.add(inst.leaf)
                    self._sup.spawn_task(self._retire, inst, time.monotonic())
            elif isinstance(effect, SetWeights):
                self._set_weights(effect.weights)
            elif isinstance(effect, ArmTimer):
                if self._loop_timer is not None:
                    self._loop_timer.cancel()
                self._loop_timer = self._sup.loop.call_later(
                    effect.delay, self._timer, effect.token
                )
            elif isinstance(effect, Analyze):
                self._sup.loop.call_soon(self._analyze, effect.window)
            elif isinstance(effect, Publish):
                self._publish(effect)

    def _timer(self, token: int) -> None:
        self._loop_timer = None
        self.perform(self.engine.timer_fired(TimerFired(token)))

    def _analyze(self, window: float) -> None:
        since = time.monotonic() - window
        stable = self.recorder.window(self.spec.stable, since)
        canary = self.recorder.window(self.spec.canary, since)
        verdict = judge(stable, canary, self.policy)
        if verdict.passed:
            verdict = self._judge_health() or verdict
        log.info("%s: analysis of %s: %s", self.spec.plugin, self.spec.canary, verdict.reason)
        self.perform(self.engine.analysis_done(AnalysisDone(verdict.passed, verdict.reason)))

    def _judge_health(self) -> Verdict | None:
        """A failing verdict if a canary instance is unhealthy, or degraded while no stable
        one is (``rollout.analysis.judge_health``), else None."""
        by_role: dict[Role, list[Instance]] = {Role.STABLE: [], Role.CANARY: []}
        for inst in self._sup.members.of_plugin(self.spec.plugin):
            if not inst.retiring:
                by_role[self.role_of(inst)].append(inst)
        verdict = judge_health(
            [i.health.status.value for i in by_role[Role.STABLE]],
            [(i.leaf, i.health.status.value, i.health.detail) for i in by_role[Role.CANARY]],
        )
        return None if verdict.passed else verdict

    def _set_weights(self, weights: tuple[int, int] | None) -> None:
        s = self.spec
        split = None if weights is None else {s.stable: weights[0], s.canary: weights[1]}
        self._sup.broker.set_split(s.plugin, split, order=[s.canary, s.stable])

    def status(self) -> dict[str, Any]:
        """The engine's status; ``finishing`` while the engine is done but instances it
        stopped have not exited yet."""
        status = self.engine.status()
        if self._held_end is not None:
            status["state"] = "finishing"
        return status

    def _publish(self, effect: Publish) -> None:
        if effect.event in ("rollout:succeeded", "rollout:rolled-back") and self._retiring:
            self._held_end = effect  # published when the last of them has exited
            return
        detail = {k: v for k, v in effect.detail.items() if k != "state"}
        self._sup.events.publish(
            effect.event,
            pluginName=self.spec.plugin,
            stable=self.spec.stable,
            canary=self.spec.canary,
            strategy=str(self.spec.strategy),
            **detail,
        )
        if effect.event in ("rollout:succeeded", "rollout:rolled-back"):
            self._finish(succeeded=effect.event == "rollout:succeeded")

    def _finish(self, succeeded: bool) -> None:
        for timer in (self._loop_timer, self._recount):
            if timer is not None:
                timer.cancel()
        for inst in self._sup.members.of_plugin(self.spec.plugin):
            if inst.life.state is lc.State.READY:
                self._let_in(inst)  # whatever it kept, a READY instance serves again
            else:
                inst.traffic_held = False  # a later READY lets it in
        plugin = self.spec.plugin
        if succeeded:
            self._sup.members.adopt(plugin, self.canary_config)
            self._sup.broker.set_split(plugin, None)
        else:
            self._sup.broker.set_split(plugin, None)
            log.warning("%s: rolled back to %s: %s", plugin, self.spec.stable, self.engine.reason)
        self._sup.broker.set_recorder(plugin, None)
        if self._span is not None:
            self._span.set_attribute("osk.outcome", "succeeded" if succeeded else "rolled-back")
            self._span.end()
        self.finished.set()

    # ---- instances ------------------------------------------------------------------------

    def _pick(self, role: Role, count: int) -> list[Instance]:
        mine = [
            i
            for i in self._sup.members.of_plugin(self.spec.plugin)
            if not i.retiring and self.role_of(i) is role
        ]
        # not-ready ones first (stopping them costs no availability), then those whose
        # state a new instance took over, newest first (the order donors are chosen in)
        mine.sort(
            key=lambda i: (
                i.life.state is lc.State.READY,
                i.leaf not in self._replacements,
                -i.index,
            )
        )
        return mine[:count]

    def _start(self, role: Role) -> None:
        cfg = self.canary_config if role is Role.CANARY else self.stable_config
        inst = self._sup.members.add(self.spec.plugin, cfg)
        inst.traffic_held = True
        self._started.add(inst.leaf)
        donor = self._donor_for(role)
        if donor is not None:  # it takes that one's place: its state, its state file
            inst.state_slot, inst.handover_donor = donor.state_index, donor.index
            self._replacements[donor.leaf] = inst
        if cfg.preserve_state and cfg.state_strategy != "none":
            inst.handover_from = self.spec.stable if role is Role.CANARY else self.spec.canary
        # started in the next loop pass, not here: a start reports back (changed ->
        # observe -> perform) and must not re-enter this batch of effects half done
        self._sup.loop.call_soon(self._start_added, inst)

    def _start_added(self, inst: Instance) -> None:
        if self._sup.instances.get(inst.leaf) is inst and not inst.retiring:
            self._sup.members.start(inst)

    def _donor_for(self, role: Role) -> Instance | None:
        """The instance of the other role a new one of ``role`` replaces: a ready one not
        yet replaced, newest first, as ``_pick`` retires them (each old instance's state
        goes to one new instance: N instances hand over N states, not one N times)."""
        others = [
            i
            for i in self._sup.members.of_plugin(self.spec.plugin)
            if self.role_of(i) is not role and not i.retiring and i.leaf not in self._replacements
        ]
        others.sort(key=lambda i: (i.life.state is not lc.State.READY, -i.index))
        return others[0] if others else None

    async def _stash_state(self, donor: Instance) -> None:
        """A donor retiring before its replacement asked for its state (the engine may
        stop one in the same step as it starts another, ``max_unavailable``): export its
        state now, before its drain, for the replacement to take when it asks (it lacks
        the calls the donor answers while it drains)."""
        new = self._replacements.get(donor.leaf)
        if new is None or new.handover_from is None or new.handover_stash is not None:
            return
        if donor.life.state is not lc.State.READY:
            return  # it cannot export; the replacement takes another one's state
        body, why = await export_state(
            self._sup, self.spec.plugin, str(donor.config.version), donor.index
        )
        if why:
            log.warning("%s: its state could not be kept for %s: %s", donor.leaf, new.leaf, why)
        elif new.handover_from is not None:  # it has not asked meanwhile
            new.handover_stash = body

    async def _retire(self, inst: Instance, since: float) -> None:
        """Drain, then stop ``inst``. The ``rollout:drained`` event says how long the
        cut-over took: from the decision to stop it to its last request answered."""
        await self._stash_state(inst)  # while calls still reach it (a drained one: none)
        in_flight = self._sup.broker.in_flight(inst.key)  # what the drain waits for
        drained = await self._sup.members.drain(inst, self.drain_timeout)
        if inst.life.pid is not None:  # its stop and exit need not compete with serving
            renice(inst.life.pid, GENTLE_NICE)
        if not drained:
            log.warning(
                "%s: still busy after the %gs drain timeout; stopping it anyway",
                inst.leaf,
                self.drain_timeout,
            )
        drain_ms = round((time.monotonic() - since) * 1000, 3)
        await self._sup.members.remove(inst)
        self._sup.events.publish(
            "rollout:drained",
            pluginName=self.spec.plugin,
            instance=inst.index,
            version=str(inst.config.version),
            drain_ms=drain_ms,
            in_flight=in_flight,
            stopped_ms=round((time.monotonic() - since) * 1000, 3),
            timed_out=not drained,
        )
        self._retiring.discard(inst.leaf)
        self.perform(self.engine.observe(self.observed()))
        if not self._retiring and self._held_end is not None:
            end, self._held_end = self._held_end, None
            self._publish(end)


class Rollouts:
    """The rollouts of one supervisor: at most one running per plugin, plus the last one."""

    def __init__(self, sup: Supervisor) -> None:
        self._sup = sup
        self.runs: dict[str, RolloutRun] = {}

    def changed(self, inst: Instance) -> None:
        run = self.runs.get(inst.plugin)
        if run is not None:
            run.changed(inst)

    def running(self, plugin: str) -> RolloutRun | None:
        """The rollout of ``plugin`` that has not finished yet, if any."""
        run = self.runs.get(plugin)
        return run if run is not None and not run.finished.is_set() else None

    def refuse_while_running(self, plugins: Iterable[str], what: str) -> None:
        """Raise ControlError naming the first of ``plugins`` a rollout is moving."""
        for plugin in plugins:
            run = self.running(plugin)
            if run is not None:
                raise ControlError(
                    f"cannot {what}: a rollout of '{plugin}' to {run.spec.canary} is "
                    f"{run.engine.state}; abort it (oskctl rollout abort {plugin}) or let "
                    "it end first"
                )

    def get(self, plugin: str) -> RolloutRun:
        run = self.runs.get(plugin)
        if run is None:
            if plugin not in self._sup.config.plugins:
                raise ControlError(f"no plugin named '{plugin}'")
            raise ControlError(f"no rollout of '{plugin}' has run since the daemon started")
        return run

    def deploy(self, plugin: str, canary: PluginConfig, spec: RolloutSpec) -> RolloutRun:
        """Start a rollout; raises ControlError if one of this plugin is still running."""
        current = self.running(plugin)
        if current is not None:
            raise ControlError(
                f"a rollout of '{plugin}' to {current.spec.canary} is {current.engine.state}; "
                "abort or promote it first"
            )
        live = [i for i in self._sup.members.of_plugin(plugin) if not i.retiring]
        if any(self._sup.tree.leaf_state(i.leaf) is LeafState.STOPPED for i in live):
            raise ControlError(f"'{plugin}' has stopped instances; start it before deploying")
        run = RolloutRun(self._sup, spec, canary, canary.rollout.drain_timeout)
        self.runs[plugin] = run
        log.info(
            "%s: %s rollout %s -> %s (%d instance(s))",
            plugin,
            spec.strategy,
            spec.stable,
            spec.canary,
            spec.instances,
        )
        run.begin()
        return run

    def statuses(self) -> list[dict[str, Any]]:
        return [run.status() for run in self.runs.values()]


def spec_for(
    plugin: str, stable: PluginConfig, canary: PluginConfig, overrides: dict[str, Any]
) -> RolloutSpec:
    """The rollout's parameters: the canary config's ``rollout`` table, then ``overrides``
    (from ``oskctl deploy``). Raises ControlError for a bad value."""
    r = canary.rollout
    fields: dict[str, Any] = {
        "strategy": Strategy(str(overrides.get("strategy") or r.strategy)),
        "instances": stable.instances,
        "max_surge": r.max_surge,
        "max_unavailable": r.max_unavailable,
        "steps": tuple(overrides.get("steps") or r.steps),
        "analysis_window": float(overrides.get("analysis_window") or r.analysis_window),
        "ab_split": r.ab_split,
        "progress_deadline": r.progress_deadline,
    }
    for key in ("instances", "max_surge", "max_unavailable", "ab_split"):
        if overrides.get(key) is not None:
            fields[key] = overrides[key]
    try:
        return RolloutSpec(plugin, str(stable.version), str(canary.version), **fields)
    except (ValueError, TypeError) as exc:
        raise ControlError(f"cannot deploy {plugin}: {exc}") from exc
