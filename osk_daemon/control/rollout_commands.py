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
from collections.abc import AsyncIterator, Callable
from typing import Any

from osk_daemon.errors import ControlError
from osk_daemon.supervisor.deploys import start_deploy
from osk_daemon.supervisor.rollouts import RolloutRun
from osk_daemon.supervisor.runtime import Supervisor

_END_EVENTS = frozenset({"rollout:succeeded", "rollout:rolled-back"})
_TICK = 1.0  # seconds between looks at a followed rollout's status


def _str(args: dict[str, Any], key: str) -> str:
    value = args.get(key)
    if not isinstance(value, str) or not value:
        raise ControlError(f"argument '{key}' must be a non-empty string")
    return value


def _started(
    sup: Supervisor, start: Callable[[], RolloutRun], follow: bool
) -> RolloutRun | AsyncIterator[Any]:
    """Start a rollout; with ``follow``, its events from the very first one on."""
    if not follow:
        return start()
    queue: asyncio.Queue[dict[str, Any]] = sup.events.follow()
    try:
        run = start()
    except BaseException:
        sup.events.unfollow(queue)
        raise
    return _follow(sup, run, queue)


async def _follow(
    sup: Supervisor, run: RolloutRun, queue: asyncio.Queue[dict[str, Any]]
) -> AsyncIterator[Any]:
    """The rollout's status, then each of its events with the status after it, until it
    ends; between events, the status again whenever it changed (instances that became
    ready, say), looked at every ``_TICK`` seconds."""
    try:
        last = run.status()
        yield last
        while not run.finished.is_set() or not queue.empty():
            try:
                event = await asyncio.wait_for(queue.get(), _TICK)
            except TimeoutError:
                if (now := run.status()) != last:
                    last = now
                    yield now
                continue
            if event.get("pluginName") != run.spec.plugin or not str(
                event.get("type", "")
            ).startswith("rollout:"):
                continue
            last = run.status()
            yield {"event": event, "status": last}
            if event["type"] in _END_EVENTS:
                return
    finally:
        sup.events.unfollow(queue)


async def deploy(sup: Supervisor, args: dict[str, Any]) -> Any:
    plugin, version = _str(args, "plugin"), _str(args, "version")
    started = _started(
        sup, lambda: start_deploy(sup, plugin, version, args), bool(args.get("follow"))
    )
    return started.status() if isinstance(started, RolloutRun) else started


async def rollout(sup: Supervisor, args: dict[str, Any]) -> Any:
    action = _str(args, "action")
    name = args.get("plugin")
    if action == "status":
        if name is None:
            return sup.rollouts.statuses()
        run = sup.rollouts.get(_str(args, "plugin"))
        if not args.get("follow") or run.finished.is_set():
            return run.status()
        return _follow(sup, run, sup.events.follow())  # whoever started it: live
    plugin = _str(args, "plugin")
    run = sup.rollouts.get(plugin)
    if action == "rollback":
        if not run.finished.is_set() and run.status()["state"] == "finishing":
            raise ControlError(
                f"the rollout of '{plugin}' is finishing (its last leaving instances are "
                "stopping); roll back once it has ended"
            )
        if not run.finished.is_set():
            return run.command("abort")
        back = run.spec.stable if run.engine.state == "succeeded" else None
        if back is None:
            raise ControlError(f"the rollout of '{plugin}' was rolled back already")
        started = _started(
            sup, lambda: start_deploy(sup, plugin, back, args), bool(args.get("follow"))
        )
        return started.status() if isinstance(started, RolloutRun) else started
    return run.command(action)
