"""Which instances a supervisor runs, and operator commands on them.

The instances of a plugin are not fixed by its config: a rollout adds instances of the new
version and removes the old ones, a reload scales. This module holds those moves (a new
instance gets the next free index and a tree leaf right after its plugin's others; a
removed one is stopped with the full ladder, then its leaf, route and record are dropped)
and the lookups every command uses, which read the tree and the live records rather than
the config's ``instances`` count.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import anyio

from osk_daemon.config import PluginConfig
from osk_daemon.errors import ControlError
from osk_daemon.supervisor.instance import Instance
from osk_daemon.supervisor.tree_build import leaf_spec
from osk_daemon.supervisor.tree_types import LeafState

if TYPE_CHECKING:
    from osk_daemon.supervisor.runtime import Supervisor

__all__ = ["Membership"]


class Membership:
    def __init__(self, sup: Supervisor) -> None:
        self._sup = sup

    # ---- lookups --------------------------------------------------------------------------

    def of_plugin(self, plugin: str) -> list[Instance]:
        """A plugin's instances (every version), in start order."""
        sup = self._sup
        return [
            sup.instances[leaf]
            for leaf in sup.tree.topology.order
            if sup.instances[leaf].plugin == plugin
        ]

    def named(self, ids: list[str]) -> list[Instance]:
        """The instances named by leaf ids or beneath group ids, in start order."""
        topo = self._sup.tree.topology
        wanted = {leaf for node in ids for leaf in topo.leaves_under.get(node, ())}
        return [self._sup.instances[leaf] for leaf in topo.order if leaf in wanted]

    def resolve(self, name: str, index: int | None) -> list[str]:
        """Leaf ids for an operator's NAME (plugin or group) and optional instance index."""
        config = self._sup.config
        if name in config.plugins:
            mine = [i for i in self.of_plugin(name) if not i.retiring]
            if index is None:
                return [i.leaf for i in mine]
            chosen = [i.leaf for i in mine if i.index == index]
            if not chosen:
                have = ", ".join(str(i.index) for i in mine)
                raise ControlError(f"plugin '{name}' has instances {have}, not {index}")
            return chosen
        if name in config.groups and index is None:
            return [name]
        raise ControlError(f"no plugin or group named '{name}'")

    def operate(self, action: str, name: str, index: int | None) -> list[str]:
        """Operator start/stop/restart of a plugin (or one instance) or a group."""
        ids = self.resolve(name, index)
        tree, now = self._sup.tree, time.monotonic()
        if action == "start":
            effects = tree.start_children(ids, now)
        elif action == "stop":
            effects = tree.stop(ids, now)
        elif action == "restart":
            effects = tree.restart(ids, now)
        else:
            raise ControlError(f"unknown action {action!r}")
        self._sup.apply_tree_effects(effects)
        return ids

    # ---- instances that come and go -----------------------------------------------------

    def add(self, plugin: str, cfg: PluginConfig, group: str | None = None) -> Instance:
        """A new, not yet started instance of ``plugin`` running ``cfg`` (its own version),
        placed in the tree after the plugin's other instances (a new plugin: last in
        ``group``, default the root)."""
        sup = self._sup
        mine = self.of_plugin(plugin)
        inst = Instance.create(plugin, 1 + max((i.index for i in mine), default=-1), cfg)
        last = mine[-1].leaf if mine else None
        if last is not None:
            group = sup.tree.topology.parent[last]
        group = group or sup.tree.topology.root
        sup.tree.add_leaf(leaf_spec(plugin, inst.index, cfg), group, after=last)
        inst.gentle_start = bool(mine)  # others of the plugin serve meanwhile
        held = {i.state_index for i in mine if not i.retiring}
        inst.state_slot = next(n for n in range(len(held) + 1) if n not in held)
        sup.instances[inst.leaf] = inst
        sup.broker.set_version(inst.key, str(cfg.version))
        return inst

    def start(self, inst: Instance) -> None:
        self._sup.apply_tree_effects(self._sup.tree.start_children([inst.leaf], time.monotonic()))

    async def drain(self, inst: Instance, timeout: float) -> bool:
        """Send ``inst`` no new calls (they go to the plugin's other instances, or wait for
        one) and wait, at most ``timeout`` seconds, until the calls it has in flight are
        answered; True if they were. It is marked retiring: nothing counts on it now."""
        inst.retiring = True
        with anyio.move_on_after(timeout) as scope:
            await self._sup.broker.drain(inst.key)
        return not scope.cancelled_caught

    async def retire(self, inst: Instance) -> None:
        """``drain`` (bounded by its ``rollout.drain_timeout``), then ``remove``: how a
        reload scales down or removes an instance without failing a call."""
        await self.drain(inst, inst.config.rollout.drain_timeout)
        await self.remove(inst)

    async def remove(self, inst: Instance, force: bool = False) -> None:
        """Stop ``inst`` (the stop ladder; ``force``: SIGKILL once the stop is under way,
        so the exit counts as a stop, not a crash) and forget it: leaf, route, record."""
        sup = self._sup
        inst.retiring = True
        sup.apply_tree_effects(sup.tree.stop([inst.leaf], time.monotonic()))
        if force:
            while inst.live and not inst.life.stop_requested:
                await sup.changed()
            if inst.live:
                sup.processes.signal(inst, 9)
        while inst.live or sup.tree.leaf_state(inst.leaf) is not LeafState.STOPPED:
            await sup.changed()
        sup.standbys.drop(inst, "its instance was removed")
        sup.processes.forget(inst)  # its cgroups: whatever slot a past life left
        sup.tree.remove_leaf(inst.leaf)
        del sup.instances[inst.leaf]
        sup.broker.forget(inst.key)
        sup.mark_changed()
        sup.instance_changed(inst)

    def adopt(self, plugin: str, cfg: PluginConfig) -> None:
        """After a swap: ``cfg`` is what ``plugin`` runs now (status, reload, next swap)."""
        sup = self._sup
        plugins = dict(sup.config.plugins)
        plugins[plugin] = cfg.model_copy(update={"instances": len(self.of_plugin(plugin))})
        sup.config = sup.config.model_copy(update={"plugins": plugins})
        sup.hot_reloads.sync()  # a new version's code is in another folder
