"""The OTP supervision tree's decisions: which leaves to stop, start and when.

Theory of operation
-------------------
Leaves are processes; groups are supervisors with a strategy and an intensity, and count
as permanent children of their parent. The tree never touches a process: every method
takes an event (plus ``now``, and ``rand`` where a delay is drawn) and returns effects for
the driver, which reports back with ``child_started`` / ``child_exited`` /
``child_stopped`` / ``timer_fired``.

Every restart is a *batch*, owned by the group whose strategy made it (or by the operator).
A batch claims leaves: the live ones get a StopChild (in reverse start order) and become
STOPPING; the dead ones wait as RESTARTING. When no claimed leaf is still stopping and its
timer (the exited child's backoff delay, armed at once) has fired, the batch emits
StartChild for its RESTARTING leaves in start order. A new batch that claims leaves of an
older one absorbs them (and inherits its pending delay), so a sibling crashing in the
middle of a rest_for_one restart widens the restart instead of racing it; an emptied batch
is dropped and its timer token goes stale. The book of batches in flight (claim, release, finish) is
``tree_batches``; this module decides what goes into them.

Children of the group that the strategy sweeps along: a leaf is stopped and restarted,
except temporary ones (stopped, then left STOPPED, as in OTP) and leaves the operator
stopped or that are GAVE_UP (left alone). A swept *group* is restarted fresh: every leaf
beneath it except operator-stopped ones, with its restart history cleared.

A group that records more than ``intensity`` restarts within ``period`` gives up: an
*escalation* batch stops its live leaves (which land in GAVE_UP), emits GroupGaveUp and,
once they are all down, reports the group to its parent as a child that exited abnormally.
The root has no parent: the tree stays down until the operator starts something. Groups
restarted by their parent back off like leaves (default BackoffPolicy, per group).

Operator commands never count toward intensity and act at once: stop makes leaves sticky
STOPPED (no strategy restarts them); start/restart claim leaves into an operator batch with
no delay, revive any gave-up group above them, and clear stickiness. shutdown() cancels all
batches and stops everything; afterwards exits only record stops until start().
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace

from osk_daemon.errors import OskInternalError
from osk_daemon.supervisor.backoff import Backoff, BackoffPolicy
from osk_daemon.supervisor.tree_batches import LIVE, Batches, BatchKind, GroupRecord, LeafRecord
from osk_daemon.supervisor.tree_types import (
    ArmRestartTimer,
    Effect,
    GroupGaveUp,
    GroupSpec,
    LeafSpec,
    LeafState,
    RestartType,
    StartChild,
    StopChild,
    Strategy,
    Topology,
    TreeCommandError,
    TreeEventError,
)

__all__ = [
    "ArmRestartTimer",
    "Effect",
    "GroupGaveUp",
    "GroupSpec",
    "LeafSpec",
    "LeafState",
    "RestartType",
    "StartChild",
    "StopChild",
    "Strategy",
    "Tree",
    "TreeCommandError",
    "TreeEventError",
]

S = LeafState

# Leaf transitions (state, what happened -> next state):
#   STOPPED     start / operator start           -> STARTING      StartChild
#   STOPPED     swept into a restart (transient) -> RESTARTING
#   STARTING    child_started                    -> RUNNING
#   STARTING,   child_exited, to be restarted    -> RESTARTING    (strategy effects)
#   RUNNING     child_exited, not restarted      -> STOPPED       (temporary, transient normal)
#               stop, restart, sweep, give-up    -> STOPPING      StopChild
#   STOPPING    child_stopped / child_exited     -> RESTARTING, STOPPED or GAVE_UP (who asked)
#   STOPPING    child_started (late report)      -> STOPPING
#   RESTARTING  batch done (timer, siblings)     -> STARTING      StartChild
#   RESTARTING  operator stop, shutdown          -> STOPPED
#   RESTARTING  group gives up                   -> GAVE_UP
#   GAVE_UP     operator start, parent restart   -> RESTARTING / STARTING
#   GAVE_UP     operator stop                    -> STOPPED
_MOVES: Mapping[LeafState, frozenset[LeafState]] = {
    S.STOPPED: frozenset({S.STARTING, S.RESTARTING}),
    S.STARTING: frozenset({S.RUNNING, S.RESTARTING, S.STOPPED, S.STOPPING}),
    S.RUNNING: frozenset({S.RESTARTING, S.STOPPED, S.STOPPING}),
    S.STOPPING: frozenset({S.RESTARTING, S.STOPPED, S.GAVE_UP}),
    S.RESTARTING: frozenset({S.STARTING, S.STOPPED, S.GAVE_UP}),
    S.GAVE_UP: frozenset({S.RESTARTING, S.STARTING, S.STOPPED}),
}

# Driver events: the states in which each is legal, and what is wrong otherwise.
_ACCEPTS: Mapping[str, tuple[frozenset[LeafState], str]] = {
    "child_started": (frozenset({S.STARTING, S.STOPPING}), "no StartChild is in flight"),
    "child_exited": (frozenset({S.STARTING, S.RUNNING, S.STOPPING}), "it has no process"),
    "child_stopped": (frozenset({S.STOPPING}), "no StopChild is in flight"),
}

GROUP_BACKOFF = BackoffPolicy()


class Tree:
    """The decisions of one supervision tree. Not thread-safe; every call is O(leaves)."""

    def __init__(
        self, groups: Mapping[str, GroupSpec], leaves: Mapping[str, LeafSpec], root: str = "root"
    ) -> None:
        """Validate the shape; raises ValueError naming the problem. Nothing starts yet."""
        self._topo = Topology.build(groups, leaves, root)
        self._leaves = {k: LeafRecord(s, Backoff(s.backoff)) for k, s in leaves.items()}
        self._groups = {k: GroupRecord(s, Backoff(GROUP_BACKOFF)) for k, s in groups.items()}
        self._batches = Batches(
            self._topo.order, self._leaves, self._groups, self._move, self._escalated
        )
        self._shut = False

    # ---- queries ----------------------------------------------------------------------------

    @property
    def topology(self) -> Topology:
        return self._topo

    def leaf_state(self, leaf: str) -> LeafState:
        return self._leaf(leaf).state

    def restarts(self, leaf: str) -> int:
        """How many times the tree (not the operator) restarted this leaf."""
        return self._leaf(leaf).restarts

    def group_gave_up(self, group: str) -> bool:
        if group not in self._groups:
            raise TreeCommandError(f"no group named '{group}'")
        return self._groups[group].gave_up

    # ---- changing the shape (rollouts, reload) ----------------------------------------------

    def add_leaf(self, spec: LeafSpec, group: str, after: str | None = None) -> None:
        """Add a STOPPED leaf to ``group``, after the child ``after`` (default: last).

        Start it with ``start_children``. Raises TreeCommandError for an unknown group or
        ``after``, or a leaf id that exists. Cost O(nodes).
        """
        if spec.id in self._leaves or spec.id in self._groups:
            raise TreeCommandError(f"'{spec.id}' is already in the tree")
        record = self._groups.get(group)
        if record is None:
            raise TreeCommandError(f"no group named '{group}'")
        children = list(record.spec.children)
        if after is None:
            children.append(spec.id)
        elif after in children:
            children.insert(children.index(after) + 1, spec.id)
        else:
            raise TreeCommandError(f"'{after}' is not a child of group '{group}'")
        self._leaves[spec.id] = LeafRecord(spec, Backoff(spec.backoff))
        self._reshape(group, tuple(children))

    def update_leaf(self, spec: LeafSpec) -> None:
        """New restart type and backoff for an existing leaf (a reload); its state stays."""
        record = self._leaf(spec.id)
        record.spec = spec
        record.backoff = Backoff(spec.backoff)

    def remove_leaf(self, leaf: str) -> None:
        """Forget a leaf that is STOPPED and in no batch. Raises TreeCommandError else."""
        record = self._leaf(leaf)
        if record.state is not S.STOPPED or record.batch is not None:
            raise TreeCommandError(f"leaf '{leaf}' is {record.state}; stop it before removing it")
        group = self._topo.parent[leaf]
        children = tuple(c for c in self._groups[group].spec.children if c != leaf)
        del self._leaves[leaf]
        self._reshape(group, children)

    def _reshape(self, group: str, children: tuple[str, ...]) -> None:
        record = self._groups[group]
        record.spec = replace(record.spec, children=children)
        self._topo = Topology.build(
            {k: g.spec for k, g in self._groups.items()},
            {k: leaf.spec for k, leaf in self._leaves.items()},
            self._topo.root,
        )
        self._batches.reorder(self._topo.order)

    # ---- driver events ----------------------------------------------------------------------

    def start(self, now: float) -> list[Effect]:
        """Start every leaf that is down, depth-first in start order, with a fresh slate:
        restart histories, backoffs and gave-up flags are cleared, shutdown is lifted."""
        self._shut = False
        for g in self._groups.values():
            self._revive(g.spec.id)
            g.history.clear()
            g.backoff = Backoff(GROUP_BACKOFF)
            g.backoff.started(now)
        for leaf in self._leaves.values():
            leaf.backoff = Backoff(leaf.spec.backoff)
        return self._operator_start(self._topo.order, now, stop_live=False)

    def child_started(self, leaf: str, now: float) -> list[Effect]:
        """The leaf is up. A late report for a leaf already being stopped is ignored."""
        state = self._accept("child_started", leaf)
        if state is S.STARTING:
            self._move(leaf, S.RUNNING)
            self._leaves[leaf].backoff.started(now)
        return []

    def child_exited(self, leaf: str, abnormal: bool, now: float, rand: float) -> list[Effect]:
        """The leaf died on its own (crash, failed start, killed by a health check).

        A leaf we were already stopping counts as stopped. ``rand`` in [0, 1) jitters the
        restart delay. Raises TreeEventError if the leaf has no process.
        """
        if not 0.0 <= rand < 1.0:
            raise ValueError(f"rand must be in [0, 1), got {rand}")
        if self._accept("child_exited", leaf) is S.STOPPING:
            return self._batches.stopped(leaf, now)
        kind = self._leaves[leaf].spec.restart
        out: list[Effect] = []
        if (
            self._shut
            or kind is RestartType.TEMPORARY
            or (kind is not RestartType.PERMANENT and not abnormal)
        ):
            self._move(leaf, S.STOPPED)
            return out
        self._move(leaf, S.RESTARTING)
        self._child_down(self._topo.parent[leaf], leaf, now, rand, out)
        return out

    def child_stopped(self, leaf: str, now: float) -> list[Effect]:
        """A StopChild completed: the process is gone. Raises TreeEventError otherwise."""
        self._accept("child_stopped", leaf)
        return self._batches.stopped(leaf, now)

    def timer_fired(self, token: int, now: float) -> list[Effect]:
        """An ArmRestartTimer ran out. Stale tokens (cancelled or absorbed batches) -> []."""
        out: list[Effect] = []
        self._batches.fire(token, now, out)
        return out

    # ---- operator commands ------------------------------------------------------------------

    def stop(self, ids: Sequence[str], now: float) -> list[Effect]:
        """Stop leaves (groups: every leaf beneath) in reverse start order; they stay down
        until started again. Raises TreeCommandError for an unknown id."""
        out: list[Effect] = []
        touched: set[int] = set()
        for name in reversed(self._expand(ids)):
            leaf = self._leaves[name]
            leaf.sticky = True
            if leaf.batch is not None:
                touched.add(leaf.batch)
                leaf.batch = None
            if leaf.state in LIVE:
                out.append(StopChild(name, "operator_stop"))
                self._move(name, S.STOPPING)
            if leaf.state is S.STOPPING:
                leaf.settle = S.STOPPED
            else:
                self._move(name, S.STOPPED)
        for bid in sorted(touched):
            self._batches.try_finish(bid, now, out)
        return out

    def start_children(self, ids: Sequence[str], now: float) -> list[Effect]:
        """Start leaves that are down (at once, no backoff); revives gave-up groups above.
        Raises TreeCommandError for an unknown id or after shutdown()."""
        return self._operator_start(self._expand(ids, refuse_if_shut=True), now, stop_live=False)

    def restart(self, ids: Sequence[str], now: float) -> list[Effect]:
        """Stop the live ones among the leaves, then start them all. Never counted."""
        return self._operator_start(self._expand(ids, refuse_if_shut=True), now, stop_live=True)

    def shutdown(self, now: float) -> list[Effect]:
        """Stop every live leaf in reverse start order; nothing restarts until start()."""
        self._shut = True
        self._batches.clear()
        out: list[Effect] = []
        for name in reversed(self._topo.order):
            leaf = self._leaves[name]
            leaf.batch = None
            if leaf.state in LIVE:
                out.append(StopChild(name, "shutdown"))
                self._move(name, S.STOPPING)
            if leaf.state is S.STOPPING:
                leaf.settle = S.STOPPED
            elif leaf.state is S.RESTARTING:
                self._move(name, S.STOPPED)
        return out

    # ---- decisions --------------------------------------------------------------------------

    def _child_down(self, gid: str, child: str, now: float, rand: float, out: list[Effect]) -> None:
        """``child`` of group ``gid`` died and must be restarted: count it, then apply the
        strategy, or give the group up."""
        group = self._groups[gid]
        spec = group.spec
        group.history = [t for t in group.history if t >= now - spec.period]
        group.history.append(now)
        if len(group.history) > spec.intensity:
            self._give_up(gid, now, rand, out)
            return
        kids = spec.children
        if spec.strategy is Strategy.ONE_FOR_ONE:
            members: Sequence[str] = (child,)
        elif spec.strategy is Strategy.ONE_FOR_ALL:
            members = kids
        else:
            members = kids[kids.index(child) :]
        backoff = (
            self._leaves[child].backoff if child in self._leaves else self._groups[child].backoff
        )
        delay = backoff.next_delay(now, rand)
        batch = self._batches.open(BatchKind.RESTART, gid)
        stops: list[StopChild] = []
        touched: set[int] = set()
        fresh: list[str] = []
        for m in members:
            if m in self._groups:
                for sub in self._topo.groups_under[m]:
                    self._groups[sub].history.clear()
                    self._groups[sub].gave_up = False
                    fresh.append(sub)
                for name in self._topo.leaves_under[m]:
                    if not self._leaves[name].sticky:
                        self._batches.claim(name, batch.id, S.RESTARTING, "restart", touched, stops)
                continue
            leaf = self._leaves[m]
            if m == child:
                leaf.batch = batch.id
            elif leaf.sticky or leaf.state is S.GAVE_UP:
                continue
            elif leaf.spec.restart is RestartType.TEMPORARY:
                self._batches.claim(m, batch.id, S.STOPPED, "restart", touched, stops)
            else:
                self._batches.claim(m, batch.id, S.RESTARTING, "restart", touched, stops)
        batch.fresh = tuple(fresh)
        delay = self._batches.inherit_delay(delay, touched, now)
        batch.due = now + delay
        out.extend(reversed(stops))
        if delay > 0:
            out.append(ArmRestartTimer(self._batches.arm(batch), delay))
        self._batches.release(touched, now, out)
        self._batches.try_finish(batch.id, now, out)

    def _give_up(self, gid: str, now: float, rand: float, out: list[Effect]) -> None:
        group = self._groups[gid]
        group.gave_up = True
        bid = self._batches.open(BatchKind.ESCALATE, gid, rand=rand).id
        stops: list[StopChild] = []
        touched: set[int] = set()
        for name in self._topo.leaves_under[gid]:
            if not self._leaves[name].sticky:
                self._batches.claim(name, bid, S.GAVE_UP, "group_gave_up", touched, stops)
        out.extend(reversed(stops))
        out.append(GroupGaveUp(gid, len(group.history), group.spec.period))
        self._batches.release(touched, now, out)
        self._batches.try_finish(bid, now, out)

    def _escalated(self, gid: str, now: float, rand: float, out: list[Effect]) -> None:
        """A gave-up group's leaves are all down: its parent sees a child that crashed."""
        if gid != self._topo.root:
            self._child_down(self._topo.parent[gid], gid, now, rand, out)

    def _operator_start(self, names: Sequence[str], now: float, *, stop_live: bool) -> list[Effect]:
        for name in names:
            node = name
            while node in self._topo.parent:
                node = self._topo.parent[node]
                self._revive(node)
        bid = self._batches.open(BatchKind.OPERATOR, "").id
        stops: list[StopChild] = []
        touched: set[int] = set()
        for name in names:
            leaf = self._leaves[name]
            leaf.sticky = False
            if stop_live or leaf.state not in LIVE:
                self._batches.claim(name, bid, S.RESTARTING, "operator_restart", touched, stops)
        out: list[Effect] = list(reversed(stops))
        self._batches.release(touched, now, out)
        self._batches.try_finish(bid, now, out)
        return out

    def _revive(self, gid: str) -> None:
        """An operator start under a gave-up group: supervise it again, drop its escalation."""
        group = self._groups[gid]
        if not group.gave_up:
            return
        group.gave_up = False
        group.history.clear()
        self._batches.drop_escalations(gid)

    # ---- plumbing ---------------------------------------------------------------------------

    def _leaf(self, name: str) -> LeafRecord:
        leaf = self._leaves.get(name)
        if leaf is None:
            raise TreeCommandError(f"no leaf named '{name}'")
        return leaf

    def _accept(self, event: str, name: str) -> LeafState:
        leaf = self._leaves.get(name)
        if leaf is None:
            raise TreeEventError(event, name, None, "no such leaf in the tree")
        states, why = _ACCEPTS[event]
        if leaf.state not in states:
            raise TreeEventError(event, name, leaf.state, why)
        return leaf.state

    def _move(self, name: str, new: LeafState) -> None:
        leaf = self._leaves[name]
        if new is not leaf.state and new not in _MOVES[leaf.state]:
            raise OskInternalError(f"tree bug: leaf '{name}' cannot go {leaf.state} -> {new}")
        leaf.state = new

    def _expand(self, ids: Sequence[str], *, refuse_if_shut: bool = False) -> list[str]:
        if isinstance(ids, str):
            ids = [ids]
        wanted: set[str] = set()
        for node in ids:
            if node not in self._topo.leaves_under:
                raise TreeCommandError(f"no leaf or group named '{node}'")
            wanted.update(self._topo.leaves_under[node])
        if refuse_if_shut and self._shut:
            raise TreeCommandError("the tree is shut down; start() it before starting children")
        return [n for n in self._topo.order if n in wanted]
