"""Performing the supervision tree's effects for the driver.

StartChild goes through the start gate (``DependencyWatch.may_start``) and becomes the
instance's ``StartRequested``; ArmRestartTimer is a loop timer back into the tree;
GroupGaveUp is logged and published. StopChild effects are the only ones awaited: a
batch of them runs in its own task, one instance after the other (children stop in
reverse start order, each finished before the next), everything else is immediate.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from osk_daemon.supervisor import lifecycle as lc
from osk_daemon.supervisor.instance import Instance
from osk_daemon.supervisor.tree_types import (
    ArmRestartTimer,
    GroupGaveUp,
    LeafState,
    StartChild,
    StopChild,
)

if TYPE_CHECKING:
    from osk_daemon.supervisor.runtime import Supervisor

log = logging.getLogger("osk.supervisor")

__all__ = ["TreeEffects"]


class TreeEffects:
    def __init__(self, sup: Supervisor) -> None:
        self._sup = sup

    def apply(self, effects: list[Any]) -> None:
        """Perform the tree's effects: stops in order (in a task), the rest at once."""
        if any(isinstance(e, StopChild) for e in effects):
            self._sup.spawn_task(self._batch, effects)
            return
        for effect in effects:
            self._one(effect)

    async def _batch(self, effects: list[Any]) -> None:
        for effect in effects:
            if isinstance(effect, StopChild):
                await self._stop_and_wait(self._sup.instances[effect.leaf], effect.reason)
            else:
                self._one(effect)

    def _one(self, effect: Any) -> None:
        sup = self._sup
        if isinstance(effect, StartChild):
            inst = sup.instances[effect.leaf]
            if inst.live:
                log.error("tree asked to start %s, which is %s", inst.leaf, inst.life.state)
                return
            survivor = sup.survivors.take(inst.leaf)
            if survivor is not None:  # running all along: no gate, no spawn
                sup.processes.adopt(inst, survivor)
            elif sup.deps.may_start(inst):
                sup.feed(inst, lc.StartRequested())
            else:
                sup.mark_changed()
        elif isinstance(effect, ArmRestartTimer):
            sup.loop.call_later(effect.delay, self._restart_timer, effect.token)
        elif isinstance(effect, GroupGaveUp):
            log.error(
                "group '%s' gave up: more than its intensity of restarts (%d) within %gs",
                effect.group,
                effect.restarts,
                effect.period,
            )
            sup.events.publish("supervisor:gave-up", group=effect.group, restarts=effect.restarts)
        elif isinstance(effect, StopChild):
            sup.spawn_task(self._batch, [effect])

    async def _stop_and_wait(self, inst: Instance, reason: str) -> None:
        sup = self._sup
        if inst.live:
            sup.feed(inst, lc.StopRequested(reason))
            await inst.exited.wait()
        elif sup.tree.leaf_state(inst.leaf) is LeafState.STOPPING:
            # never started (perhaps held by the start gate) or already gone; a death
            # reported as child_exited in the meantime already counted as this stop
            sup.standbys.drop(inst, "its instance was stopped")
            sup.deps.cancel(inst)
            self.apply(sup.tree.child_stopped(inst.leaf, time.monotonic()))
            sup.mark_changed()
        sup.check_all_stopped()

    def _restart_timer(self, token: int) -> None:
        self.apply(self._sup.tree.timer_fired(token, time.monotonic()))
