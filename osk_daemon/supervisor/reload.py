"""Applying an edited config to a running daemon (``oskctl reload``, SIGHUP).

Theory of operation
-------------------
The new file is loaded and planned exactly as at start (drop-ins, versions, start order);
any error is refused with its file, key and reason and the running config stays, whole.

A reload applies what the *file* changed since it was last loaded (``sup.file_plan``),
not every difference between the file and what runs. A plugin whose entry the edit did
not touch runs on as it runs: a version deployed with ``oskctl deploy`` stays, a newer
version inside its range is left to ``update.mode`` (``oskctl updates`` lists it, or
the auto mode deploys it in its window), an instance count set at run time stays, and a
plugin unloaded at run time stays unloaded. Likewise, with its range unchanged, an
edited plugin keeps its running version and only the rest of the edit applies. Plugins
loaded at run time (``oskctl load``) are not the file's: a reload leaves them be.

Then ``config.diff`` compares that with what runs, and each kind of change is applied
the way that keeps serving:

- removed plugins stop (dependents first) and are forgotten;
- added plugins get their instances (in the group the new config names, if the running
  tree has it, else the root group) and start through the start gate, so they wait for
  what they require;
- plugins whose code, version, config, env, limits or sandbox changed are swapped by a
  rolling rollout (new instances ready before old ones drain), with state handed over;
- ``instances`` alone scales up or down (the newest instances go first);
- supervision settings alone (health checks, backoff, restart type, timeouts) apply in
  place to the running instances: no process restarts;
- untouched plugins keep their processes and pids.

Daemon keys that cannot change under a running daemon (sockets, directories) refuse the
reload, naming them. A change to the group tree other than new plugins is reported, not
applied: restructuring supervision of running processes is a restart's job. The plan's
dependency graph replaces the old one once the moves are under way.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from osk_daemon.config import Config, GroupConfig, PluginConfig, load_config
from osk_daemon.config.diff import ConfigDiff, diff_configs, top_keys
from osk_daemon.errors import ConfigError, ControlError
from osk_daemon.rollout.plan import RolloutSpec
from osk_daemon.supervisor.instance import health_policy
from osk_daemon.supervisor.rollouts import spec_for
from osk_daemon.supervisor.tree_build import leaf_spec
from osk_daemon.versioning.planning import StartPlan, plan_start

if TYPE_CHECKING:
    from osk_daemon.supervisor.runtime import Supervisor

log = logging.getLogger("osk.reload")

__all__ = ["reload_config"]


async def reload_config(sup: Supervisor) -> dict[str, Any]:
    """Load ``sup.config.source`` again and apply what changed. Raises ControlError (the
    running config stays) for an invalid file, a conflict, a daemon key that needs a
    restart, or a plugin it would change that a rollout is moving. One reload at a time
    (SIGHUP and ``oskctl reload`` queue)."""
    async with sup.reloading:
        return await _reload(sup)


async def _reload(sup: Supervisor) -> dict[str, Any]:
    source = sup.config.source
    try:
        plan = plan_start(load_config(source))
    except ConfigError as exc:
        log.error("reload refused, the running config stays: %s", exc)
        raise ControlError(f"reload refused, the running config stays: {exc}") from exc
    new = _effective(sup, plan)
    diff = diff_configs(sup.config, new)
    if diff.daemon_restart:
        raise ControlError(
            "reload refused, the running config stays: "
            f"{', '.join('daemon.' + k for k in diff.daemon_restart)} cannot change while the "
            "daemon runs; restart it to apply"
        )
    # everything that can refuse is checked before anything changes: all or nothing
    changing = [*diff.removed, *diff.swap, *diff.scale, *diff.retune]
    sup.rollouts.refuse_while_running(changing, "reload")
    swaps = {name: _swap_spec(sup, name, new.plugins[name]) for name in diff.swap}
    # the swaps start now, with no await since the check: nothing else can start a
    # rollout of these plugins in between (deploys also wait for the reload's lock)
    for name, spec in swaps.items():
        sup.rollouts.deploy(name, new.plugins[name], spec)
    old_groups = sup.config.groups
    for name in reversed([p for wave in sup.deps.plan.waves for p in wave]):
        if name in diff.removed:
            for inst in reversed(sup.members.of_plugin(name)):
                await sup.members.retire(inst)
            sup.broker.set_accepting(name, False)
    merged = dict(sup.config.plugins)
    for name in diff.removed:
        merged.pop(name, None)
        sup.loaded.pop(name, None)  # loaded at run time, now gone: not to be loaded again
    for name in diff.added:
        merged[name] = new.plugins[name]
    for name in diff.retune:
        merged[name] = _retune(sup, name, new.plugins[name])
    for name in diff.scale:
        if top_keys(diff.changed[name]) - {"instances"}:  # with supervision settings too
            merged[name] = _retune(sup, name, new.plugins[name])
        else:
            merged[name] = merged[name].model_copy(
                update={"instances": new.plugins[name].instances}
            )
    # groups and daemon settings stay as they run (reported below): the tree and the
    # broker were built from them
    sup.config = sup.config.model_copy(update={"plugins": merged})
    sup.deps.replan(_running_plan(sup, plan))
    sup.file_plan = plan
    sup.hot_reloads.sync()
    for name in diff.added:
        _add_plugin(sup, name, new.plugins[name], new.groups)
    for name in diff.scale:
        await _scale(sup, name, new.plugins[name])
    summary = diff.summary()
    summary["not_applied"] = [
        *(f"groups.{g}" for g in _restructured(diff, old_groups, new.groups)),
        *(f"daemon.{k}" for k in diff.daemon),
    ]
    sup.events.publish("kernel:reloaded", **{k: v for k, v in summary.items() if v})
    log.info("reloaded %s: %s", source, _describe(diff))
    return summary


def _effective(sup: Supervisor, plan: StartPlan) -> Config:
    """What should run after this reload: the new file's plugins, each as it runs now if
    the edit did not touch its entry (see the module docstring), plus the plugins loaded
    at run time. Its daemon settings and groups are the new file's."""
    before, now = sup.file_plan, plan
    plugins: dict[str, PluginConfig] = {}
    for name, planned in now.config.plugins.items():
        running = sup.config.plugins.get(name)
        old = before.config.plugins.get(name)
        same_range = old is not None and before.ranges.get(name) == now.ranges.get(name)
        resolved = name in now.installed and name in before.installed
        if (
            same_range
            and old is not None
            and _declared(old, resolved) == _declared(planned, resolved)
        ):
            if running is not None:  # untouched by the edit: as it runs
                plugins[name] = running
            continue  # (or unloaded at run time: it stays so)
        if same_range and resolved and running is not None:  # the version that runs stays
            keep = {"version": running.version, "entry": running.entry, "path": running.path}
            plugins[name] = planned.model_copy(update=keep)
        else:
            plugins[name] = planned
    _follow_the_plan(sup, now, plugins)
    for name, running in sup.config.plugins.items():
        if name not in before.config.plugins and name not in plugins:
            plugins[name] = running  # loaded at run time: not the file's to change
    return now.config.model_copy(update={"plugins": plugins})


def _follow_the_plan(sup: Supervisor, now: StartPlan, plugins: dict[str, PluginConfig]) -> None:
    """A plugin kept as it runs takes the new plan's version after all where a plugin the
    edit changed requires it (or uses it): the plan's versions are the ones the resolver
    proved to fit together, a kept one may not fit the changed one's requirements."""
    changed = {n for n, cfg in plugins.items() if cfg is not sup.config.plugins.get(n)}
    moved = True
    while moved:
        moved = False
        for name, cfg in list(plugins.items()):
            planned = now.config.plugins[name]
            if name in changed or cfg.version == planned.version:
                continue
            none: frozenset[str] = frozenset()
            uses = (now.requires.get(p, none) | now.optional.get(p, none) for p in changed)
            if any(name in used for used in uses):
                keep = {"version": planned.version, "entry": planned.entry, "path": planned.path}
                plugins[name] = cfg.model_copy(update=keep)
                changed.add(name)
                moved = True


def _declared(cfg: PluginConfig, resolved: bool) -> PluginConfig:
    """``cfg`` as the file declares it: for an installed plugin, without what the planner
    chose (version, entry, code folder; its range is compared apart)."""
    if not resolved:
        return cfg
    return cfg.model_copy(update={"version": None, "entry": None, "path": []})


def _running_plan(sup: Supervisor, plan: StartPlan) -> StartPlan:
    """The dependency plan of what runs now: the new file's, for its plugins that run,
    and the previous one's for the plugins loaded at run time."""
    old, names = sup.deps.plan, set(sup.config.plugins)
    kept = [p for p in sup.config.plugins if p not in plan.config.plugins]
    return dataclasses.replace(
        plan,
        config=sup.config,
        requires={
            **{p: d for p, d in plan.requires.items() if p in names},
            **{p: old.requires.get(p, frozenset()) for p in kept},
        },
        optional={
            **{p: d for p, d in plan.optional.items() if p in names},
            **{p: old.optional.get(p, frozenset()) for p in kept},
        },
        waves=[w for w in ([p for p in wave if p in names] for wave in plan.waves) if w]
        + [[p] for p in kept],
        offline_capable=(plan.offline_capable & names) | (old.offline_capable & set(kept)),
    )


def _describe(diff: ConfigDiff) -> str:
    if diff.empty:
        return "nothing changed"
    parts = [
        f"{label} {', '.join(names)}"
        for label, names in (
            ("added", diff.added),
            ("removed", diff.removed),
            ("swapping", diff.swap),
            ("scaled", diff.scale),
            ("retuned", diff.retune),
        )
        if names
    ]
    return "; ".join(parts) or "only group or daemon settings changed"


def _restructured(
    diff: ConfigDiff, old: Mapping[str, GroupConfig], new: Mapping[str, GroupConfig]
) -> list[str]:
    """Groups that changed beyond gaining added plugins or losing removed ones."""
    out = []
    for gid in diff.groups:
        before, after = old.get(gid), new.get(gid)
        if before is None or after is None:
            out.append(gid)
            continue
        kept = before.model_copy(
            update={"children": [c for c in before.children if c not in diff.removed]}
        )
        wanted = after.model_copy(
            update={"children": [c for c in after.children if c not in diff.added]}
        )
        if kept != wanted:
            out.append(gid)
    return out


def _add_plugin(
    sup: Supervisor, name: str, cfg: PluginConfig, groups: Mapping[str, GroupConfig]
) -> None:
    parent = next((g for g, spec in groups.items() if name in spec.children), "root")
    if parent not in sup.tree.topology.groups_under:
        parent = sup.tree.topology.root
    sup.logs_for(name)
    sup.broker.declare(name)
    sup.broker.set_accepting(name, True)
    for _ in range(cfg.instances):
        inst = sup.members.add(name, cfg, group=parent)
        sup.members.start(inst)


async def _scale(sup: Supervisor, name: str, cfg: PluginConfig) -> None:
    mine = [i for i in sup.members.of_plugin(name) if not i.retiring]
    for _ in range(cfg.instances - len(mine)):
        sup.members.start(sup.members.add(name, mine[-1].config if mine else cfg))
    for inst in sorted(mine, key=lambda i: -i.index)[: max(0, len(mine) - cfg.instances)]:
        await sup.members.retire(inst)


def _retune(sup: Supervisor, name: str, cfg: PluginConfig) -> PluginConfig:
    policy = health_policy(cfg)
    for inst in sup.members.of_plugin(name):
        inst.config = cfg
        sup.standbys.renew(inst)  # made for the old config
        if inst.health.policy != policy:
            inst.health.policy = policy
            sup.checks.take_over(inst)  # its worker's own checks follow the old policy
        inst.life.start_timeout = cfg.start_timeout
        inst.life.shutdown_timeout = cfg.shutdown_timeout
        sup.tree.update_leaf(leaf_spec(name, inst.index, cfg))
    return cfg


def _swap_spec(sup: Supervisor, name: str, cfg: PluginConfig) -> RolloutSpec:
    """The rolling rollout that swaps ``name`` to ``cfg``; ControlError if it cannot."""
    try:
        spec = spec_for(
            name, sup.config.plugins[name], cfg, {"strategy": "rolling", "instances": cfg.instances}
        )
    except ControlError as exc:
        raise ControlError(f"reload refused, the running config stays: {exc}") from exc
    return spec
