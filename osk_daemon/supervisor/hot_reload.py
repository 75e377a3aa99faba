"""Hot reload for development: a plugin with ``watch = ["**/*.py"]`` is swapped to its
new code whenever a watched file changes.

Theory of operation
-------------------
One task per watching plugin runs ``watchfiles.awatch`` over the plugin's code folders
(``path``), debounced by ``watch_debounce`` (a burst of saves is one change), keeping only
changes whose path, relative to the folder that holds it, matches one of the globs. A
change starts a rolling swap to the *same* config: the canary is told apart by identity,
not version, so new processes import the edited code while the old ones keep serving,
and the state is handed over as in any swap. A change that arrives while a swap runs is
remembered and applied once that swap ends, so the last edit always wins.

``HotReloads.sync`` keeps one watcher per plugin that wants one, in step with the running
config: it is called at start and whenever the config changes (reload, load, unload, a
finished swap), starts a watcher for a plugin that now has ``watch``, and restarts one
whose folders or globs changed (a deployed version has another folder) or cancels one
whose plugin is gone or no longer watched.

The watcher reads the file system only; it never imports plugin code in the daemon.
"""

from __future__ import annotations

import logging
from fnmatch import fnmatch
from pathlib import Path
from typing import TYPE_CHECKING

import anyio

from osk_daemon.errors import ControlError
from osk_daemon.supervisor.rollouts import spec_for

if TYPE_CHECKING:
    from osk_daemon.supervisor.runtime import Supervisor

log = logging.getLogger("osk.hot-reload")

__all__ = ["HotReloads", "watch_plugin"]

_Watched = tuple[tuple[str, ...], tuple[str, ...], float]  # folders, globs, debounce


class HotReloads:
    """The running watchers, one per watching plugin (see the module docstring)."""

    def __init__(self, sup: Supervisor) -> None:
        self._sup = sup
        self._watching: dict[str, tuple[_Watched, anyio.CancelScope]] = {}

    def sync(self) -> None:
        wanted: dict[str, _Watched] = {
            name: (tuple(map(str, cfg.path)), tuple(cfg.watch), cfg.watch_debounce)
            for name, cfg in self._sup.config.plugins.items()
            if cfg.watch
        }
        for name, (what, scope) in list(self._watching.items()):
            if wanted.get(name) != what:
                scope.cancel()
                del self._watching[name]
        for name, what in wanted.items():
            if name not in self._watching:
                scope = anyio.CancelScope()
                self._watching[name] = (what, scope)
                self._sup.spawn_task(self._watch, name, scope)

    async def _watch(self, plugin: str, scope: anyio.CancelScope) -> None:
        with scope:
            await watch_plugin(self._sup, plugin)


def _matches(path: str, roots: list[Path], globs: list[str]) -> bool:
    for root in roots:
        try:
            relative = Path(path).relative_to(root).as_posix()
        except ValueError:
            continue
        if any(fnmatch(relative, g) or fnmatch(Path(relative).name, g) for g in globs):
            return True
    return False


async def watch_plugin(sup: Supervisor, plugin: str) -> None:
    """Swap ``plugin`` to its edited code on every debounced change; runs until cancelled."""
    cfg = sup.config.plugins[plugin]
    roots = [Path(p) for p in cfg.path if await anyio.Path(p).is_dir()]
    if not roots:
        log.warning("%s: watch is set but no path folder exists; not watching", plugin)
        return
    globs = list(cfg.watch)
    from watchfiles import Change, awatch  # here: a daemon with nothing to watch skips it

    def wanted(change: Change, path: str) -> bool:
        return change is not Change.deleted and _matches(path, roots, globs)

    log.info("%s: watching %s for %s", plugin, ", ".join(map(str, roots)), ", ".join(globs))
    debounce = int(cfg.watch_debounce * 1000)
    async for changes in awatch(
        *roots, watch_filter=wanted, debounce=debounce, step=20, stop_event=sup.stopping
    ):
        names = sorted({Path(p).name for _, p in changes})
        log.info("%s: %s changed; swapping to the new code", plugin, ", ".join(names))
        sup.events.publish("plugin:code-changed", pluginName=plugin, files=names)
        await _swap_when_free(sup, plugin)


async def _swap_when_free(sup: Supervisor, plugin: str) -> None:
    running = sup.rollouts.running(plugin)
    if running is not None:
        await running.finished.wait()  # the last edit wins: swap once more after it
    async with sup.reloading:  # not while a reload changes plugins (it checked rollouts)
        current = sup.config.plugins.get(plugin)
        if current is None:
            return  # unloaded meanwhile (its watcher is being cancelled)
        fresh = current.model_copy()  # same settings, a new identity: new processes, code
        live = len([i for i in sup.members.of_plugin(plugin) if not i.retiring]) or 1
        try:
            spec = spec_for(plugin, current, fresh, {"strategy": "rolling", "instances": live})
            run = sup.rollouts.deploy(plugin, fresh, spec)
        except ControlError as exc:
            log.warning("%s: cannot hot-reload now: %s", plugin, exc)
            return
    with anyio.move_on_after(current.rollout.progress_deadline + 30):
        await run.finished.wait()
