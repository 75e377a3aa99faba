"""Noticing newer installed versions, and deploying them where the operator allows it.

Theory of operation
-------------------
A plugin's config asks for a range (``version = "^2.1"``); the plugins directory may later
receive a newer version inside that range. ``Updates`` checks at start, whenever the
plugins directory changes (``watchfiles``, debounced) and once a minute (so a
maintenance window that opens is noticed without a file change):

- ``update.mode = "manual"`` (the default): the newer version is listed by ``oskctl
  updates``, nothing else happens;
- ``update.mode = "auto"``: inside ``update.window`` (any time if unset) and when no swap
  of the plugin runs, it is deployed with ``update.strategy``. A swap that rolls back
  marks that version as failed: it is not tried again by itself (an operator's
  ``oskctl deploy`` still can), and ``oskctl updates`` says why. A deploy refused before
  it began (an instance of the plugin is stopped, say) is only waiting: it is tried
  again at the next check, and ``oskctl updates`` shows the refusal meanwhile.

Only versions newer than the running one and inside the config's range count, so an
operator who pinned ``1.2.3`` gets no updates.
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import TYPE_CHECKING, Any

from osk_daemon.config import UpdateMode
from osk_daemon.errors import ConfigError, ControlError
from osk_daemon.rollout.window import in_window, parse_window
from osk_daemon.supervisor.deploys import start_deploy
from osk_daemon.versioning.installed import scan
from osk_daemon.versioning.semver import Range, Version

if TYPE_CHECKING:
    from osk_daemon.supervisor.runtime import Supervisor

log = logging.getLogger("osk.updates")

__all__ = ["Updates"]

CHECK_EVERY_MS = 60_000


class Updates:
    def __init__(self, sup: Supervisor) -> None:
        self._sup = sup
        self.available: dict[str, str] = {}  # plugin -> newest fitting version not running
        self.failed: dict[str, tuple[str, str]] = {}  # plugin -> (version, why it failed)
        self.waiting: dict[str, tuple[str, str]] = {}  # plugin -> (version, why it was refused)

    async def run(self) -> None:
        """Check now, then on every change of the plugins directory and every minute."""
        plugins_dir = self._sup.config.daemon.plugins_dir
        if plugins_dir is None:
            return
        from watchfiles import awatch  # here: without a plugins_dir it is never needed

        self.check(dt.datetime.now())
        async for _ in awatch(
            plugins_dir,
            debounce=500,
            rust_timeout=CHECK_EVERY_MS,
            yield_on_timeout=True,
            ignore_permission_denied=True,
            stop_event=self._sup.stopping,
        ):
            self.check(dt.datetime.now())

    def check(self, now: dt.datetime) -> None:
        """Update ``available`` and start the automatic deploys that are due. ``now`` is
        local wall-clock time (windows are), passed in."""
        sup = self._sup
        plugins_dir = sup.config.daemon.plugins_dir
        if plugins_dir is None:
            return
        try:
            installed = scan(plugins_dir)
        except ConfigError as exc:
            log.warning("cannot read the plugins directory for updates: %s", exc)
            return
        self._note_rollbacks()
        for plugin, cfg in sup.config.plugins.items():
            asked = sup.deps.plan.ranges.get(plugin)
            versions = installed.get(plugin)
            if not asked or not versions or cfg.version is None:
                self.available.pop(plugin, None)
                continue
            best = Range.parse(asked).max_satisfying(versions)
            if best is None or not best > Version.parse(cfg.version):
                self.available.pop(plugin, None)
                continue
            if self.available.get(plugin) != str(best):
                log.info("%s: %s is installed (running %s)", plugin, best, cfg.version)
                sup.events.publish("plugin:update-available", pluginName=plugin, version=str(best))
            self.available[plugin] = str(best)
            if self._due(plugin, str(best), now):
                self._deploy(plugin, str(best))

    def listing(self, now: dt.datetime) -> list[dict[str, Any]]:
        """What ``oskctl updates`` shows."""
        self._note_rollbacks()
        rows = []
        for plugin, version in sorted(self.available.items()):
            cfg = self._sup.config.plugins.get(plugin)
            if cfg is None or cfg.version is None:
                continue
            if not Version.parse(version) > Version.parse(cfg.version):
                continue  # deployed since the last check
            update = cfg.update
            failed = self.failed.get(plugin)
            waiting = self.waiting.get(plugin)
            rows.append(
                {
                    "plugin": plugin,
                    "running": self._sup.config.plugins[plugin].version,
                    "available": version,
                    "mode": str(update.mode),
                    "window": update.window,
                    "in_window": update.window is None
                    or in_window(parse_window(update.window), now),
                    "failed": failed[1] if failed and failed[0] == version else None,
                    "waiting": waiting[1] if waiting and waiting[0] == version else None,
                }
            )
        return rows

    def _due(self, plugin: str, version: str, now: dt.datetime) -> bool:
        update = self._sup.config.plugins[plugin].update
        if update.mode is not UpdateMode.AUTO:
            return False
        if self.failed.get(plugin, ("", ""))[0] == version:
            return False
        if self._sup.rollouts.running(plugin) is not None:
            return False
        return update.window is None or in_window(parse_window(update.window), now)

    def _deploy(self, plugin: str, version: str) -> None:
        strategy = str(self._sup.config.plugins[plugin].update.strategy)
        try:
            start_deploy(self._sup, plugin, version, {"strategy": strategy})
        except ControlError as exc:
            if self.waiting.get(plugin) != (version, str(exc)):  # once per refusal
                log.warning("%s: automatic update to %s waits: %s", plugin, version, exc)
            self.waiting[plugin] = (version, str(exc))
            return
        self.waiting.pop(plugin, None)
        log.info("%s: automatic update to %s started (%s)", plugin, version, strategy)

    def _note_rollbacks(self) -> None:
        for plugin, run in self._sup.rollouts.runs.items():
            if run.engine.state == "rolled-back":
                self.failed.setdefault(plugin, (run.spec.canary, run.engine.reason))
