"""The search: depth-first pinning with forward checking and conflict-directed backjumping.

Why not resolvelib: it was the first version of this module. Each of its rounds rechecks
every criterion, it backtracks one pin at a time, and its provider cannot see the other
requirements on an identifier until it pins it, so a 200-plugin catalogue took seconds.
This is the textbook CSP algorithm (FC-CBJ, Prosser 1993) over the same provider seam.

Theory of operation. Each identifier something asks for has a *slot*: the requirements on
it so far (a stack, pushed as their owners are pinned, popped as they are unpinned) and,
after each push, its *domain*: the candidates every requirement so far accepts, best first.
A slot is *open* while some hard requirement holds it and nothing is pinned in it.

1. Choose an open slot with a single candidate left if there is one (unit propagation),
   else the open slot that comes first in ``Provider.layering``: dependents before their
   dependencies. In a layered catalogue every requirement on a slot is then known when it
   is pinned, so a low-level plugin is not pinned to its newest version only for a plugin
   found later to need an older one (the thrashing that makes resolvers slow). Where the
   layering says little (dependencies that change from version to version), fewest
   candidates first works better: the search restarts, keeping what it learned (5.),
   alternating the two orders with a budget that doubles every two attempts.
2. Try its candidates best first, skipping dead ones (``Provider.dead``). Pinning one pushes
   its requirements onto their slots. That fails when a held slot's domain becomes empty (a
   *wipe-out*: those requirements cannot hold together, whatever is pinned) or a pinned
   slot's pin is no longer accepted.
3. Every failure names the pins to blame. When a slot runs out of candidates, the blame is
   its failures' blame plus the owners of the requirements that narrowed it, and the search
   jumps straight back to the latest pin to blame, unpinning those in between without
   retrying them: they had nothing to do with it.
4. No open slot left: every requirement of every pin holds. Nothing left to jump back to:
   there is no solution, and the last wipe-out (or slot whose every candidate was dead) is
   the conflict to explain.

5. When a slot runs out, the search learns a rule: while the pins to blame (other than the
   one that brought the slot in) hold, nothing may bring it in; the next pin that would is
   refused at once. A pin blamed only for what it requires stands for every version of its
   plugin that requires the same, so one lesson covers a run of releases - a restricted
   form of PubGrub's learned incompatibilities. To learn "whatever excluded it" as little
   as possible, the candidates other pins had ruled out are tried too before blaming them.

Optional requirements sit on their slot like the others but do not hold it open: they only
narrow it if something else brings the identifier in.

Cost: one cached ``Provider`` lookup per requirement pushed plus a scan of the open slots
per pin; a realistic catalogue resolves with few backjumps. ``max_rounds`` bounds the
number of candidates tried over all attempts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from osk_daemon.versioning.provider import Candidate, Cause, Need, Provider


class NoSolution(Exception):
    """Nothing satisfies everything; ``causes`` are the requirements on ``ident`` that clash."""

    def __init__(self, ident: str, causes: list[Cause]) -> None:
        super().__init__(ident)
        self.ident = ident
        self.causes = causes


class TooDeep(Exception):
    """The search tried more than ``max_rounds`` candidates."""

    def __init__(self, rounds: int) -> None:
        super().__init__(rounds)
        self.rounds = rounds


Blame = dict[str, bool]  # pinned identifier -> whether its exact version matters
Rule = tuple[tuple[str, Candidate, bool], ...]  # (identifier, pin, exact) that must all hold


@dataclass(slots=True)
class _Slot:
    domains: list[list[Candidate]]  # domains[-1] is the current domain
    causes: list[Cause] = field(default_factory=list)
    hard: int = 0
    pin: Candidate | None = None


@dataclass(slots=True)
class _Frame:
    ident: str
    options: list[Candidate]
    activator: str | None  # the earliest pin that holds the slot open (None: the config)
    blame: Blame = field(default_factory=dict)  # what ruled options out (not the activator)
    tried: int = 0
    usable: bool = False  # some option was not dead
    ruled: bool = False  # a learned rule ruled the slot out before any option was tried


_FIRST_BUDGET = 1_000  # candidates tried before the first restart; doubles every two


class _OutOfBudget(Exception):
    pass


def search(provider: Provider, roots: Sequence[Need], max_rounds: int) -> dict[str, Candidate]:
    """Pin one candidate per identifier the ``roots`` need, transitively.

    Returns identifier -> candidate. Raises ``NoSolution`` or ``TooDeep`` (more than
    ``max_rounds`` candidates tried in all).
    """
    rules: dict[str, list[Rule]] = {}
    spent, attempt = 0, 0
    while True:
        budget = min(_FIRST_BUDGET << (attempt // 2), max_rounds - spent)
        run = _Search(provider, budget, rules, layered=attempt % 2 == 0)
        try:
            return run.run(roots)
        except _OutOfBudget:
            spent += run.rounds
            if spent >= max_rounds:
                raise TooDeep(spent) from None
        attempt += 1


def _merge(into: Blame, other: Blame, drop: str | None = None) -> Blame:
    for ident, exact in other.items():
        if ident != drop:
            into[ident] = into.get(ident, False) or exact
    return into


class _Search:
    def __init__(
        self, provider: Provider, budget: int, rules: dict[str, list[Rule]], *, layered: bool
    ) -> None:
        self._provider = provider
        self._budget = budget
        self._rules = rules
        self._layered = layered
        self._slots: dict[str, _Slot] = {}
        self._open: set[str] = set()
        self.rounds = 0
        self._failure: tuple[str, list[Cause]] | None = None
        self._rank: dict[str, int] = {}

    def run(self, roots: Sequence[Need]) -> dict[str, Candidate]:
        if self._layered:
            self._rank = self._provider.layering([need.ident for need in roots])
        for need in roots:
            if self._push(None, need) is not None:
                raise self._no_solution(need.ident)
        stack: list[_Frame] = []
        while True:
            ident = self._choose()
            if ident is None:
                return {i: s.pin for i, s in self._slots.items() if s.pin is not None}
            slot = self._slots[ident]
            frame = _Frame(ident, slot.domains[-1], self._activator(slot))
            stack.append(frame)
            ruled = self._rule_holding(ident)
            if ruled is not None:
                frame.blame, frame.options, frame.ruled = ruled, [], True
            while not self._advance(stack[-1]):
                frame = stack.pop()
                if not frame.usable and not frame.ruled:
                    self._failure = (frame.ident, list(self._slots[frame.ident].causes))
                blame = _merge({}, frame.blame, drop=frame.ident)
                if not frame.ruled:
                    _merge(blame, self._why_excluded(frame.ident))
                    self._learn(frame.ident, blame)
                if frame.activator is not None:
                    _merge(blame, {frame.activator: False})
                while stack and stack[-1].ident not in blame:
                    self._unpin(stack.pop().ident)
                if not stack:
                    raise self._no_solution(frame.ident)
                self._unpin(stack[-1].ident)
                _merge(stack[-1].blame, blame, drop=stack[-1].ident)

    def _choose(self) -> str | None:
        if not self._open:
            return None
        slots, rank, last = self._slots, self._rank, len(self._rank)
        if self._layered:
            return min(
                self._open, key=lambda i: (len(slots[i].domains[-1]) > 1, rank.get(i, last), i)
            )
        return min(self._open, key=lambda i: (len(slots[i].domains[-1]), i))

    def _advance(self, frame: _Frame) -> bool:
        """Pin the next workable option of ``frame``; False when none is left."""
        while frame.tried < len(frame.options):
            candidate = frame.options[frame.tried]
            frame.tried += 1
            self.rounds += 1
            if self.rounds > self._budget:
                raise _OutOfBudget
            if self._provider.dead(candidate) is not None:
                continue
            frame.usable = True
            blame = self._pin(frame.ident, candidate)
            if blame is None:
                return True
            _merge(frame.blame, blame, drop=frame.ident)
        return False

    def _pin(self, ident: str, candidate: Candidate) -> Blame | None:
        slot = self._slots[ident]
        slot.pin = candidate
        self._open.discard(ident)
        deps = self._provider.dependencies(candidate)
        for done, need in enumerate(deps):
            blame = self._push(candidate, need)
            if blame is not None:
                for pushed in reversed(deps[: done + 1]):
                    self._pop(pushed)
                slot.pin = None
                if slot.hard:
                    self._open.add(ident)
                return blame
        return None

    def _unpin(self, ident: str) -> None:
        slot = self._slots[ident]
        assert slot.pin is not None
        for need in reversed(self._provider.dependencies(slot.pin)):
            self._pop(need)
        slot.pin = None
        if slot.hard:
            self._open.add(ident)

    def _push(self, parent: Candidate | None, need: Need) -> Blame | None:
        """Add ``need`` to its slot; returns the pins to blame if that breaks something."""
        slot = self._slots.get(need.ident)
        if slot is None:
            slot = self._slots[need.ident] = _Slot([self._provider.candidates(need.ident)])
        accepted = self._provider.accepts(need)
        domain = [c for c in slot.domains[-1] if c in accepted]
        slot.domains.append(domain)
        slot.causes.append((parent, need))
        by: Blame = {} if parent is None else {parent.ident: False}
        if not need.optional:
            slot.hard += 1
            if slot.hard == 1 and slot.pin is None:
                self._open.add(need.ident)
                ruled = self._rule_holding(need.ident)
                if ruled is not None:
                    return _merge(ruled, by)
        if not slot.hard:
            return None
        if not domain:
            self._failure = (need.ident, list(slot.causes))
            blame = self._excluders(slot)
            self._learn(need.ident, blame)
            activator = self._activator(slot)
            return blame if activator is None else _merge(blame, {activator: False})
        if slot.pin is not None and slot.pin not in accepted:
            return _merge({need.ident: True}, by)
        return None

    def _pop(self, need: Need) -> None:
        slot = self._slots[need.ident]
        slot.domains.pop()
        slot.causes.pop()
        if not need.optional:
            slot.hard -= 1
            if not slot.hard:
                self._open.discard(need.ident)

    def _excluders(self, slot: _Slot) -> Blame:
        """For each candidate the slot's requirements rule out, the first pin that does."""
        domain = slot.domains[-1]
        if len(domain) == len(slot.domains[0]):
            return {}
        kept = set(domain)
        blame: Blame = {}
        for candidate in slot.domains[0]:
            if candidate in kept:
                continue
            for parent, need in slot.causes:
                if candidate not in self._provider.accepts(need):
                    if parent is not None:
                        blame[parent.ident] = blame.get(parent.ident, False)
                    break
        return blame

    def _why_excluded(self, ident: str) -> Blame:
        """Blame for the candidates the slot's requirements ruled out, found by trying them.

        Blaming whoever excluded a candidate ties what is learned to that pin; a candidate
        that fails anyway is blamed on what it fails against instead.
        """
        slot = self._slots[ident]
        kept = set(slot.domains[-1])
        blame: Blame = {}
        for candidate in slot.domains[0]:
            if candidate in kept or self._provider.dead(candidate) is not None:
                continue
            excluders = [p for p, n in slot.causes if candidate not in self._provider.accepts(n)]
            if None in excluders:
                continue  # the config rules it out
            self.rounds += 1
            failed = self._pin(ident, candidate)
            if failed is None:
                self._unpin(ident)
                first = excluders[0]
                assert first is not None
                _merge(blame, {first.ident: False})
            else:
                _merge(blame, failed, drop=ident)
        return blame

    @staticmethod
    def _activator(slot: _Slot) -> str | None:
        for parent, need in slot.causes:
            if not need.optional:
                return None if parent is None else parent.ident
        return None

    def _learn(self, ident: str, blame: Blame) -> None:
        """Remember: while the pins in ``blame`` hold, nothing may bring ``ident`` in.

        A pin blamed only for what it requires stands for every version of its plugin that
        requires the same (versions often carry their ranges over unchanged).
        """
        rule = []
        for blamed, exact in sorted(blame.items()):
            pin = self._slots[blamed].pin
            if pin is None:
                return
            rule.append((blamed, pin, exact))
        self._rules.setdefault(ident, []).append(tuple(rule))

    def _rule_holding(self, ident: str) -> Blame | None:
        """The blame of a learned rule that keeps ``ident`` out and holds now, if any."""
        same = self._provider.same_requirements
        for rule in self._rules.get(ident, ()):
            for blamed, pin, exact in rule:
                slot = self._slots.get(blamed)
                now = None if slot is None else slot.pin
                if now is None or not (now is pin or (not exact and same(now, pin))):
                    break
            else:
                return {blamed: exact for blamed, _, exact in rule}
        return None

    def _no_solution(self, ident: str) -> NoSolution:
        if self._failure is None:
            return NoSolution(ident, list(self._slots[ident].causes))
        return NoSolution(*self._failure)
