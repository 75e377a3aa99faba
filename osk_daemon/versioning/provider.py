"""What the search asks of a catalogue: candidates best first, their dependencies, dead ends.

An *identifier* is a plugin name, or ``service:NAME`` for a requirement on a service. A
*candidate* is one way to satisfy an identifier: a plugin version, or "plugin P at version v
provides NAME at version s", which depends on exactly P v, so pinning a service pins its
provider. Candidates are made once per (identifier, version): identity is equality, hashing
is cheap.

A catalogue holds far more than one resolution reads (200 plugins x 20 versions, of which a
search touches a few hundred), so everything here is lazy and cached:

- ``matches(need)``: what a requirement accepts, best first, computed once per (identifier,
  range); the same range on the same plugin recurs across versions of its dependents.
- ``dead(candidate)``: the hard requirement that keeps a candidate from ever being used,
  whatever else is chosen (none of its matches can be used), found depth-first and
  memoised. This prunes in one walk the long chains a search would otherwise backtrack
  through one combination at a time. Cycles and very deep chains count as usable: pruning
  only has to be right when it says "dead".

Candidates come highest version first; prereleases only when a range opts in (npm rule).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import Protocol

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


@dataclass(frozen=True, slots=True, eq=False)
class Candidate:
    ident: str
    plugin: str
    version: Version
    provided: Version | None = None  # for service candidates: the service's version

    def __str__(self) -> str:
        return f"{self.plugin} {self.version}"


@dataclass(frozen=True, slots=True, eq=False)
class Need:
    """A requirement on ``ident``; ``optional`` ones bind only if the target is chosen anyway."""

    ident: str
    range: Range
    text: str
    optional: bool = False

    @property
    def key(self) -> tuple[str, str, bool]:
        return (self.ident, self.text, self.range.include_prerelease)


Cause = tuple[Candidate | None, Need]  # who (None: the config) asks for what


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
        self._matches: dict[tuple[str, str, bool], tuple[list[Candidate], frozenset[Candidate]]]
        self._matches = {}
        self._dead: dict[Candidate, Need | None] = {}
        self._signatures: dict[Candidate, int] = {}
        self._interned: dict[tuple[tuple[str, str, bool, bool], ...], int] = {}

    def candidates(self, ident: str) -> list[Candidate]:
        """Every candidate for ``ident``, best first (highest service, then plugin version)."""
        if ident.startswith("service:"):
            return self._service_index().get(ident, [])
        found = self._plugins.get(ident)
        if found is None:
            versions = sorted(self.catalogue.get(ident, {}), reverse=True)
            found = self._plugins[ident] = [Candidate(ident, ident, v) for v in versions]
        return found

    def matches(self, need: Need) -> list[Candidate]:
        """Every candidate ``need`` accepts (usable or dead), best first."""
        return self._match(need)[0]

    def accepts(self, need: Need) -> frozenset[Candidate]:
        return self._match(need)[1]

    def dependencies(self, candidate: Candidate) -> list[Need]:
        """What choosing ``candidate`` asks for; optional service edges only once promoted."""
        deps = self._deps.get(candidate)
        if deps is None:
            deps = self._deps[candidate] = self._compute_deps(candidate)
        return deps

    def same_requirements(self, one: Candidate, other: Candidate) -> bool:
        """Whether two candidates ask for exactly the same (same identifiers and ranges)."""
        return self._signature(one) == self._signature(other)

    def _signature(self, candidate: Candidate) -> int:
        found = self._signatures.get(candidate)
        if found is None:
            key = tuple((*n.key, n.optional) for n in self.dependencies(candidate))
            found = self._signatures[candidate] = self._interned.setdefault(
                key, len(self._interned)
            )
        return found

    def dead(self, candidate: Candidate, _depth: int = 0) -> Need | None:
        """The hard requirement that rules ``candidate`` out for good, or None if it may work."""
        if candidate in self._dead:
            return self._dead[candidate]
        if _depth > _MAX_DEPTH:
            return None
        self._dead[candidate] = None  # optimistic while on the path (cycles)
        for need in self.dependencies(candidate):
            if need.optional:
                continue
            if all(self.dead(m, _depth + 1) is not None for m in self.matches(need)):
                self._dead[candidate] = need
                return need
        return None

    def layering(self, roots: Sequence[str]) -> dict[str, int]:
        """Rank every identifier reachable from ``roots``: those that may need it rank lower.

        Counts an edge when any version asks for the identifier (hard or optional), so it
        is an over-approximation, read from the declarations without matching ranges.
        Dependents come before their dependencies (cycles in some fixed order).
        Cost: one pass over the declarations of every reachable plugin version.
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

    def _match(self, need: Need) -> tuple[list[Candidate], frozenset[Candidate]]:
        key = need.key
        found = self._matches.get(key)
        if found is None:
            contains = need.range.contains
            fitting = [
                c
                for c in self.candidates(need.ident)
                if contains(c.version if c.provided is None else c.provided)
            ]
            found = self._matches[key] = (fitting, frozenset(fitting))
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
            services: dict[str, list[Candidate]] = {}
            for plugin, versions in self.catalogue.items():
                for version, declared in versions.items():
                    for service, provided in declared.provides.items():
                        ident = f"service:{service}"
                        candidate = Candidate(ident, plugin, version, provided)
                        services.setdefault(ident, []).append(candidate)
            for found in services.values():
                found.sort(key=lambda c: (c.provided or c.version, c.version), reverse=True)
            self._services = services
        return self._services
