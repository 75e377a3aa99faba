"""Graceful degradation: which plugins are degraded because what they need is down.

Theory of operation
-------------------
A ``DependencyGraph`` holds the plugins and the edges "dependent needs dependency",
each required or optional, plus the plugins that are ``offline_capable``. It is checked
once: every name is a known plugin, no plugin needs itself, there is no cycle.

The ``DependencyTracker`` is fed every plugin's status as it changes
(``DependencyStatusChanged``): one of the six ObjectStack health statuses or ``stopped``.
Each status gives a verdict:

- DOWN: ``unhealthy``, ``failed``, ``stopped``. Calls to it would fail or hang.
- UP: ``healthy``, ``recovering``, ``degraded``. It runs and answers. ``recovering`` is a
  restarted instance that answers again (its thresholds are the health core's business),
  and ``degraded`` is still an answer, just a partial one.
- NO VERDICT: ``unknown`` (just started, no check yet). It carries no information, so the
  plugin keeps its last verdict: a dependency that failed stays down until it proves up.
  A plugin never heard from counts as up; start order already waits for health.

Only a change of verdict matters (the transitions table below). When a dependency goes
DOWN, every dependent is sent ``dependency_down``; when it comes back UP, every dependent
is sent ``dependency_up``. Moves inside a verdict (``unhealthy`` -> ``failed``) or a
repeated status emit nothing; flapping is damped upstream by the health thresholds and
restart backoff, not here.

A plugin is degraded exactly when one of its *required* dependencies is down and it is
not ``offline_capable`` (those are told, but keep serving as healthy). Optional
dependencies only produce events. ``MarkDegraded`` carries the required dependencies that
are down and is sent again when that set changes; ``ClearDegraded`` when it empties.
Per dependent the state effect comes before the notification, so a plugin that asks for
its status on ``dependency_down`` already sees itself degraded.

Degradation is not transitive. With ``app -> echo -> store``, ``store`` failing degrades
``echo``, not ``app``. A degraded plugin runs and answers (DEGRADED counts as UP), and
most of its API may not touch the missing dependency; what does fails fast inside it,
because the broker refuses calls to ``store`` at once. Painting the whole upper graph
degraded for one failed leaf would overstate the damage and make recovery depend on a
chain of events. Each verdict therefore looks down exactly one edge; ``app`` is degraded
only if one of its own required dependencies is down.

``is_available`` is the broker's fast refusal: false only for a plugin whose own verdict
is DOWN. Degraded plugins stay available.

The core reads no clock and does no I/O; a driver feeds statuses and performs effects.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final, Literal, NamedTuple

from osk_daemon.errors import OskInternalError
from osk_daemon.worker.sdk import HealthStatus

__all__ = [
    "STOPPED",
    "ClearDegraded",
    "DependencyGraph",
    "DependencyStatusChanged",
    "DependencyTracker",
    "Edge",
    "Effect",
    "MarkDegraded",
    "Notify",
    "Status",
    "Verdict",
]

STOPPED: Final = "stopped"
Status = HealthStatus | Literal["stopped"]

H = HealthStatus


class Verdict(enum.StrEnum):
    UP = "up"
    DOWN = "down"
    NONE = "none"  # no information: keep the last verdict


VERDICTS: dict[Status, Verdict] = {
    H.HEALTHY: Verdict.UP,
    H.DEGRADED: Verdict.UP,
    H.RECOVERING: Verdict.UP,
    H.UNHEALTHY: Verdict.DOWN,
    H.FAILED: Verdict.DOWN,
    STOPPED: Verdict.DOWN,
    H.UNKNOWN: Verdict.NONE,
}

# (verdict held, verdict of the new status) -> the handler's name. The held verdict is
# UP or DOWN, never NONE, so this table is complete.
TRANSITIONS: dict[tuple[Verdict, Verdict], str] = {
    (Verdict.UP, Verdict.UP): "hold",
    (Verdict.UP, Verdict.NONE): "hold",
    (Verdict.UP, Verdict.DOWN): "went_down",
    (Verdict.DOWN, Verdict.DOWN): "hold",
    (Verdict.DOWN, Verdict.NONE): "hold",
    (Verdict.DOWN, Verdict.UP): "came_up",
}


# ---- the graph ------------------------------------------------------------------------------


class Edge(NamedTuple):
    """``dependent`` needs ``dependency``; an ``optional`` one only produces events."""

    dependent: str
    dependency: str
    optional: bool = False


class DependencyGraph:
    """Plugins, who needs whom, and who can serve offline. Immutable once built."""

    def __init__(
        self,
        plugins: Iterable[str],
        edges: Iterable[tuple[str, str, bool]] = (),
        offline_capable: Iterable[str] = (),
    ) -> None:
        """Check and index the graph.

        Raises ``ValueError`` for an edge or ``offline_capable`` entry naming an unknown
        plugin, a plugin that needs itself, an edge declared twice, or a cycle (the message
        names it: ``dependency cycle: a -> b -> a``). Cost O(plugins + edges).
        """
        self.plugins: frozenset[str] = frozenset(plugins)
        self.offline_capable: frozenset[str] = frozenset(offline_capable)
        unknown = sorted(self.offline_capable - self.plugins)
        if unknown:
            raise ValueError(f"offline_capable names unknown plugins: {', '.join(unknown)}")
        seen: set[tuple[str, str]] = set()
        self._needs: dict[str, list[Edge]] = {p: [] for p in self.plugins}
        self._needed_by: dict[str, list[Edge]] = {p: [] for p in self.plugins}
        for raw in edges:
            edge = Edge(*raw)
            for name in (edge.dependent, edge.dependency):
                if name not in self.plugins:
                    raise ValueError(
                        f"dependency {edge.dependent} -> {edge.dependency} names an unknown "
                        f"plugin '{name}'"
                    )
            if edge.dependent == edge.dependency:
                raise ValueError(f"plugin '{edge.dependent}' depends on itself")
            if (edge.dependent, edge.dependency) in seen:
                raise ValueError(
                    f"dependency {edge.dependent} -> {edge.dependency} is declared twice"
                )
            seen.add((edge.dependent, edge.dependency))
            self._needs[edge.dependent].append(edge)
            self._needed_by[edge.dependency].append(edge)
        for table in (self._needs, self._needed_by):
            for lst in table.values():
                lst.sort()
        cycle = self._find_cycle()
        if cycle:
            raise ValueError(f"dependency cycle: {' -> '.join(cycle)}")
        self.edges: tuple[Edge, ...] = tuple(sorted(e for es in self._needs.values() for e in es))

    def requirements(self, dependent: str) -> tuple[Edge, ...]:
        """The edges out of ``dependent`` (what it needs), sorted by dependency."""
        return tuple(self._needs[dependent])

    def dependents(self, dependency: str) -> tuple[Edge, ...]:
        """The edges into ``dependency`` (who needs it), sorted by dependent."""
        return tuple(self._needed_by[dependency])

    def _find_cycle(self) -> list[str]:
        state: dict[str, int] = {}  # 1 on the path, 2 done
        for root in sorted(self.plugins):
            if root in state:
                continue
            path = [root]
            state[root] = 1
            stack = [iter(self._needs[root])]
            while stack:
                edge = next(stack[-1], None)
                if edge is None:
                    stack.pop()
                    state[path.pop()] = 2
                    continue
                nxt = edge.dependency
                if state.get(nxt) == 1:
                    return [*path[path.index(nxt) :], nxt]
                if nxt not in state:
                    state[nxt] = 1
                    path.append(nxt)
                    stack.append(iter(self._needs[nxt]))
        return []


# ---- events and effects ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DependencyStatusChanged:
    plugin: str
    status: Status


Event = DependencyStatusChanged


@dataclass(frozen=True, slots=True)
class MarkDegraded:
    """Show ``plugin`` as degraded because of these required dependencies (sorted)."""

    plugin: str
    because: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ClearDegraded:
    plugin: str


@dataclass(frozen=True, slots=True)
class Notify:
    """Send ``plugin`` the ``event`` about ``dependency``."""

    plugin: str
    event: Literal["dependency_down", "dependency_up"]
    dependency: str
    optional: bool


Effect = MarkDegraded | ClearDegraded | Notify


# ---- the tracker ----------------------------------------------------------------------------


class DependencyTracker:
    """Every plugin's status and verdict; ``step`` applies one status change."""

    def __init__(self, graph: DependencyGraph) -> None:
        self.graph = graph
        self._status: dict[str, Status] = dict.fromkeys(graph.plugins, H.UNKNOWN)
        self._verdict: dict[str, Verdict] = dict.fromkeys(graph.plugins, Verdict.UP)
        self._last_decisive: dict[str, Status] = {}
        self._because: dict[str, tuple[str, ...]] = {}

    def step(self, event: Event) -> list[Effect]:
        """Record ``event.status`` for ``event.plugin``; return what the driver must do.

        Raises ``OskInternalError`` for a plugin the graph does not know or a status that
        is not one of the seven. Cost O(dependents of the plugin x their requirements).
        """
        plugin = event.plugin
        if plugin not in self._status:
            raise OskInternalError(f"dependency tracker: unknown plugin '{plugin}'")
        status = _normalise(event.status)
        if status is None:
            raise OskInternalError(
                f"dependency tracker: status {event.status!r} of plugin '{plugin}' is not a "
                f"health status or 'stopped'"
            )
        new = VERDICTS[status]
        handler = TRANSITIONS[(self._verdict[plugin], new)]
        self._status[plugin] = status
        if new is not Verdict.NONE:
            self._last_decisive[plugin] = status
        effects: list[Effect] = getattr(self, "_" + handler)(plugin)
        return effects

    # ---- queries ------------------------------------------------------------------------

    def status(self, plugin: str) -> Status:
        """The last status reported for ``plugin`` (``unknown`` before any)."""
        return self._status[plugin]

    def is_available(self, plugin: str) -> bool:
        """May the broker route a call to ``plugin``? False when its own verdict is DOWN
        (or the name is unknown); a degraded plugin is available. O(1)."""
        return self._verdict.get(plugin) is Verdict.UP

    def is_degraded(self, plugin: str) -> bool:
        return plugin in self._because

    @property
    def degraded(self) -> frozenset[str]:
        """The plugins marked degraded now."""
        return frozenset(self._because)

    def down_requirements(self, plugin: str) -> tuple[str, ...]:
        """Required dependencies of ``plugin`` that are down, sorted (offline_capable too)."""
        return tuple(
            e.dependency
            for e in self.graph.requirements(plugin)
            if not e.optional and self._verdict[e.dependency] is Verdict.DOWN
        )

    def explain(self, plugin: str) -> str:
        """One sentence for a person: 'echo is degraded: its required dependency store is
        failed'."""
        if plugin not in self._status:
            return f"{plugin} is not a known plugin"
        down = self.down_requirements(plugin)
        optional_down = tuple(
            e.dependency
            for e in self.graph.requirements(plugin)
            if e.optional and self._verdict[e.dependency] is Verdict.DOWN
        )
        own = self._describe(plugin)
        if plugin in self._because:
            head = (
                f"{plugin} is degraded"
                if self._verdict[plugin] is Verdict.UP
                else f"{plugin} is {own} and degraded"
            )
            text = f"{head}: {self._list('required', down)}"
        elif down:
            text = f"{plugin} is {own} and serves offline: {self._list('required', down)}"
        elif self._status[plugin] is H.UNKNOWN and plugin not in self._last_decisive:
            text = f"{plugin} has no health verdict yet"
        else:
            text = f"{plugin} is {own}"
        if optional_down:
            text += f"; {self._list('optional', optional_down)}"
        return text

    def _describe(self, plugin: str) -> str:
        status = self._status[plugin]
        last = self._last_decisive.get(plugin)
        if status is H.UNKNOWN and last is not None:
            return f"unknown (last seen {last})"
        return str(status)

    def _list(self, kind: str, deps: tuple[str, ...]) -> str:
        if len(deps) == 1:
            return f"its {kind} dependency {deps[0]} is {self._describe(deps[0])}"
        parts = ", ".join(f"{d} is {self._describe(d)}" for d in deps)
        return f"its {kind} dependencies are down: {parts}"

    # ---- handlers -----------------------------------------------------------------------

    def _hold(self, plugin: str) -> list[Effect]:
        return []

    def _went_down(self, plugin: str) -> list[Effect]:
        self._verdict[plugin] = Verdict.DOWN
        return self._tell_dependents(plugin, "dependency_down")

    def _came_up(self, plugin: str) -> list[Effect]:
        self._verdict[plugin] = Verdict.UP
        return self._tell_dependents(plugin, "dependency_up")

    def _tell_dependents(
        self, dependency: str, event: Literal["dependency_down", "dependency_up"]
    ) -> list[Effect]:
        effects: list[Effect] = []
        for edge in self.graph.dependents(dependency):
            if not edge.optional:
                effects.extend(self._recompute(edge.dependent))
            effects.append(Notify(edge.dependent, event, dependency, edge.optional))
        return effects

    def _recompute(self, plugin: str) -> list[Effect]:
        if plugin in self.graph.offline_capable:
            return []
        because = self.down_requirements(plugin)
        if because == self._because.get(plugin, ()):
            return []
        if because:
            self._because[plugin] = because
            return [MarkDegraded(plugin, because)]
        del self._because[plugin]
        return [ClearDegraded(plugin)]


def _normalise(status: str) -> Status | None:
    """The enum member for a status given as a plain string, or None if it is none of ours."""
    if status == STOPPED:
        return STOPPED
    try:
        return HealthStatus(status)
    except ValueError:
        return None
