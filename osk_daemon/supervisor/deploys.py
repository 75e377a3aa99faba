"""Starting a swap to an installed version: choose it, check it fits, build its config.

Shared by ``oskctl deploy`` and by automatic updates. ``start_deploy`` picks the highest
installed version that the asked version or range selects, refuses one whose hard
requirements are not running at a fitting version (naming them), builds the new
version's config (the running one with the new entry, code folder and version) and hands
it to ``Rollouts.deploy``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from osk_daemon.config import PluginConfig
from osk_daemon.errors import ConfigError, ControlError
from osk_daemon.supervisor.rollouts import RolloutRun, spec_for
from osk_daemon.versioning.installed import Installed, scan
from osk_daemon.versioning.semver import InvalidRange, Range, Version

if TYPE_CHECKING:
    from osk_daemon.supervisor.runtime import Supervisor

__all__ = ["canary_config", "check_requirements", "choose_install", "start_deploy"]


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


def start_deploy(sup: Supervisor, plugin: str, wanted: str, args: dict[str, Any]) -> RolloutRun:
    if plugin not in sup.config.plugins:
        raise ControlError(f"no plugin named '{plugin}'")
    if sup.reloading.locked():  # it checked what it changes against the rollouts running
        raise ControlError("a config reload is being applied; deploy once it has ended")
    current = sup.config.plugins[plugin]
    install = choose_install(sup, plugin, wanted)
    if str(install.version) == str(current.version):
        raise ControlError(f"'{plugin}' already runs {install.version}")
    check_requirements(sup, install)
    canary = canary_config(current, install)
    min_ready = args.get("min_ready")
    if min_ready is not None:
        if not isinstance(min_ready, int | float) or isinstance(min_ready, bool) or min_ready < 0:
            raise ControlError(f"min_ready must be seconds >= 0, got {min_ready!r}")
        rollout = canary.rollout.model_copy(update={"min_ready": float(min_ready)})
        canary = canary.model_copy(update={"rollout": rollout})
    spec = spec_for(plugin, current, canary, args)
    return sup.rollouts.deploy(plugin, canary, spec)
