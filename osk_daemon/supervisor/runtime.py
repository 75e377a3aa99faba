"""The one async driver: it feeds events to the pure cores and performs their effects.

Theory of operation
-------------------
Everything here runs on the daemon's asyncio loop, and every input becomes an event
for a core: a child's exit (from the reaper), a worker's frame (from the broker), a
timer, an operator's command. The driver applies it to the instance's ``Lifecycle``,
performs the effects (spawn, STOP frame, signal, timers, publish), and when a life
ends tells the ``Tree``, whose effects (start, stop, restart timers) it performs in
turn (``tree_effects``). Only stops are awaited: a batch of StopChild effects runs in its
own task, one after the other (children stop in reverse start order), everything else is
immediate. Which instances exist, and operator commands on them, is ``membership``'s:
rollouts add and remove instances at run time.

Signals go to the instance's process group (each plugin is its own session), so a
plugin's own children die with it. The daemon is a child subreaper and every plugin
its direct child, so exits are reaped with their exact code or signal.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio
import zmq
from anyio.abc import TaskGroup

from osk_daemon.config import SpawnMode
from osk_daemon.errors import ControlError, OskError
from osk_daemon.ipc.broker import Broker, InstanceKey
from osk_daemon.ipc.codec import Header, Kind, unpack
from osk_daemon.observability.event_pub import EventPublisher
from osk_daemon.supervisor import lifecycle as lc
from osk_daemon.supervisor.adoption import Survivors, reload_survivors
from osk_daemon.supervisor.confinement import Confinement
from osk_daemon.supervisor.dependency_watch import DependencyWatch
from osk_daemon.supervisor.events import EventStream
from osk_daemon.supervisor.handover import hand_over
from osk_daemon.supervisor.health_checks import HealthChecks
from osk_daemon.supervisor.hot_reload import HotReloads
from osk_daemon.supervisor.instance import Instance
from osk_daemon.supervisor.membership import Membership
from osk_daemon.supervisor.output import LogRing
from osk_daemon.supervisor.priority import GENTLE_NICE, renice
from osk_daemon.supervisor.processes import InstanceProcesses, killpg, killpg_only
from osk_daemon.supervisor.reaper import ChildReaper
from osk_daemon.supervisor.rollouts import Rollouts
from osk_daemon.supervisor.runtime_state import StateFile, daemon_fingerprint
from osk_daemon.supervisor.spawner import Spawner
from osk_daemon.supervisor.standby import Standbys
from osk_daemon.supervisor.tree import (
    LeafState,
    Tree,
)
from osk_daemon.supervisor.tree_build import build_tree
from osk_daemon.supervisor.tree_effects import TreeEffects
from osk_daemon.supervisor.updates import Updates
from osk_daemon.versioning.planning import StartPlan

if TYPE_CHECKING:  # opentelemetry is imported only when tracing is on
    from osk_daemon.observability.tracing import RpcTracer

log = logging.getLogger("osk.supervisor")


@dataclass(frozen=True)
class Endpoints:
    """Where the broker listens: callers on ``clients``, plugin processes on ``workers``."""

    clients: str
    workers: str


_SAMPLE_EVERY = 1.0  # seconds between cgroup usage samples
_SAMPLE_MOST = 25  # instances sampled per tick: beyond 25, each one every N/25 seconds
_RUNNING_LEAF = frozenset({LeafState.STARTING, LeafState.RUNNING, LeafState.RESTARTING})


class Supervisor:
    """Runs the plugins of one config. Create inside the daemon's task group."""

    def __init__(
        self,
        plan: StartPlan,
        tg: TaskGroup,
        reaper: ChildReaper,
        spawners: dict[SpawnMode, Spawner],
        endpoints: Endpoints,
        confinement: Confinement,
        survivors: Survivors | None = None,
    ) -> None:
        config = plan.config
        self.config = config
        self.file_plan = plan  # the config file as last loaded: what a reload diffs against
        self.confinement = confinement
        self.events = EventStream()
        self.logs: dict[str, LogRing] = {}
        self.instances: dict[str, Instance] = {}
        self._tg = tg
        self._reaper = reaper
        self._spawners = spawners
        self._endpoint = endpoints.workers
        self._loop = asyncio.get_running_loop()
        self._shutting_down = False
        self._all_stopped = asyncio.Event()
        self._changed = asyncio.Event()
        self._sampler: asyncio.TimerHandle | None = None
        self._request_stop: Callable[[], None] | None = None
        self.stopping = anyio.Event()
        self.event_pub: EventPublisher | None = None
        d = config.daemon
        self.broker = Broker(
            endpoints.clients,
            endpoints.workers,
            self._on_worker,
            max_message_size=int(d.max_message_size),
            default_timeout=d.call_timeout,
        )
        # what a previous daemon left running, and what the next one will find
        self.survivors = survivors or Survivors()
        indexes = self.survivors.indexes(config)  # adopted instances keep their numbers
        for name, pcfg in config.plugins.items():
            self.logs[name] = LogRing(d.log_buffer_lines)
            self.broker.declare(name)
            for i in indexes[name]:
                inst = Instance.create(name, i, pcfg)
                self.instances[inst.leaf] = inst
                self.broker.set_version(inst.key, str(pcfg.version))
        self.tree: Tree = build_tree(config, indexes)
        self.checks = HealthChecks(self)
        self.tracer: RpcTracer | None = None
        t = config.tracing
        if t.exporter != "none":
            from osk_daemon.observability.tracing import RpcTracer, make_provider

            traces = str(t.file or d.runtime_dir / "traces.jsonl")
            provider = make_provider(t.exporter, "osk-daemon", traces, t.sample_ratio)
            self.tracer = self.broker.tracer = RpcTracer(provider) if provider else None
        self.deps = DependencyWatch(self, plan)
        self.rollouts = Rollouts(self)
        self.hot_reloads = HotReloads(self)
        self.reloading = anyio.Lock()  # one config reload at a time
        self.members = Membership(self)
        self.updates = Updates(self)
        self._tree_effects = TreeEffects(self)
        self.processes = InstanceProcesses(
            self, tg, reaper, spawners, endpoints.workers, confinement
        )
        self.standbys = Standbys(self, reaper)
        self.state_file = StateFile(d.runtime_dir, self._records)
        self.loaded: dict[str, str] = {}  # plugins loaded at run time -> their folders
        self._daemon_fingerprint = daemon_fingerprint(config)

    # ---- start, stop, operator commands ---------------------------------------------------

    def start(self, request_stop: Callable[[], None] | None = None) -> None:
        """Start every plugin. ``request_stop`` is called when the boot fails and the
        daemon should stop (``deps.boot_failure`` says why)."""
        self._request_stop = request_stop
        self.broker.start()
        self.event_pub = EventPublisher(
            zmq.Context.instance(), self.config.daemon.runtime_dir / "events.sock"
        )
        self.events.sinks.append(self.event_pub)
        self.checks.start()
        self._sampler = self._loop.call_later(_SAMPLE_EVERY, self._sample_tick)
        self.events.publish("kernel:before-init", pluginCount=len(self.config.plugins))
        for lost in self.survivors.lost:
            self.events.publish(
                "plugin:lost",
                pluginName=lost.plugin,
                instance=lost.index,
                pid=lost.pid,
                detail="died while no daemon watched it; starting it again",
            )
        for killed, why in self.survivors.killed:
            self.events.publish(
                "plugin:not-adopted",
                pluginName=killed.plugin,
                instance=killed.index,
                pid=killed.pid,
                detail=f"{why}: killed; starting it again",
            )
        self.apply_tree_effects(self.tree.start(time.monotonic()))
        reload_survivors(self)  # plugins a previous daemon had loaded at run time
        self.hot_reloads.sync()
        self._tg.start_soon(self.updates.run)
        if self.config.metrics.listen:
            # imported only when asked for: prometheus_client (with http.server, email,
            # ssl) adds ~10 MiB to the daemon's RSS
            from osk_daemon.observability.metrics import serve_metrics

            self._tg.start_soon(serve_metrics, self, self.config.metrics.listen)

    async def shutdown(self) -> None:
        """Stop every instance in reverse start order; SIGKILL what outlives the deadline."""
        self.stopping.set()  # file watchers end at once (they block in a thread)
        if not self._shutting_down:
            self._shutting_down = True
            self.standbys.drop_all("the daemon is shutting down")
            self.events.publish("kernel:shutdown", reason=self.deps.boot_failure or "requested")
            self.apply_tree_effects(self.tree.shutdown(time.monotonic()))
        self.check_all_stopped()
        with anyio.move_on_after(self.config.daemon.shutdown_timeout):
            await self._all_stopped.wait()
        for inst in self.instances.values():
            if inst.live and inst.life.pid is not None:
                log.error("%s outlived the shutdown deadline; killing it", inst.leaf)
                killpg(inst.life.pid, 9)
        with anyio.move_on_after(5.0):
            await self._all_stopped.wait()
        self.survivors.abandon()  # adoptable, but a shutdown came first
        self.state_file.remove()  # nothing runs on: nothing to re-adopt
        self.checks.stop()
        if self._sampler is not None:
            self._sampler.cancel()
        self.broker.close()
        if self.event_pub is not None:
            self.events.sinks.remove(self.event_pub)
            self.event_pub.close()
        if self.tracer is not None:
            self.tracer.shutdown()  # flushes what is buffered

    @property
    def shutting_down(self) -> bool:
        return self._shutting_down

    def kill_all(self) -> None:
        """Last resort when the daemon itself fails: SIGKILL every live plugin group."""
        for inst in self.instances.values():
            if inst.live and inst.life.pid is not None:
                killpg(inst.life.pid, 9)
        self.standbys.kill_all()
        self.survivors.abandon()
        self.state_file.remove()

    def _records(self) -> list[str]:
        """The live instances, as the state file keeps them for the next daemon."""
        daemon = self._daemon_fingerprint
        records = (
            inst.state_record(self.loaded.get(inst.plugin, ""), daemon)
            for inst in self.instances.values()
        )
        return [r for r in records if r is not None]

    def status(self, plugin: str | None = None) -> list[dict[str, Any]]:
        if plugin is not None and plugin not in self.config.plugins:
            raise ControlError(f"no plugin named '{plugin}'")
        return [
            self.status_of(inst)
            for inst in self.instances.values()
            if plugin is None or inst.plugin == plugin
        ]

    def status_of(self, inst: Instance) -> dict[str, Any]:
        """An instance's row for ``oskctl status``, with what its dependencies do to it."""
        row = self.deps.overlay(inst, inst.status(self.tree.restarts(inst.leaf)))
        row["calls"], row["errors"] = self.broker.counts(inst.key)
        row["standby"] = self.standbys.status(inst)
        return row

    async def changed(self) -> None:
        """Wait until some instance changes state."""
        await self._changed.wait()

    def logs_for(self, plugin: str) -> LogRing:
        """The ring of ``plugin``'s captured output (made for a plugin added at run time)."""
        return self.logs.setdefault(plugin, LogRing(self.config.daemon.log_buffer_lines))

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def spawn_task(self, func: Callable[..., Coroutine[Any, Any, Any]], *args: Any) -> None:
        self._tg.start_soon(func, *args)

    def apply_tree_effects(self, effects: list[Any]) -> None:
        """Perform the tree's effects (``tree_effects``)."""
        self._tree_effects.apply(effects)

    # ---- events into the lifecycle ------------------------------------------------------

    def feed(self, inst: Instance, event: lc.Event) -> None:
        """Apply one event to an instance and perform what follows from it."""
        before = inst.life.state
        try:
            effects = inst.life.step(event)
        except OskError as exc:
            log.error("%s: %s", inst.leaf, exc)
            return
        if isinstance(event, lc.Spawned):  # forked at the zygote's low priority
            renice(event.pid, GENTLE_NICE if inst.gentle_start else 0)
            self.state_file.dirty()
        self._perform(inst, effects)
        after = inst.life.state
        if after is before:
            return
        self.state_file.dirty()
        self.mark_changed()
        if after is lc.State.READY:
            self._became_ready(inst)
        elif after in (lc.State.UNLOADED, lc.State.FAILED):
            self._life_ended(inst)
        self.instance_changed(inst)

    def instance_changed(self, inst: Instance) -> None:
        """An instance changed life state or health: tell who follows its plugin."""
        self.deps.refresh(inst.plugin)
        self.rollouts.changed(inst)

    def mark_changed(self) -> None:
        """Wake whoever waits in ``changed()``."""
        self._changed.set()
        self._changed = asyncio.Event()

    def _became_ready(self, inst: Instance) -> None:
        now = time.monotonic()
        inst.ready_at = now
        inst.health.ready(restarted=inst.life.retry_count > 0)
        if inst.restart_span is not None:
            inst.restart_span.end()  # from the crash to the replacement's readiness
            inst.restart_span = None
        self.processes.lift_start_cap(inst)  # serving now: its full share of the CPU
        if inst.gentle_start and inst.life.pid is not None:
            renice(inst.life.pid, 0)
            inst.gentle_start = False
        if not inst.traffic_held:  # else its rollout lets calls in once it is healthy
            self.broker.set_ready(inst.key, True)
        self.checks.schedule(inst)
        self.apply_tree_effects(self.tree.child_started(inst.leaf, now))
        self.standbys.ready(inst)  # its next life is made ahead (standby = true)

    def _life_ended(self, inst: Instance) -> None:
        now = time.monotonic()
        life = inst.life
        inst.cancel_timers()
        inst.cancel_health()
        self.processes.lift_start_cap(inst)  # the slot's next life starts uncapped
        inst.ready_at = None
        if life.stop_requested or self._shutting_down:  # a restart asked for starts afresh
            self.standbys.drop(inst, "its instance was stopped")
        self.release(inst)
        self.broker.detach(inst.key, "exited" if life.last_exit else "failed")
        if life.stop_requested and not life.failure:
            inst.health.stopped()
        else:
            inst.health.lost(life.failure or lc.describe_exit(life.last_exit))
        if life.pid is not None and life.last_exit is not None:
            killpg_only(life.pid, 9)  # whatever the plugin forked dies with it
        inst.exited.set()
        if not life.stop_requested:
            reason = lc.exit_reason(life)
            inst.exits_by_reason[reason] = inst.exits_by_reason.get(reason, 0) + 1
            if self.tracer is not None and inst.restart_span is None:
                inst.restart_span = self.tracer.begin(
                    f"osk.restart {inst.leaf}", **{"osk.reason": reason}
                )
        self.deps.life_ended(inst)
        self.instance_changed(inst)  # now, before a restart below makes it "starting"
        log_fn = log.warning if life.abnormal_exit and not life.stop_requested else log.info
        log_fn(
            "%s (pid %s) ended: %s%s",
            inst.leaf,
            life.pid,
            lc.describe_exit(life.last_exit),
            f" ({life.failure})" if life.failure else "",
        )
        if self.deps.boot_failure is not None and self._request_stop is not None:
            self._request_stop()
        if life.stop_requested:
            effects = self.tree.child_stopped(inst.leaf, now)
        else:
            effects = self.tree.child_exited(inst.leaf, life.abnormal_exit, now, random.random())
        self.apply_tree_effects(effects)
        if self.tree.leaf_state(inst.leaf) not in _RUNNING_LEAF:  # no restart follows
            self.standbys.drop(inst, "its instance is not restarted")
        self._update_accepting(inst.plugin)
        self.check_all_stopped()

    def _perform(self, inst: Instance, effects: Iterable[lc.Effect]) -> None:
        for effect in effects:
            if isinstance(effect, lc.Spawn):
                self._spawn(inst)
            elif isinstance(effect, lc.SendStop):
                if not self.broker.send_to(inst.key, Header(Kind.STOP)) and inst.life.pid:
                    killpg(inst.life.pid, 15)
            elif isinstance(effect, lc.Signal):
                self.processes.signal(inst, effect.signum)
            elif isinstance(effect, lc.ArmTimer):
                old = inst.timers.pop(effect.timer, None)
                if old is not None:
                    old.cancel()
                inst.timers[effect.timer] = self._loop.call_later(
                    effect.delay, self._timer_fired, inst, inst.generation, effect.timer
                )
            elif isinstance(effect, lc.CancelTimers):
                inst.cancel_timers()
            elif isinstance(effect, lc.Publish):
                self.publish(inst, effect.event, effect.detail)

    def publish(self, inst: Instance, type_: str, detail: str = "", **extra: Any) -> None:
        self.events.publish(
            type_,
            pluginName=inst.plugin,
            instance=inst.index,
            version=inst.config.version,
            pid=inst.life.pid,
            state=inst.life.state.value,
            **({"detail": detail} if detail else {}),
            **extra,
        )

    def _timer_fired(self, inst: Instance, generation: int, timer: lc.Timer) -> None:
        if generation == inst.generation:
            inst.timers.pop(timer, None)
            self.feed(inst, lc.TimerFired(timer))

    # ---- spawning and exits (see processes.py) -----------------------------------------

    def _spawn(self, inst: Instance) -> None:
        self._update_accepting(inst.plugin)
        self.processes.spawn(inst)

    def release(self, inst: Instance) -> bool:
        return self.processes.release(inst, final=inst.life.stop_requested or self._shutting_down)

    def _sample_tick(self) -> None:
        self.processes.sample_usage(_SAMPLE_MOST)
        self._sampler = self._loop.call_later(_SAMPLE_EVERY, self._sample_tick)

    def _on_worker(self, key: InstanceKey, header: Header, body: bytes) -> None:
        inst = self.instances.get(f"{key[0]}/{key[1]}")
        if inst is None:
            return
        inst.last_seen = time.monotonic()
        kind = header.kind
        if inst.adopting and inst.life.state is lc.State.INITIALIZING:
            inst.adopting = False  # an adopted process spoke: it is ours again
            self.feed(inst, lc.Started())
        if kind is Kind.HEARTBEAT:
            return
        if kind is Kind.HELLO:
            self.feed(inst, lc.Connected())
        elif kind is Kind.READY:
            self.feed(inst, lc.Started())
        elif kind is Kind.START_FAILED:
            self.feed(inst, lc.StartFailed(_error_message(body)))
        elif kind is Kind.HEALTH_REPLY:
            self.checks.answered(inst, header.id, body)
        elif kind is Kind.HEALTH_REPORT:
            self.checks.reported(inst, body)
        elif kind is Kind.STATE:
            self.spawn_task(hand_over, self, inst)
        elif kind is Kind.EVENT and header.method.startswith("sandbox:"):
            self.publish(inst, header.method, _error_message(body))
        elif kind is Kind.EVENT:
            try:
                data = unpack(body, 65536)
            except OskError:
                data = None
            self.publish(inst, "plugin:event", event=header.method, data=data)

    def _update_accepting(self, plugin: str) -> None:
        accepting = any(
            inst.live or self.tree.leaf_state(inst.leaf) in _RUNNING_LEAF
            for inst in self.instances.values()
            if inst.plugin == plugin
        )
        self.broker.set_accepting(plugin, accepting and not self._shutting_down)

    def check_all_stopped(self) -> None:
        if not self._shutting_down or self.standbys.running:
            return
        if not any(i.live for i in self.instances.values()):
            self._all_stopped.set()


def _error_message(body: bytes) -> str:
    try:
        data = unpack(body, 1 << 20)
    except OskError:
        return "(unreadable error)"
    return str(data.get("message", data)) if isinstance(data, dict) else str(data)
