"""Holding an instance's start until the plugins it requires are up.

Theory of operation
-------------------
The tree decides *that* a leaf starts; the gate decides *when*. The tree emits StartChild
for every leaf at once (in start order), so independent plugins start in parallel, and the
gate holds a leaf whose plugin has a required dependency that is not up yet. A plugin is
up when one of its instances is ready and its health says it answers (healthy, degraded or
recovering: ``plugin_status`` below); a dependency with health checks enabled is therefore
up only after its first good check, not merely when its process said READY. When a plugin
comes up, every held leaf whose requirements are now all up is released, in the order it
was requested. The start waves of ``versioning.start_order`` are what this produces when
every start succeeds; a slow dependency delays only what needs it.

The same rule holds for restarts: a dependent that crashes while its dependency is down
waits for the dependency instead of crash-looping against it. Optional requirements never
hold a start (the plan only orders them first). A held leaf that is stopped or shut down
is cancelled.

Pure: no clock, no I/O. The driver reports ``set_up`` after every change of a plugin's
status and performs the releases.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Final

from osk_daemon.errors import OskInternalError
from osk_daemon.supervisor.dependencies import STOPPED, Status
from osk_daemon.worker.sdk import HealthStatus

__all__ = ["UP_STATUSES", "StartGate", "plugin_status"]

H = HealthStatus
UP_STATUSES: Final = frozenset({H.HEALTHY, H.DEGRADED, H.RECOVERING})

# Best first: a plugin is as available as its most available instance.
_RANK: Final[dict[Status, int]] = {
    H.HEALTHY: 6,
    H.DEGRADED: 5,
    H.RECOVERING: 4,
    H.UNKNOWN: 3,
    H.UNHEALTHY: 2,
    H.FAILED: 1,
    STOPPED: 0,
}


def plugin_status(instances: Iterable[Status]) -> Status:
    """A plugin's status from its instances': the best of them (``stopped`` for none)."""
    return max(instances, key=_RANK.__getitem__, default=STOPPED)


class StartGate:
    """Which leaves wait for which plugins. Not thread-safe; calls cost O(held leaves)."""

    def __init__(self, requires: Mapping[str, Iterable[str]]) -> None:
        """``requires`` maps a plugin to the plugins it cannot start without."""
        self._requires = {p: frozenset(deps) for p, deps in requires.items()}
        for plugin, deps in self._requires.items():
            unknown = sorted(deps - self._requires.keys())
            if unknown:
                raise OskInternalError(f"start gate: {plugin} requires unknown {unknown}")
        self._up: set[str] = set()
        self._held: dict[str, str] = {}  # leaf -> plugin, in request order

    def is_up(self, plugin: str) -> bool:
        return plugin in self._up

    def waiting_for(self, plugin: str) -> tuple[str, ...]:
        """The required plugins of ``plugin`` that are not up, sorted."""
        return tuple(sorted(d for d in self._requires.get(plugin, ()) if d not in self._up))

    def held(self, leaf: str) -> bool:
        return leaf in self._held

    def held_leaves(self) -> list[tuple[str, str]]:
        """(leaf, plugin) of every held leaf, in request order."""
        return list(self._held.items())

    def request(self, leaf: str, plugin: str) -> bool:
        """The tree wants ``leaf`` (of ``plugin``) started: True to start it now, False if
        it is held until its requirements are up."""
        if plugin not in self._requires:
            raise OskInternalError(f"start gate: unknown plugin '{plugin}'")
        if self.waiting_for(plugin):
            self._held[leaf] = plugin
            return False
        self._held.pop(leaf, None)
        return True

    def cancel(self, leaf: str) -> bool:
        """Forget a held leaf (it was stopped); True if it was held."""
        return self._held.pop(leaf, None) is not None

    def set_up(self, plugin: str, up: bool) -> list[str]:
        """Record whether ``plugin`` is up; return the held leaves released by it coming up."""
        if plugin not in self._requires:
            raise OskInternalError(f"start gate: unknown plugin '{plugin}'")
        if not up:
            self._up.discard(plugin)
            return []
        if plugin in self._up:
            return []
        self._up.add(plugin)
        released = [leaf for leaf, p in self._held.items() if not self.waiting_for(p)]
        for leaf in released:
            del self._held[leaf]
        return released
