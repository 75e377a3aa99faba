"""The vocabulary of the supervision tree: specs, states, effects, errors, and its shape.

``tree.py`` holds the decisions; this module holds what they are made of, so that drivers
and config code can import the types without the machinery. ``Topology`` is the static
shape of a validated tree (parents, start order, which leaves sit under which node); it is
computed once and never changes while the tree runs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from osk_daemon.errors import ControlError, OskInternalError
from osk_daemon.supervisor.backoff import BackoffPolicy


class Strategy(StrEnum):
    ONE_FOR_ONE = "one_for_one"
    ONE_FOR_ALL = "one_for_all"
    REST_FOR_ONE = "rest_for_one"


class RestartType(StrEnum):
    PERMANENT = "permanent"  # always restarted, even after exit code 0
    TRANSIENT = "transient"  # restarted only after an abnormal exit
    TEMPORARY = "temporary"  # never restarted


class LeafState(StrEnum):
    STARTING = "starting"  # StartChild sent, child_started not yet heard
    RUNNING = "running"
    STOPPING = "stopping"  # StopChild sent, child_stopped not yet heard
    STOPPED = "stopped"  # by the operator, shutdown, or a normal end of transient/temporary
    RESTARTING = "restarting"  # down; waiting for a restart timer or for siblings to stop
    GAVE_UP = "gave_up"  # down because its group gave up


@dataclass(frozen=True)
class LeafSpec:
    id: str
    restart: RestartType
    backoff: BackoffPolicy = field(default_factory=BackoffPolicy)


@dataclass(frozen=True)
class GroupSpec:
    """A supervisor: ``children`` are leaf or group ids in start order. Groups are permanent."""

    id: str
    strategy: Strategy
    intensity: int
    period: float
    children: tuple[str, ...]


# ---- effects: the driver performs these, then reports back ---------------------------------


@dataclass(frozen=True)
class StartChild:
    """Spawn the leaf; report child_started when it is up, child_exited if it dies."""

    leaf: str


@dataclass(frozen=True)
class StopChild:
    """Stop the leaf (graceful ladder); report child_stopped when the process is gone.

    Consecutive StopChild effects in one list are performed in order, each finished first.
    """

    leaf: str
    reason: str


@dataclass(frozen=True)
class ArmRestartTimer:
    """Call ``timer_fired(token, now)`` after ``delay`` seconds."""

    token: int
    delay: float


@dataclass(frozen=True)
class GroupGaveUp:
    """``group`` had more than its intensity of restarts within ``period``; log and publish."""

    group: str
    restarts: int
    period: float


Effect = StartChild | StopChild | ArmRestartTimer | GroupGaveUp


# ---- errors -------------------------------------------------------------------------------


class TreeEventError(OskInternalError):
    """The driver reported an event the tree cannot accept: a bug in the driver."""

    def __init__(self, event: str, leaf: str, state: LeafState | None, why: str) -> None:
        self.event = event
        self.leaf = leaf
        self.state = state
        where = "unknown leaf" if state is None else f"leaf in state {state.value}"
        super().__init__(f"{event}('{leaf}'): {where}: {why}")


class TreeCommandError(ControlError):
    """An operator command or query the tree refuses (unknown id, tree shut down)."""


# ---- shape --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Topology:
    """The validated, static shape of a tree."""

    root: str
    parent: Mapping[str, str]  # every node but the root -> its group
    order: tuple[str, ...]  # every leaf, depth-first in start order
    leaves_under: Mapping[str, tuple[str, ...]]  # node -> leaves beneath it, in start order
    groups_under: Mapping[str, tuple[str, ...]]  # group -> itself and the groups beneath it

    @classmethod
    def build(
        cls, groups: Mapping[str, GroupSpec], leaves: Mapping[str, LeafSpec], root: str
    ) -> Topology:
        """Validate the specs and compute the shape. Raises ValueError naming the problem."""
        for key, g in groups.items():
            if g.id != key:
                raise ValueError(f"group registered as '{key}' has id '{g.id}'")
            if g.intensity < 0:
                raise ValueError(f"group '{key}': intensity must be >= 0, got {g.intensity}")
            if g.period <= 0:
                raise ValueError(f"group '{key}': period must be > 0, got {g.period}")
        for key, leaf in leaves.items():
            if leaf.id != key:
                raise ValueError(f"leaf registered as '{key}' has id '{leaf.id}'")
        both = sorted(set(groups) & set(leaves))
        if both:
            raise ValueError(f"ids used for both a group and a leaf: {both}")
        if root not in groups:
            raise ValueError(f"root group '{root}' is not defined")
        parent: dict[str, str] = {}
        for key, g in groups.items():
            for child in g.children:
                if child not in groups and child not in leaves:
                    raise ValueError(f"group '{key}' names unknown child '{child}'")
                if child == root:
                    raise ValueError(f"group '{key}' names the root '{root}' as a child (cycle)")
                if child in parent:
                    raise ValueError(
                        f"'{child}' has two parents: '{parent[child]}' and '{key}' "
                        "(each node must sit in exactly one group)"
                    )
                parent[child] = key
        for key in groups:
            seen = {key}
            node = key
            while node != root:
                if node not in parent:
                    raise ValueError(f"group '{key}' is not reachable from the root '{root}'")
                node = parent[node]
                if node in seen:
                    raise ValueError(f"groups form a cycle through '{key}'")
                seen.add(node)
        for key in leaves:
            if key not in parent:
                raise ValueError(f"leaf '{key}' is not a child of any group")

        leaves_under: dict[str, tuple[str, ...]] = {}
        groups_under: dict[str, tuple[str, ...]] = {}

        def walk(node: str) -> None:
            if node in leaves:
                leaves_under[node] = (node,)
                return
            found: list[str] = []
            subgroups: list[str] = [node]
            for child in groups[node].children:
                walk(child)
                found.extend(leaves_under[child])
                subgroups.extend(groups_under.get(child, ()))
            leaves_under[node] = tuple(found)
            groups_under[node] = tuple(subgroups)

        walk(root)
        return cls(root, parent, leaves_under[root], leaves_under, groups_under)
