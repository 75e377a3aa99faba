"""The search: PubGrub, conflict-driven learning over sets of candidates.

Why this one. The first version used resolvelib: each round rechecks every criterion and it
backtracks one pin at a time, so a 200-plugin catalogue took seconds. The second was
textbook CSP search (forward checking, conflict-directed backjumping, nogoods on exact
pins): its nogoods only covered releases with identical requirements, so where ranges
drift from release to release it met the same clash once per combination, and two of ten
realistic catalogues ran out of 100,000 rounds (15 s) although they have a solution.
PubGrub (Weizenbaum 2018, the solver of Dart's pub, uv and Poetry; ``dart-lang/pub``
``doc/solver.md``) learns *sets* of versions that cannot go together, so one lesson covers
every release it applies to, and the lessons it ends with are the proof that ``explain``
turns into words.

Theory of operation, over the terms and incompatibilities of ``incompatibility``:

- The *partial solution* is a trail of assignments, each a term for one identifier: a
  *decision* pins one candidate and opens a new decision level; a *derivation* is a term
  an incompatibility implies, at the current level. What is known of an identifier is the
  intersection of its assignments (one ``&`` each, kept on the assignment).
- Unit propagation: when the partial solution implies every term of an incompatibility
  but one, and does not contradict that one, its negation is derived. When it implies
  every term, that is a conflict. When an identifier changes, only the incompatibilities
  whose term on it now holds can have become unit (one ``&`` to skip the others); new
  ones are checked once when added.
- Conflict resolution: find the assignment that made the conflicting incompatibility's
  last term hold (its *satisfier*). If that is a decision, or the only assignment of its
  level involved, the incompatibility is learned and the search jumps back to the level of
  the one before, where the learned incompatibility is unit and propagation rules out at
  once everything it forbids. Otherwise resolve it with the satisfier's cause (the new one
  holds whenever both premises would) and repeat. Deriving the empty incompatibility
  proves that nothing works; its derivation graph is the explanation.
- Short jumps: a jump over more than ``_CHRONOLOGICAL`` levels would throw away (and
  then redo) many pins that had nothing to do with the conflict, so the search goes back
  one level only (chronological backtracking, Nadel and Ryvchin 2018); the learned
  incompatibility is unit there too. The derivation then sits at a higher level than it
  needs, so when a later jump undoes it, its cause is checked again (re-implication,
  Moehle and Biere 2019). Should the same incompatibility be learned twice, the search
  takes the full jump.
- Decision: among identifiers that must be chosen (a positive term) and are not pinned,
  the one with the fewest candidates left (then by name, so the result does not depend
  on hashing); pin its best candidate left, skipping those ``Provider.dead`` says no
  solution can use (value order only: nothing is ruled out without a reason, so the proof
  stays whole). Its requirements are added first as incompatibilities, each covering the
  run of neighbouring releases that ask the same (``Provider.run``); if one of them
  already rules the candidate out, its negation is derived instead and the next best
  candidate is tried.

Optional requirements become "chosen outside the range" terms: they forbid a version that
does not fit but never make anything be chosen.

Cost: per decision, its requirements (cached matching) and a propagation over the
incompatibilities that mention what changed; a realistic catalogue (200 plugins x 20
versions) resolves in a few hundred rounds, and proves a real clash in a few dozen.
``max_rounds`` bounds decisions plus conflict-resolution steps.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from heapq import heappop, heappush

from osk_daemon.versioning.incompatibility import (
    Derived,
    FromConfig,
    FromDependency,
    Incompatibility,
)
from osk_daemon.versioning.matching import NOT_CHOSEN, indices, lowest
from osk_daemon.versioning.provider import Candidate, Need, Provider


class NoSolution(Exception):
    """Nothing satisfies everything; ``incompatibility`` is empty and derived: the proof."""

    def __init__(self, incompatibility: Incompatibility) -> None:
        super().__init__("no solution")
        self.incompatibility = incompatibility


class TooDeep(Exception):
    """The search made more than ``max_rounds`` decisions and conflicts."""

    def __init__(self, rounds: int) -> None:
        super().__init__(rounds)
        self.rounds = rounds


def search(provider: Provider, roots: Sequence[Need], max_rounds: int) -> dict[str, Candidate]:
    """Pin one candidate per identifier the ``roots`` need, transitively.

    Returns identifier -> candidate. Raises ``NoSolution`` or ``TooDeep``.
    """
    return _Solver(provider, max_rounds).solve(roots)


@dataclass(slots=True, eq=False)
class _Assignment:
    ident: str
    term: int
    level: int
    cause: Incompatibility | None  # None: a decision
    index: int  # position on the trail
    known: int  # what the identifier's assignments so far allow, this one included


_CHRONOLOGICAL = 20  # a backjump over more levels than this goes back one level only
_CONFLICT = "\0conflict"  # not an identifier


class _Solver:
    def __init__(self, provider: Provider, max_rounds: int) -> None:
        self._provider = provider
        self._max_rounds = max_rounds
        self._universe = provider.universe
        self._watch: dict[str, list[tuple[int, Incompatibility]]] = {}  # ident -> (term, those)
        self._dependencies: dict[tuple[str, str, str, bool, bool, int], Incompatibility | None] = {}
        self._needs: dict[Candidate, list[Incompatibility]] = {}  # per candidate pinned
        self._known: dict[str, int] = {}
        self._history: dict[str, list[_Assignment]] = {}
        self._trail: list[_Assignment] = []
        self._pinned: dict[str, Candidate] = {}
        self._open: set[str] = set()  # must be chosen, not pinned yet
        self._level = 0
        self._recheck: list[Incompatibility] = []  # new ones, and causes of undone derivations
        self._learned: set[frozenset[tuple[str, int]]] = set()
        self._queue: list[tuple[int, str]] = []  # (candidates left, identifier), lazily pruned
        self.rounds = 0

    def solve(self, roots: Sequence[Need]) -> dict[str, Candidate]:
        for need in roots:
            universe = self._universe(need.ident)
            term = universe & ~self._provider.mask(need)
            found = Incompatibility(
                {} if term == universe else {need.ident: term}, FromConfig(need)
            )
            if not found.terms:
                raise NoSolution(found)
            self._add(found)
            self._recheck.append(found)
        changed = {need.ident for need in roots}
        while True:
            self._propagate(changed)
            ident = self._decide()
            if ident is None:
                return dict(self._pinned)
            changed = {ident}

    # -- the partial solution -----------------------------------------------------------------

    def _add(self, incompatibility: Incompatibility) -> None:
        for ident, term in incompatibility.terms.items():
            self._watch.setdefault(ident, []).append((term, incompatibility))
            if ident not in self._known:
                self._known[ident] = self._universe(ident)
                self._history[ident] = []

    def _assign(self, ident: str, term: int, cause: Incompatibility | None) -> None:
        known = self._known[ident] & term
        self._known[ident] = known
        made = _Assignment(ident, term, self._level, cause, len(self._trail), known)
        self._trail.append(made)
        self._history[ident].append(made)
        if not known & NOT_CHOSEN and ident not in self._pinned:
            self._open.add(ident)
            self._enqueue(ident)

    def _backtrack(self, level: int) -> None:
        """Undo the levels above ``level``; what undone derivations relied on is rechecked."""
        touched = set()
        causes = []
        trail = self._trail
        while trail and trail[-1].level > level:
            undone = trail.pop()
            self._history[undone.ident].pop()
            touched.add(undone.ident)
            if undone.cause is None:
                del self._pinned[undone.ident]
            else:
                causes.append(undone.cause)
        for ident in touched:
            history = self._history[ident]
            known = history[-1].known if history else self._universe(ident)
            self._known[ident] = known
            if not known & NOT_CHOSEN and ident not in self._pinned:
                self._open.add(ident)
                self._enqueue(ident)
            else:
                self._open.discard(ident)
        self._level = level
        self._recheck += causes

    def _satisfier(self, ident: str, term: int) -> _Assignment:
        for made in self._history[ident]:
            if not made.known & ~term:
                return made
        raise AssertionError(f"nothing implies the term on {ident}")

    # -- propagation and conflicts ------------------------------------------------------------

    def _propagate(self, changed: set[str]) -> None:
        recheck = self._recheck
        while changed or recheck:
            if recheck:
                incompatibility = recheck.pop()
                derived = self._unit(incompatibility)
                if derived == _CONFLICT:
                    self._learn(incompatibility, changed)
                elif derived is not None:
                    changed.add(derived)
                continue
            ident = changed.pop()
            known = self._known[ident]
            for term, incompatibility in reversed(self._watch.get(ident, ())):
                if known & ~term:
                    continue  # what changed does not make this one hold any more than before
                derived = self._unit(incompatibility)
                if derived == _CONFLICT:
                    self._learn(incompatibility, changed)
                    break
                if derived is not None:
                    changed.add(derived)

    def _learn(self, conflict: Incompatibility, changed: set[str]) -> None:
        learned = self._resolve(conflict)
        changed.clear()
        derived = self._unit(learned)
        assert derived is not None
        assert derived != _CONFLICT
        changed.add(derived)

    def _unit(self, incompatibility: Incompatibility) -> str | None:
        """Derive the negation of the one term left open, if so; ``_CONFLICT`` if none is."""
        known = self._known
        left: str | None = None
        for ident, term in incompatibility.terms.items():
            have = known[ident]
            if not have & ~term:
                continue
            if not have & term or left is not None:
                return None
            left = ident
        if left is None:
            return _CONFLICT
        self._assign(left, self._universe(left) ^ incompatibility.terms[left], incompatibility)
        return left

    def _resolve(self, incompatibility: Incompatibility) -> Incompatibility:
        """Learn from a conflict and jump back to where what is learned is unit."""
        learned = False
        while True:
            self._count()
            if not incompatibility.terms:
                raise NoSolution(incompatibility)
            recent: _Assignment | None = None
            recent_ident, difference, previous = "", 0, 0
            for ident, term in incompatibility.terms.items():
                satisfier = self._satisfier(ident, term)
                if recent is None or recent.index < satisfier.index:
                    if recent is not None:
                        previous = max(previous, recent.level)
                    recent, recent_ident = satisfier, ident
                else:
                    previous = max(previous, satisfier.level)
                if recent_ident == ident:
                    difference = recent.term & ~term
                    if difference:
                        universe = self._universe(ident)
                        earlier = self._satisfier(ident, universe ^ difference)
                        previous = max(previous, earlier.level)
            assert recent is not None
            if previous < recent.level or recent.cause is None:
                seen = frozenset(incompatibility.terms.items())
                if recent.level - previous > _CHRONOLOGICAL and seen not in self._learned:
                    previous = recent.level - 1
                self._learned.add(seen)
                self._backtrack(previous)
                if learned:
                    self._add(incompatibility)
                return incompatibility
            terms = {i: t for i, t in incompatibility.terms.items() if i != recent_ident}
            for ident, term in recent.cause.terms.items():
                if ident != recent_ident:
                    terms[ident] = terms.get(ident, -1) & term
            if difference:
                terms[recent_ident] = self._universe(recent_ident) ^ difference
            terms = {i: t for i, t in terms.items() if t != self._universe(i)}
            incompatibility = Incompatibility(terms, Derived(incompatibility, recent.cause))
            learned = True

    # -- decisions ----------------------------------------------------------------------------

    def _decide(self) -> str | None:
        """Pin the next identifier's best candidate left; None when nothing is left to pin.

        A candidate that one of its own requirements already rules out is not pinned: that
        requirement's negation is derived at once and the next best is tried.
        """
        ident = self._next()
        if ident is None:
            return None
        while True:
            candidate = self._best(ident)
            self._count()
            ruling = self._ruling(ident, candidate)
            if ruling is None:
                self._level += 1
                self._pinned[ident] = candidate
                self._open.discard(ident)
                self._assign(ident, 2 << candidate.index, None)
                return ident
            derived = self._unit(ruling)
            if derived != ident:  # a conflict, or a rule on another identifier
                if derived is None or derived == _CONFLICT:
                    self._recheck.append(ruling)
                return ident

    def _best(self, ident: str) -> Candidate:
        """The best candidate left that is not dead (``Provider.dead``), else the best left.

        Skipping a dead candidate loses nothing (no solution uses it) and saves the search
        from learning, one release at a time, that a long chain below it ends nowhere.
        """
        every, left = self._provider.candidates(ident), self._known[ident]
        for index in indices(left):
            if not self._provider.dead(every[index]):
                return every[index]
        return every[lowest(left)]

    def _ruling(self, ident: str, candidate: Candidate) -> Incompatibility | None:
        """A requirement of ``candidate`` that what is known already contradicts, if any."""
        needs = self._needs.get(candidate)
        if needs is None:
            each = (self._dependency(candidate, n) for n in self._provider.dependencies(candidate))
            needs = self._needs[candidate] = [f for f in each if f is not None]
        known = self._known
        for found in needs:
            for i, t in found.terms.items():
                if i != ident and known[i] & ~t:
                    break
            else:
                return found
        return None

    def _next(self) -> str | None:
        """The open identifier with the fewest candidates left (then by name), if any."""
        queue, known, open_ = self._queue, self._known, self._open
        while queue:
            left, ident = queue[0]
            if ident in open_ and known[ident].bit_count() == left:
                return ident
            heappop(queue)
        return None

    def _enqueue(self, ident: str) -> None:
        heappush(self._queue, (self._known[ident].bit_count(), ident))

    def _dependency(self, candidate: Candidate, need: Need) -> Incompatibility | None:
        """The incompatibility saying that ``candidate`` (and its like) need ``need``."""
        ident = candidate.ident
        versions = self._provider.run(candidate, need)
        key = (ident, *need.key, need.optional, versions)
        if key in self._dependencies:
            return self._dependencies[key]
        universe = self._universe(need.ident)
        term = universe & ~self._provider.mask(need)
        if need.optional:
            term &= ~NOT_CHOSEN
        found: Incompatibility | None = None
        if need.ident == ident:
            terms = {ident: versions & term}
        elif term == universe:
            terms = {ident: versions}
        else:
            terms = {ident: versions, need.ident: term}
        if all(terms.values()):
            found = Incompatibility(terms, FromDependency(ident, versions, need))
            self._add(found)
            self._recheck.append(found)
        self._dependencies[key] = found
        return found

    def _count(self) -> None:
        self.rounds += 1
        if self.rounds > self._max_rounds:
            raise TooDeep(self.rounds)
