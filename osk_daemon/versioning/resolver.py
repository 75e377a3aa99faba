"""Pick one version per plugin from what is installed, and explain why when none fits.

How it works: the search is resolvelib's (what pip uses: round-based depth-first pinning with
backjumping); this module is its provider, a pure function of the catalogue.

- Identifiers are plugin names, plus ``service:NAME`` for requirements on a service. A
  service candidate is "plugin P at version v provides NAME at version s" and depends on
  exactly P v, so pinning a service pins its provider.
- Candidates come highest version first; prereleases only when a range opts in (npm rule).
- Preference (lower first): identifiers that caused the last backtrack, then the one with
  the fewest remaining candidates (PubGrub's heuristic), then by name for determinism.
- Optional requirements do not pull a plugin in. When their target ends up resolved anyway,
  they are promoted to hard requirements and the search runs again (at most once per
  optional edge), so an optional range is enforced whenever it matters.
- A cycle of requirements is legal for resolvelib but not for a start order, so after a
  successful search the chosen graph is checked and a cycle is reported by name.

Failures become a ``Conflict`` (ObjectStack ``DependencyConflictSchema`` types) with a
sentence a person can act on, raised inside ``ResolutionFailed``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

from resolvelib import AbstractProvider, BaseReporter, ResolutionImpossible, Resolver
from resolvelib import ResolutionTooDeep as _TooDeep
from resolvelib.structs import RequirementInformation

from osk_daemon.errors import OskError
from osk_daemon.versioning.semver import Comparator, Range, Version

__all__ = [
    "Conflict",
    "ConflictParty",
    "ConflictType",
    "Declares",
    "Resolution",
    "ResolutionFailed",
    "resolve",
    "start_order",
]


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


class ConflictType(StrEnum):
    VERSION_MISMATCH = "version-mismatch"
    MISSING_DEPENDENCY = "missing-dependency"
    CIRCULAR_DEPENDENCY = "circular-dependency"
    INCOMPATIBLE_VERSIONS = "incompatible-versions"


@dataclass(frozen=True)
class ConflictParty:
    """One side of a conflict: ``plugin`` at ``version`` (None: the config) asks ``requirement``."""

    plugin: str
    version: Version | None = None
    requirement: str | None = None


@dataclass(frozen=True)
class Conflict:
    type: ConflictType
    plugins: tuple[ConflictParty, ...]
    description: str


class ResolutionFailed(OskError):
    """No set of versions satisfies every requirement; ``conflict`` says why."""

    code = "resolution"

    def __init__(self, conflict: Conflict) -> None:
        self.conflict = conflict
        super().__init__(conflict.description)


@dataclass(frozen=True)
class Resolution:
    """The chosen version of each plugin and, per plugin, the plugins it waits for."""

    versions: Mapping[str, Version]
    requires: Mapping[str, frozenset[str]]
    optional: Mapping[str, frozenset[str]] = field(default_factory=dict)


# -- the provider -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, eq=False)
class _Candidate:  # one object per (identifier, version): identity is equality, hashing is cheap
    ident: str
    plugin: str
    version: Version
    provided: Version | None = None  # for service candidates: the service's version

    def __str__(self) -> str:
        return f"{self.plugin} {self.version}"


@dataclass(frozen=True, slots=True)
class _Need:
    ident: str
    range: Range
    text: str


def _ident(need: Needs) -> str:
    return f"service:{need.name}" if need.service else need.name


def _exact(version: Version) -> Range:
    return Range(str(version), ((Comparator("=", version),),), include_prerelease=True)


class _Provider(AbstractProvider[_Need, _Candidate, str]):
    def __init__(self, catalogue: Catalogue, promoted: set[tuple[str, str]]) -> None:
        self._catalogue = catalogue
        self._promoted = promoted
        self._ordered = {
            name: sorted(versions, reverse=True) for name, versions in catalogue.items()
        }
        self._providers: dict[str, list[_Candidate]] = {}
        self._plugin_cands: dict[str, list[_Candidate]] = {}
        for plugin, versions in self._ordered.items():
            for version in versions:
                for service, provided in catalogue[plugin][version].provides.items():
                    ident = f"service:{service}"
                    self._providers.setdefault(ident, []).append(
                        _Candidate(ident, plugin, version, provided)
                    )
        for cands in self._providers.values():
            cands.sort(key=lambda c: (c.provided, c.version), reverse=True)
        self._deps: dict[_Candidate, list[_Need]] = {}
        self._matches: dict[tuple[str, str, bool], list[_Candidate]] = {}
        self._match_sets: dict[tuple[str, str, bool], frozenset[_Candidate]] = {}
        self.dead: dict[_Candidate, _Need] = {}
        self._prune()
        self._live = {
            ident: [c for c in self._all(ident) if c not in self.dead]
            for ident in [*self._ordered, *self._providers]
        }

    def _prune(self) -> None:
        """Drop candidates that cannot work whatever else is chosen, to a fixpoint.

        A candidate is dead when one of its hard requirements has no live match; dropping
        it may kill what needs it. This catches in a few passes the long chains that
        resolvelib would otherwise backtrack through one combination at a time.
        """
        live = {c for ident in [*self._ordered, *self._providers] for c in self._all(ident)}
        changed = True
        while changed:
            changed = False
            for candidate in list(live):
                for need in self.get_dependencies(candidate):
                    if not any(m in live for m in self.matches(need)):
                        live.discard(candidate)
                        self.dead[candidate] = need
                        changed = True
                        break

    def matches(self, need: _Need) -> list[_Candidate]:
        """Every candidate (dead or alive) that ``need`` accepts, best first."""
        key = (need.ident, need.text, need.range.include_prerelease)
        found = self._matches.get(key)
        if found is None:
            found = self._matches[key] = [
                c for c in self._all(need.ident) if self._fits([need.range], c)
            ]
        return found

    def identify(self, requirement_or_candidate: _Need | _Candidate) -> str:
        return requirement_or_candidate.ident

    def get_preference(
        self,
        identifier: str,
        resolutions: Mapping[str, _Candidate],
        candidates: Mapping[str, Iterator[_Candidate]],
        information: Mapping[str, Iterator[RequirementInformation[_Need, _Candidate]]],
        backtrack_causes: Sequence[RequirementInformation[_Need, _Candidate]],
    ) -> Any:
        caused = any(c.requirement.ident == identifier for c in backtrack_causes)
        return (not caused, len(self._live.get(identifier, ())), identifier)

    def find_matches(
        self,
        identifier: str,
        requirements: Mapping[str, Iterator[_Need]],
        incompatibilities: Mapping[str, Iterator[_Candidate]],
    ) -> list[_Candidate]:
        accepted = [self._match_set(r) for r in requirements[identifier]]
        bad = set(incompatibilities[identifier])
        return [
            c
            for c in self._live.get(identifier, ())
            if c not in bad and all(c in a for a in accepted)
        ]

    def _match_set(self, need: _Need) -> frozenset[_Candidate]:
        key = (need.ident, need.text, need.range.include_prerelease)
        found = self._match_sets.get(key)
        if found is None:
            found = self._match_sets[key] = frozenset(self.matches(need))
        return found

    def is_satisfied_by(self, requirement: _Need, candidate: _Candidate) -> bool:
        return candidate in self._match_set(requirement)

    def get_dependencies(self, candidate: _Candidate) -> list[_Need]:
        deps = self._deps.get(candidate)
        if deps is None:
            deps = self._deps[candidate] = list(self._compute_deps(candidate))
        return deps

    def _compute_deps(self, candidate: _Candidate) -> Iterator[_Need]:
        if candidate.provided is not None:
            yield _Need(candidate.plugin, _exact(candidate.version), str(candidate.version))
            return
        declared = self._catalogue[candidate.plugin][candidate.version]
        for need in declared.requires:
            ident = _ident(need)
            if need.optional and (candidate.plugin, ident) not in self._promoted:
                continue
            yield _Need(ident, need.range, str(need.range))

    def _all(self, identifier: str) -> list[_Candidate]:
        if identifier.startswith("service:"):
            return self._providers.get(identifier, [])
        found = self._plugin_cands.get(identifier)
        if found is None:
            versions = self._ordered.get(identifier, [])
            found = self._plugin_cands[identifier] = [
                _Candidate(identifier, identifier, v) for v in versions
            ]
        return found

    @staticmethod
    def _fits(ranges: Iterable[Range], candidate: _Candidate) -> bool:
        version = candidate.provided if candidate.provided is not None else candidate.version
        return all(r.contains(version) for r in ranges)


class _Reporter(BaseReporter[_Need, _Candidate, str]):
    pass


# -- the public functions ---------------------------------------------------------------------


def resolve(
    catalogue: Catalogue,
    roots: Mapping[str, Range],
    *,
    max_rounds: int = 20_000,
) -> Resolution:
    """Choose one version per needed plugin, preferring the highest that fits.

    ``catalogue`` maps plugin -> version -> its declarations; ``roots`` maps the plugins the
    config asks for to a range. Raises ``ResolutionFailed`` whose ``conflict`` is a
    version-mismatch (nothing installed fits a range), missing-dependency (nothing of that
    name is installed), incompatible-versions (two requirements cannot hold together),
    circular-dependency (the chosen plugins wait on each other), or a search that ran past
    ``max_rounds``. Cost: pure CPU, usually one resolvelib round per plugin.
    """
    for name in roots:
        if name not in catalogue:
            raise ResolutionFailed(_missing(name, None, roots[name]))
    promoted: set[tuple[str, str]] = set()
    while True:
        chosen = _search(catalogue, roots, promoted, max_rounds)
        late = _optional_to_enforce(catalogue, chosen, promoted)
        if not late:
            break
        promoted |= late
    result = _graph(catalogue, chosen)
    cycle = _find_cycle(result)
    if cycle:
        path = " -> ".join(f"{p} {result.versions[p]}" for p in cycle)
        parties = tuple(ConflictParty(p, result.versions[p]) for p in cycle[:-1])
        raise ResolutionFailed(
            Conflict(
                ConflictType.CIRCULAR_DEPENDENCY,
                parties,
                f"plugins wait on each other in a cycle: {path}; none of them can start first",
            )
        )
    return result


def start_order(resolution: Resolution) -> list[list[str]]:
    """Waves of plugins to start in parallel, dependencies first (reverse it to stop).

    Each wave holds the plugins whose requirements (hard and resolved optional ones) are all
    in earlier waves, sorted by name. Raises ``ValueError`` naming a cycle.
    """
    edges = _edges(resolution)
    left = {p: set(deps) for p, deps in edges.items()}
    waves: list[list[str]] = []
    while left:
        wave = sorted(p for p, deps in left.items() if not deps)
        if not wave:
            cycle = _find_cycle(resolution) or sorted(left)
            raise ValueError(f"dependency cycle: {' -> '.join(cycle)}")
        waves.append(wave)
        for p in wave:
            del left[p]
        for deps in left.values():
            deps.difference_update(wave)
    return waves


# -- internals --------------------------------------------------------------------------------


def _search(
    catalogue: Catalogue,
    roots: Mapping[str, Range],
    promoted: set[tuple[str, str]],
    max_rounds: int,
) -> dict[str, Version]:
    provider = _Provider(catalogue, promoted)
    resolver: Resolver[_Need, _Candidate, str] = Resolver(provider, _Reporter())
    wanted = [_Need(name, rng, str(rng)) for name, rng in roots.items()]
    try:
        result = resolver.resolve(wanted, max_rounds=max_rounds)
    except ResolutionImpossible as exc:
        raise ResolutionFailed(_explain(catalogue, provider, list(exc.causes))) from exc
    except _TooDeep as exc:
        raise ResolutionFailed(
            Conflict(
                ConflictType.INCOMPATIBLE_VERSIONS,
                (),
                f"gave up after {exc.round_count} rounds of backtracking; pin some plugins "
                "to exact versions in the config to narrow the search",
            )
        ) from exc
    return {c.plugin: c.version for ident, c in result.mapping.items() if ident == c.plugin}


def _optional_to_enforce(
    catalogue: Catalogue, chosen: Mapping[str, Version], promoted: set[tuple[str, str]]
) -> set[tuple[str, str]]:
    late: set[tuple[str, str]] = set()
    for plugin, version in chosen.items():
        for need in catalogue[plugin][version].requires:
            key = (plugin, _ident(need))
            if not need.optional or key in promoted:
                continue
            if need.service:
                if _provider_of(catalogue, chosen, need) is None and any(
                    need.name in catalogue[p][v].provides for p, v in chosen.items()
                ):
                    late.add(key)
            elif need.name in chosen and not need.range.contains(chosen[need.name]):
                late.add(key)
    return late


def _provider_of(catalogue: Catalogue, chosen: Mapping[str, Version], need: Needs) -> str | None:
    for plugin, version in sorted(chosen.items()):
        provided = catalogue[plugin][version].provides.get(need.name)
        if provided is not None and need.range.contains(provided):
            return plugin
    return None


def _graph(catalogue: Catalogue, chosen: Mapping[str, Version]) -> Resolution:
    hard: dict[str, frozenset[str]] = {}
    soft: dict[str, frozenset[str]] = {}
    for plugin, version in chosen.items():
        deps: set[str] = set()
        opts: set[str] = set()
        for need in catalogue[plugin][version].requires:
            target = _provider_of(catalogue, chosen, need) if need.service else need.name
            if target is None or target not in chosen or target == plugin:
                continue
            (opts if need.optional else deps).add(target)
        hard[plugin] = frozenset(deps)
        soft[plugin] = frozenset(opts - deps)
    return Resolution(dict(sorted(chosen.items())), hard, soft)


def _edges(resolution: Resolution) -> dict[str, frozenset[str]]:
    return {
        p: resolution.requires.get(p, frozenset()) | resolution.optional.get(p, frozenset())
        for p in resolution.versions
    }


def _find_cycle(resolution: Resolution) -> list[str]:
    edges = _edges(resolution)
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return []

    for node in sorted(edges):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return []


def _who(parent: _Candidate | None) -> str:
    return "the config" if parent is None else str(parent)


def _missing(name: str, parent: _Candidate | None, rng: Range) -> Conflict:
    party = ConflictParty(parent.plugin if parent else name, parent.version if parent else None)
    return Conflict(
        ConflictType.MISSING_DEPENDENCY,
        (party,),
        f"{_who(parent)} needs {name} {rng}, but no version of {name} is installed",
    )


def _explain(
    catalogue: Catalogue,
    provider: _Provider,
    causes: list[RequirementInformation[_Need, _Candidate]],
) -> Conflict:
    ident = causes[0].requirement.ident
    unique = {(c.parent, c.requirement.text): c for c in causes if c.requirement.ident == ident}
    mine = list(unique.values())
    target = ident.removeprefix("service:")
    noun = f"service {target}" if ident != target else target
    parties = tuple(
        ConflictParty(
            c.parent.plugin if c.parent else target,
            c.parent.version if c.parent else None,
            f"{target} {c.requirement.text}",
        )
        for c in mine
    )
    asks = [f"{_who(c.parent)} needs {noun} {c.requirement.text}" for c in mine]
    available = _available(catalogue, ident)
    if not available:
        return Conflict(
            ConflictType.MISSING_DEPENDENCY,
            parties,
            f"{asks[0]}, but no version of {noun} is installed",
        )
    shown = _show(available)
    for cause, ask, party in zip(mine, asks, parties, strict=True):
        fitting = provider.matches(cause.requirement)
        if fitting and all(c in provider.dead for c in fitting):
            return _dead_chain(catalogue, provider, ask, fitting[0])
        if not fitting:
            return Conflict(
                ConflictType.VERSION_MISMATCH,
                (party,),
                f"{ask}, but the installed versions of {noun} are {shown}",
            )
    head, *rest = asks
    return Conflict(
        ConflictType.INCOMPATIBLE_VERSIONS,
        parties,
        f"{head}, but {', and '.join(rest)}; no version of {noun} satisfies "
        f"{'both' if len(asks) == 2 else 'all of them'} (installed: {shown})",
    )


def _dead_chain(catalogue: Catalogue, provider: _Provider, ask: str, start: _Candidate) -> Conflict:
    """Follow why ``start`` cannot be used down to the requirement nothing satisfies."""
    path: list[str] = []
    candidate = start
    while True:
        need = provider.dead[candidate]
        fitting = provider.matches(need)
        path.append(str(candidate))
        if not fitting or fitting[0] not in provider.dead or len(path) > 8:
            break
        candidate = fitting[0]
    target = need.ident.removeprefix("service:")
    noun = f"service {target}" if need.ident != target else target
    available = _available(catalogue, need.ident)
    party = ConflictParty(candidate.plugin, candidate.version, f"{target} {need.text}")
    via = f" ({ask}: {' -> '.join(path)})" if len(path) > 1 else f" ({ask})"
    if not available:
        return Conflict(
            ConflictType.MISSING_DEPENDENCY,
            (party,),
            f"{candidate} needs {noun} {need.text}, but no version of {noun} is installed{via}",
        )
    return Conflict(
        ConflictType.VERSION_MISMATCH,
        (party,),
        f"{candidate} needs {noun} {need.text}, but the installed versions of {noun} are "
        f"{_show(available)}{via}",
    )


def _available(catalogue: Catalogue, ident: str) -> list[Version]:
    target = ident.removeprefix("service:")
    if ident == target:
        return sorted(catalogue.get(target, {}), reverse=True)
    provided = {
        d.provides[target] for vs in catalogue.values() for d in vs.values() if target in d.provides
    }
    return sorted(provided, reverse=True)


def _show(versions: list[Version]) -> str:
    return ", ".join(str(v) for v in versions[:8]) + (", ..." if len(versions) > 8 else "")
