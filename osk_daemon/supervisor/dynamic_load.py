"""Loading and unloading a plugin at run time, without touching the config file.

``load(path)`` reads the ``osk-plugin.toml`` in ``path`` (a plugin folder, as in the
plugins directory), refuses a name that runs already or requirements that are not
running at a fitting version, and starts the plugin with default settings in the root
group: it waits, like any plugin, until what it requires is up.

``unload(name, strategy, dependents)`` follows ObjectStack's ``DynamicUnloadRequest``:

- ``dependents``: ``block`` (default) refuses while a running plugin requires ``name``;
  ``warn`` unloads anyway (they are told, ``dependency_down``, and run on without it);
  ``cascade`` unloads them first, dependents before what they need.
- ``strategy``: ``graceful`` is the stop ladder (stop(), SIGTERM, SIGKILL); ``drain``
  first stops routing new calls to it and waits for those in flight; ``forceful`` kills
  at once (the whole cgroup).

Both change the dependency graph the daemon keeps (start gate and degradation).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from osk_daemon.config import PluginConfig
from osk_daemon.errors import ConfigError, ControlError
from osk_daemon.versioning.manifest import load_manifest
from osk_daemon.versioning.planning import StartPlan
from osk_daemon.versioning.semver import Version

if TYPE_CHECKING:
    from osk_daemon.supervisor.runtime import Supervisor

log = logging.getLogger("osk.load")

__all__ = ["load_plugin", "loaded_config", "loaded_plugin", "unload_plugin"]

UNLOAD_STRATEGIES = ("graceful", "forceful", "drain")
DEPENDENT_ACTIONS = ("block", "warn", "cascade")


def load_plugin(sup: Supervisor, path: str) -> dict[str, Any]:
    """Start the plugin in folder ``path``. Raises ControlError naming what is wrong."""
    try:
        manifest = load_manifest(path)
    except ConfigError as exc:
        raise ControlError(f"cannot load {path}: {exc}") from exc
    name = manifest.name
    if name in sup.config.plugins:
        raise ControlError(f"a plugin named '{name}' runs already; unload it first")
    hard: set[str] = set()
    for need in manifest.requires:
        if need.service:
            continue
        running = sup.config.plugins.get(need.name)
        if running is None:
            if need.optional:
                continue
            raise ControlError(
                f"{name} {manifest.version} needs {need.name} {need.range}, which is not running"
            )
        if not need.range.contains(Version.parse(str(running.version))):
            raise ControlError(
                f"{name} {manifest.version} needs {need.name} {need.range}, but "
                f"{need.name} {running.version} is running"
            )
        if not need.optional:
            hard.add(need.name)
    folder = Path(path).absolute()
    cfg = loaded_config(folder, manifest.entry, str(manifest.version))
    sup.loaded[name] = str(folder)
    old = sup.deps.plan
    plugins = {**sup.config.plugins, name: cfg}
    sup.config = sup.config.model_copy(update={"plugins": plugins})
    sup.hot_reloads.sync()
    sup.deps.replan(
        StartPlan(
            config=sup.config,
            requires={**old.requires, name: frozenset(hard)},
            optional={**old.optional, name: frozenset()},
            waves=[*old.waves, [name]],
            offline_capable=old.offline_capable | ({name} if manifest.offline_capable else set()),
        )
    )
    sup.logs_for(name)
    sup.broker.declare(name)
    sup.broker.set_accepting(name, True)
    inst = sup.members.add(name, cfg)
    sup.members.start(inst)
    log.info("loaded %s %s from %s", name, manifest.version, folder)
    sup.events.publish("plugin:loaded", pluginName=name, version=str(manifest.version))
    return {"plugin": name, "version": str(manifest.version), "path": str(folder)}


def loaded_config(folder: Path, entry: str, version: str) -> PluginConfig:
    """The config a plugin loaded at run time runs with (default settings)."""
    return PluginConfig(entry=entry, path=[folder], version=version)


def loaded_plugin(path: str) -> tuple[str, PluginConfig] | None:
    """``(name, config)`` the plugin folder ``path`` would be loaded with; None if its
    manifest cannot be read (any more)."""
    try:
        manifest = load_manifest(path)
    except ConfigError:
        return None
    folder = Path(path).absolute()
    return manifest.name, loaded_config(folder, manifest.entry, str(manifest.version))


def _dependents(sup: Supervisor, name: str) -> list[str]:
    return sorted(p for p, deps in sup.deps.plan.requires.items() if name in deps)


async def unload_plugin(
    sup: Supervisor, name: str, strategy: str = "graceful", dependents: str = "block"
) -> dict[str, Any]:
    """Stop ``name`` for good and forget it. Raises ControlError (nothing changes) for an
    unknown plugin or strategy, or dependents under ``block``."""
    if name not in sup.config.plugins:
        raise ControlError(f"no plugin named '{name}'")
    if strategy not in UNLOAD_STRATEGIES:
        raise ControlError(f"strategy must be one of {', '.join(UNLOAD_STRATEGIES)}")
    if dependents not in DEPENDENT_ACTIONS:
        raise ControlError(f"dependents must be one of {', '.join(DEPENDENT_ACTIONS)}")
    needing = _dependents(sup, name)
    if needing and dependents == "block":
        raise ControlError(
            f"{', '.join(needing)} require{'s' if len(needing) == 1 else ''} '{name}'; "
            "unload them first, or use --dependents warn or cascade"
        )
    going = [name, *(needing if dependents == "cascade" else [])]
    sup.rollouts.refuse_while_running(going, f"unload {name}")
    unloaded: list[str] = []
    if dependents == "cascade":
        for other in needing:
            if other in sup.config.plugins:
                done = await unload_plugin(sup, other, strategy, "cascade")
                unloaded += done["unloaded"]
    for inst in reversed(sup.members.of_plugin(name)):
        if strategy == "drain":
            await sup.members.drain(inst, inst.config.rollout.drain_timeout)
        await sup.members.remove(inst, force=strategy == "forceful")
    sup.broker.set_accepting(name, False)
    old = sup.deps.plan
    plugins = {p: c for p, c in sup.config.plugins.items() if p != name}
    sup.config = sup.config.model_copy(update={"plugins": plugins})
    sup.hot_reloads.sync()
    sup.loaded.pop(name, None)
    sup.deps.replan(
        StartPlan(
            config=sup.config,
            requires={p: d - {name} for p, d in old.requires.items() if p != name},
            optional={p: d - {name} for p, d in old.optional.items() if p != name},
            waves=[[p for p in w if p != name] for w in old.waves if w != [name]],
            offline_capable=old.offline_capable - {name},
        )
    )
    unloaded.append(name)
    log.info("unloaded %s (%s)", name, strategy)
    sup.events.publish("plugin:unloaded", pluginName=name, strategy=strategy)
    warnings = [f"{p} required {name} and runs without it" for p in needing if dependents == "warn"]
    return {"unloaded": unloaded, "warnings": warnings}
