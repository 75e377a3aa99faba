"""Control commands for version swaps: ``deploy`` and ``rollout``.

``deploy`` picks the version to swap to from the plugins directory (an exact version or a
range, highest match first), checks that what the new version requires is running at a
fitting version, builds the new version's config (the running one with the new entry,
code folder and version) and starts a rollout. With ``follow`` it streams the rollout's
events until it ends: that is ``oskctl deploy``'s live progress.

``rollout`` answers ``status`` (all rollouts, or one) and applies ``pause``, ``resume``,
``promote``, ``abort`` to the running one; ``rollback`` after a finished rollout deploys
the previous version the same way (a new rollout, back).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from osk_daemon.config import PluginConfig
from osk_daemon.errors import ConfigError, ControlError
from osk_daemon.supervisor.rollouts import RolloutRun, spec_for
from osk_daemon.supervisor.runtime import Supervisor
from osk_daemon.versioning.installed import Installed, scan
from osk_daemon.versioning.semver import InvalidRange, Range, Version

_END_EVENTS = frozenset({"rollout:succeeded", "rollout:rolled-back"})


def _str(args: dict[str, Any], key: str) -> str:
    value = args.get(key)
    if not isinstance(value, str) or not value:
        raise ControlError(f"argument '{key}' must be a non-empty string")
    return value


def choose_install(sup: Supervisor, plugin: str, wanted: str) -> Installed:
    """The installed version of ``plugin`` that ``wanted`` (a version or range) selects."""
    plugins_dir = sup.config.daemon.plugins_dir
    if plugins_dir is None:
        raise ControlError("no daemon.plugins_dir is configured: nothing to deploy from")
    try:
        installed = scan(plugins_dir).get(plugin, {})
        rng = Range.parse(wanted)
    except ConfigError as exc:
        raise ControlError(f"cannot read the plugins directory: {exc}") from exc
    except InvalidRange as exc:
        raise ControlError(f"bad version {wanted!r}: {exc}") from exc
    if not installed:
        raise ControlError(f"no version of '{plugin}' is installed in {plugins_dir}")
    best = rng.max_satisfying(installed)
    if best is None:
        have = ", ".join(str(v) for v in sorted(installed))
        raise ControlError(f"no installed version of '{plugin}' fits {wanted} (installed: {have})")
    return installed[best]


def check_requirements(sup: Supervisor, install: Installed) -> None:
    """Refuse a version whose hard requirements are not running at a fitting version."""
    for need in install.manifest.requires:
        if need.optional or need.service:
            continue
        running = sup.config.plugins.get(need.name)
        if running is None:
            raise ControlError(
                f"{install.name} {install.version} needs {need.name} {need.range}, "
                f"which is not running"
            )
        version = Version.parse(str(running.version))
        if not need.range.contains(version):
            raise ControlError(
                f"{install.name} {install.version} needs {need.name} {need.range}, "
                f"but {need.name} {version} is running; deploy a fitting {need.name} first"
            )


def canary_config(current: PluginConfig, install: Installed) -> PluginConfig:
    return current.model_copy(
        update={
            "entry": install.manifest.entry,
            "path": [install.folder],
            "version": str(install.version),
        }
    )


def _start(sup: Supervisor, plugin: str, wanted: str, args: dict[str, Any]) -> RolloutRun:
    if plugin not in sup.config.plugins:
        raise ControlError(f"no plugin named '{plugin}'")
    current = sup.config.plugins[plugin]
    install = choose_install(sup, plugin, wanted)
    if str(install.version) == str(current.version):
        raise ControlError(f"'{plugin}' already runs {install.version}")
    check_requirements(sup, install)
    canary = canary_config(current, install)
    spec = spec_for(plugin, current, canary, args)
    return sup.rollouts.deploy(plugin, canary, spec)


async def _follow(sup: Supervisor, run: RolloutRun) -> AsyncIterator[Any]:
    queue: asyncio.Queue[dict[str, Any]] = sup.events.follow()
    try:
        yield run.status()
        while not run.finished.is_set() or not queue.empty():
            event = await queue.get()
            if event.get("pluginName") != run.spec.plugin or not str(
                event.get("type", "")
            ).startswith("rollout:"):
                continue
            yield {"event": event, "status": run.status()}
            if event["type"] in _END_EVENTS:
                return
    finally:
        sup.events.unfollow(queue)


async def deploy(sup: Supervisor, args: dict[str, Any]) -> Any:
    plugin = _str(args, "plugin")
    run = _start(sup, plugin, _str(args, "version"), args)
    if args.get("follow"):
        return _follow(sup, run)
    return run.status()


async def rollout(sup: Supervisor, args: dict[str, Any]) -> Any:
    action = _str(args, "action")
    name = args.get("plugin")
    if action == "status":
        if name is None:
            return sup.rollouts.statuses()
        return sup.rollouts.get(_str(args, "plugin")).status()
    plugin = _str(args, "plugin")
    run = sup.rollouts.get(plugin)
    if action == "rollback":
        if not run.finished.is_set():
            return run.command("abort")
        back = run.spec.stable if run.engine.state == "succeeded" else None
        if back is None:
            raise ControlError(f"the rollout of '{plugin}' was rolled back already")
        new = _start(sup, plugin, back, args)
        return _follow(sup, new) if args.get("follow") else new.status()
    return run.command(action)
