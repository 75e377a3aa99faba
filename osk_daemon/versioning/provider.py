"""What the search asks of a catalogue: candidates best first, what they need, as bit sets.

An *identifier* is a plugin name, or ``service:NAME`` for a requirement on a service. A
*candidate* is one way to satisfy an identifier: a plugin version, or "plugin P at version v
provides NAME at version s", which depends on exactly P v, so pinning a service pins its
provider. Candidates are made once per (identifier, version): identity is equality, hashing
is cheap.

A catalogue holds far more than one resolution reads (200 plugins x 20 versions, of which a
search touches a few hundred), so everything here is lazy and cached:

- ``mask(need)``: what a requirement accepts, as a bit set over the candidates of its
  identifier (see ``incompatibility``), computed once per (identifier, range) by bisection
  (``matching``); the same range on the same plugin recurs across versions of dependents.
- ``run(candidate, need)``: the neighbouring releases that ask the same, so that one
  incompatibility speaks for all of them;
- ``dead(candidate)``: whether a hard requirement of a candidate has no usable match, down
  the chain, memoised: the search tries such candidates last;
- ``layering(roots)``: dependents before their dependencies, to order explanations.

Candidates come highest version first; prereleases only when a range opts in (npm rule).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Protocol

from osk_daemon.versioning.matching import Ordered, indices
from osk_daemon.versioning.semver import Comparator, Range, Version

_MAX_DEPTH = 200  # deeper than this, ``dead`` assumes usable rather than recurse further


class Needs(Protocol):
    """What the resolver reads from one requirement (``manifest.Requirement`` fits)."""

    @property
    def name(self) -> str: ...
    @property
    def range(self) -> Range: ...
    @property
    def optional(self) -> bool: ...
    @property
    def service(self) -> bool: ...


class Declares(Protocol):
    """What the resolver reads from one plugin version (``manifest.Manifest`` fits)."""

    @property
    def requires(self) -> Sequence[Needs]: ...
    @property
    def provides(self) -> Mapping[str, Version]: ...


Catalogue = Mapping[str, Mapping[Version, Declares]]


@dataclass(slots=True, eq=False)  # not frozen: made by the thousand, and never changed
class Candidate:
    ident: str
    plugin: str
    version: Version
    index: int  # position in ``Provider.candidates(ident)``: bit ``index + 1`` of a term
    provided: Version | None = None  # for service candidates: the service's version

    def __str__(self) -> str:
        return f"{self.plugin} {self.version}"


@dataclass(slots=True, eq=False)  # not frozen, like Candidate
class Need:
    """A requirement on ``ident``; ``optional`` ones bind only if the target is chosen anyway.

    ``key`` (identifier, range text, prerelease opt-in) is what makes two alike.
    """

    ident: str
    range: Range
    text: str
    optional: bool = False
    key: tuple[str, str, bool] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.key = (self.ident, self.text, self.range.include_prerelease)


def ident_of(need: Needs) -> str:
    return f"service:{need.name}" if need.service else need.name


def noun(ident: str) -> str:
    """``store`` or ``service auth.tokens``, for sentences."""
    target = ident.removeprefix("service:")
    return target if ident == target else f"service {target}"


def _exact(version: Version) -> Range:
    return Range(str(version), ((Comparator("=", version),),), include_prerelease=True)


class Provider:
    """Lazy, cached view of a catalogue for one search.

    ``promoted`` holds (plugin, identifier) optional edges to treat as hard requirements.
    """

    def __init__(self, catalogue: Catalogue, promoted: AbstractSet[tuple[str, str]]) -> None:
        self.catalogue = catalogue
        self._promoted = promoted
        self._plugins: dict[str, list[Candidate]] = {}
        self._services: dict[str, list[Candidate]] | None = None
        self._deps: dict[Candidate, list[Need]] = {}
        self._universes: dict[str, int] = {}
        self._dead: dict[Candidate, bool] = {}
        self._asks: dict[str, list[dict[tuple[str, str, bool], bool] | None]] = {}
        self._ordered: dict[str, Ordered] = {}
        self._masks: dict[tuple[str, str, bool], int] = {}

    def candidates(self, ident: str) -> list[Candidate]:
        """Every candidate for ``ident``, best first (highest service, then plugin version)."""
        if ident.startswith("service:"):
            return self._service_index().get(ident, [])
        found = self._plugins.get(ident)
        if found is None:
            versions = list(self.catalogue.get(ident, {}))
            if any(v.prerelease for v in versions):
                versions.sort(reverse=True)
            else:  # precedence is the release triple (build metadata aside): sort natively
                versions.sort(key=attrgetter("major", "minor", "patch"), reverse=True)
            found = self._plugins[ident] = [
                Candidate(ident, ident, v, i) for i, v in enumerate(versions)
            ]
        return found

    def matches(self, need: Need) -> list[Candidate]:
        """Every candidate ``need`` accepts, best first."""
        every = self.candidates(need.ident)
        return [every[i] for i in indices(self.mask(need))]

    def dependencies(self, candidate: Candidate) -> list[Need]:
        """What choosing ``candidate`` asks for; optional service edges only once promoted."""
        deps = self._deps.get(candidate)
        if deps is None:
            deps = self._deps[candidate] = self._compute_deps(candidate)
        return deps

    def universe(self, ident: str) -> int:
        """The term that always holds for ``ident``: "not chosen" and every candidate."""
        found = self._universes.get(ident)
        if found is None:
            found = self._universes[ident] = (2 << len(self.candidates(ident))) - 1
        return found

    def mask(self, need: Need) -> int:
        """The candidates ``need`` accepts, as a term (bit ``index + 1`` per candidate)."""
        return self._range_mask(need.ident, need.range)

    def run(self, candidate: Candidate, need: Need) -> int:
        """The releases next to ``candidate`` that ask exactly ``need`` too, as a term.

        Plugins carry a range over from release to release until they refresh it, so one
        incompatibility then speaks for a run of releases, and one conflict rules them all
        out. Cost: a look at the requirements of each release in the run and of the two
        that end it (only pinned candidates are asked, not the whole history).
        """
        ident = candidate.ident
        found = 2 << candidate.index
        if ident.startswith("service:"):
            return found
        every = self.candidates(ident)
        releases = self._asks.get(ident)
        if releases is None:
            releases = self._asks[ident] = [None] * len(every)
        key, optional = need.key, need.optional
        for step in (-1, 1):
            index = candidate.index + step
            while 0 <= index < len(every):
                asked = releases[index]
                if asked is None:
                    asked = releases[index] = self._asked(ident, every[index].version)
                soft = asked.get(key)
                if soft is None or (soft and not optional):
                    break
                found |= 2 << index
                index += step
        return found

    def _asked(self, ident: str, version: Version) -> dict[tuple[str, str, bool], bool]:
        """What one release of plugin ``ident`` asks: need key -> whether optional."""
        found = {}
        for need in self.catalogue[ident][version].requires:
            target, rng = ident_of(need), need.range
            soft = need.optional and (ident, target) not in self._promoted
            found[(target, rng.text or "*", rng.include_prerelease)] = soft
        return found

    def dead(self, candidate: Candidate, _depth: int = 0) -> bool:
        """Whether ``candidate`` can never be used: a hard requirement has no usable match.

        Found depth-first, best match first, and memoised; a cycle or a chain deeper than
        ``_MAX_DEPTH`` counts as usable (it only has to be right when it says "dead").
        """
        found = self._dead.get(candidate)
        if found is not None:
            return found
        if _depth > _MAX_DEPTH:
            return False
        self._dead[candidate] = False  # optimistic while on the path
        for need in self.dependencies(candidate):
            if need.optional:
                continue
            every, left = self.candidates(need.ident), self.mask(need) >> 1
            index = 0
            while left and (not left & 1 or self.dead(every[index], _depth + 1)):
                left >>= 1
                index += 1
            if not left:
                self._dead[candidate] = True
                return True
        return False

    def layering(self, roots: Sequence[str]) -> dict[str, int]:
        """Rank every identifier reachable from ``roots``: those that may need it rank lower.

        Counts an edge when any version asks for the identifier (hard or optional), so it
        is an over-approximation, read from the declarations without matching ranges.
        Dependents come before their dependencies (cycles in some fixed order). ``explain``
        orders what it says with it. Cost: one pass over the declarations of every
        reachable plugin version.
        """
        finished: list[str] = []
        seen = set(roots)
        for root in sorted(seen):
            stack = [(root, iter(self._may_need(root)))]
            while stack:
                ident, children = stack[-1]
                child = next(children, None)
                if child is None:
                    stack.pop()
                    finished.append(ident)
                elif child not in seen:
                    seen.add(child)
                    stack.append((child, iter(self._may_need(child))))
        return {ident: rank for rank, ident in enumerate(reversed(finished))}

    def _may_need(self, ident: str) -> list[str]:
        if ident.startswith("service:"):
            return sorted({c.plugin for c in self.candidates(ident)})
        return sorted(
            {
                ident_of(need)
                for declared in self.catalogue.get(ident, {}).values()
                for need in declared.requires
            }
        )

    def _range_mask(self, ident: str, rng: Range) -> int:
        key = (ident, rng.text or "*", rng.include_prerelease)
        found = self._masks.get(key)
        if found is None:
            ordered = self._ordered.get(ident)
            if ordered is None:
                ordered = self._ordered[ident] = Ordered(
                    [
                        c.version if c.provided is None else c.provided
                        for c in self.candidates(ident)
                    ]
                )
            found = self._masks[key] = ordered.mask(rng)
        return found

    def _compute_deps(self, candidate: Candidate) -> list[Need]:
        if candidate.provided is not None:
            exact = _exact(candidate.version)
            return [Need(candidate.plugin, exact, str(candidate.version))]
        deps = []
        for need in self.catalogue[candidate.plugin][candidate.version].requires:
            ident = ident_of(need)
            soft = need.optional and (candidate.plugin, ident) not in self._promoted
            if soft and need.service:
                continue  # enforced after the search, by promotion (see resolver)
            deps.append(Need(ident, need.range, str(need.range), soft))
        return deps

    def _service_index(self) -> dict[str, list[Candidate]]:
        if self._services is None:
            offers: dict[str, list[tuple[Version, Version, str]]] = {}
            for plugin, versions in self.catalogue.items():
                for version, declared in versions.items():
                    for service, provided in declared.provides.items():
                        offers.setdefault(f"service:{service}", []).append(
                            (provided, version, plugin)
                        )
            services: dict[str, list[Candidate]] = {}
            for ident, found in offers.items():
                found.sort(key=lambda o: (o[0], o[1]), reverse=True)
                services[ident] = [
                    Candidate(ident, plugin, version, i, provided)
                    for i, (provided, version, plugin) in enumerate(found)
                ]
            self._services = services
        return self._services
