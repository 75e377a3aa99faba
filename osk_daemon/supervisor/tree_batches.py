"""The supervision tree's book of restarts in flight: batches, and the records they claim.

Why: ``tree.py`` decides *what* restarts (strategies, intensity, operator commands); this
module keeps track of the restarts already under way, so that overlapping ones merge instead
of racing. It is private to the tree: pure, no clock, no processes.

How: a ``Batch`` is one restart, owned by a group's strategy, an operator command or an
escalation (``BatchKind``). Leaves point at the batch that owns them (``LeafRecord.batch``).
``Batches.claim`` puts a leaf under a batch (a live leaf gets a StopChild and lands in its
``settle`` state once stopped), taking it from any older batch; ``release`` then drops the
older batches that were emptied and finishes the rest. ``try_finish`` completes a batch once
no member is still stopping and its timer has fired: RESTARTING members get StartChild in
start order, and an escalation is handed back to the tree through its ``escalate``
callback. Every leaf state change goes through the tree's ``move``, which checks the
transitions table in ``tree.py``.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum

from osk_daemon.supervisor.backoff import Backoff
from osk_daemon.supervisor.tree_types import (
    Effect,
    GroupSpec,
    LeafSpec,
    LeafState,
    StartChild,
    StopChild,
)

S = LeafState
LIVE = frozenset({S.STARTING, S.RUNNING})

Move = Callable[[str, LeafState], None]
Escalate = Callable[[str, float, float, list[Effect]], None]  # group, now, rand, out


class BatchKind(Enum):
    RESTART = "restart"  # a group's strategy: counted, delayed by backoff
    OPERATOR = "operator"  # operator start/restart: not counted, no delay
    ESCALATE = "escalate"  # a group gave up: once its leaves are down, tell the parent


@dataclass(eq=False)
class Batch:
    id: int
    kind: BatchKind
    group: str
    due: float = 0.0
    token: int | None = None
    rand: float = 0.0
    fresh: tuple[str, ...] = ()


@dataclass(eq=False)
class LeafRecord:
    spec: LeafSpec
    backoff: Backoff
    state: LeafState = S.STOPPED
    batch: int | None = None  # the batch waiting for this leaf's stop and/or restarting it
    settle: LeafState = S.STOPPED  # where a STOPPING leaf lands
    sticky: bool = False  # stopped by the operator: strategies leave it down
    restarts: int = 0


@dataclass(eq=False)
class GroupRecord:
    spec: GroupSpec
    backoff: Backoff
    history: list[float] = field(default_factory=list)
    gave_up: bool = False


class Batches:
    """The restart batches of one tree, over the tree's own leaf and group records."""

    def __init__(
        self,
        order: Sequence[str],
        leaves: Mapping[str, LeafRecord],
        groups: Mapping[str, GroupRecord],
        move: Move,
        escalate: Escalate,
    ) -> None:
        self._order = order
        self._leaves = leaves
        self._groups = groups
        self._move = move
        self._escalate = escalate
        self._batches: dict[int, Batch] = {}
        self._ids = itertools.count(1)
        self._tokens = itertools.count(1)

    def reorder(self, order: Sequence[str]) -> None:
        """The tree's start order changed (a leaf was added or removed)."""
        self._order = order

    def open(self, kind: BatchKind, group: str, rand: float = 0.0) -> Batch:
        """A new, empty batch; leaves join it through ``claim``."""
        batch = Batch(next(self._ids), kind, group, rand=rand)
        self._batches[batch.id] = batch
        return batch

    def arm(self, batch: Batch) -> int:
        """Give ``batch`` a fresh timer token; it cannot finish until ``fire(token)``."""
        batch.token = next(self._tokens)
        return batch.token

    def fire(self, token: int, now: float, out: list[Effect]) -> None:
        """A timer ran out; stale tokens (cancelled or absorbed batches) do nothing."""
        bid = next((b for b, batch in self._batches.items() if batch.token == token), None)
        if bid is not None:
            self._batches[bid].token = None
            self.try_finish(bid, now, out)

    def clear(self) -> None:
        """Forget every batch (shutdown); the caller clears the leaves' pointers."""
        self._batches.clear()

    def inherit_delay(self, delay: float, touched: Iterable[int], now: float) -> float:
        """``delay``, or longer if a restart batch that was emptied into a new one had more
        of its own delay left."""
        for old in touched:
            prior = self._batches.get(old)
            if prior is not None and prior.kind is BatchKind.RESTART and not self.members(old):
                delay = max(delay, prior.due - now)
        return delay

    def drop_escalations(self, gid: str) -> None:
        """Cancel the escalation of group ``gid``, freeing its leaves (operator revived it)."""
        for bid, batch in list(self._batches.items()):
            if batch.kind is BatchKind.ESCALATE and batch.group == gid:
                for name in self.members(bid):
                    self._leaves[name].batch = None
                del self._batches[bid]

    def claim(
        self,
        name: str,
        bid: int,
        settle: LeafState,
        reason: str,
        touched: set[int],
        stops: list[StopChild],
    ) -> None:
        """Put a leaf under batch ``bid``: stop it if live; it lands in ``settle``."""
        leaf = self._leaves[name]
        if leaf.batch is not None and leaf.batch != bid:
            touched.add(leaf.batch)
        if leaf.state in LIVE:
            stops.append(StopChild(name, reason))
            self._move(name, S.STOPPING)
        if leaf.state is S.STOPPING:
            leaf.batch, leaf.settle = bid, settle
        elif settle is S.RESTARTING:
            self._move(name, S.RESTARTING)
            leaf.batch = bid
        elif leaf.state is S.RESTARTING:
            self._move(name, settle)
            leaf.batch = None

    def members(self, bid: int) -> list[str]:
        return [n for n in self._order if self._leaves[n].batch == bid]

    def release(self, touched: Iterable[int], now: float, out: list[Effect]) -> None:
        """Older batches lost leaves to a new one: drop the emptied, finish the rest."""
        for bid in sorted(touched):
            if bid in self._batches and not self.members(bid):
                del self._batches[bid]
            else:
                self.try_finish(bid, now, out)

    def try_finish(self, bid: int, now: float, out: list[Effect]) -> None:
        """Complete batch ``bid`` if its timer has fired and no member is still stopping."""
        batch = self._batches.get(bid)
        if batch is None or batch.token is not None:
            return
        members = self.members(bid)
        if any(self._leaves[n].state is S.STOPPING for n in members):
            return
        del self._batches[bid]
        if batch.kind is BatchKind.ESCALATE:
            self._escalate(batch.group, now, batch.rand, out)
            return
        for name in members:
            leaf = self._leaves[name]
            leaf.batch = None
            self._move(name, S.STARTING)
            out.append(StartChild(name))
            if batch.kind is BatchKind.RESTART:
                leaf.restarts += 1
        for gid in batch.fresh:
            self._groups[gid].backoff.started(now)

    def stopped(self, name: str, now: float) -> list[Effect]:
        """A STOPPING leaf's process is gone: land it, then let its batch move on."""
        leaf = self._leaves[name]
        bid = leaf.batch
        self._move(name, leaf.settle)
        if leaf.state is not S.RESTARTING:
            leaf.batch = None
        out: list[Effect] = []
        if bid is not None:
            self.try_finish(bid, now, out)
        return out
