"""Conflicts, and how to tell a person why no set of versions works.

The search hands over the requirements on one identifier that cannot hold together (see
``search``). This module turns them into a ``Conflict`` of the ObjectStack
``DependencyConflictSchema`` types with a sentence a person can act on:

- nothing of that name is installed: missing-dependency;
- one requirement matches no installed version: version-mismatch, listing what is there;
- what it matches can never be used: follow ``Provider.dead`` down the chain to the
  requirement nothing satisfies, and report that, with the path that led there;
- otherwise: incompatible-versions, "A needs X ^3, but B needs X ~2.5; no version of X
  satisfies both", keeping only requirements that are needed for the clash.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

from osk_daemon.errors import OskError
from osk_daemon.versioning.provider import Candidate, Catalogue, Cause, Provider, noun
from osk_daemon.versioning.semver import Range, Version

_SHOWN = 8  # installed versions listed in a message
_CHAIN = 8  # dead candidates followed in a message


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


def missing_root(name: str, rng: Range) -> Conflict:
    """The config asks for a plugin of which no version is installed."""
    return Conflict(
        ConflictType.MISSING_DEPENDENCY,
        (ConflictParty(name),),
        f"the config needs {name} {rng}, but no version of {name} is installed",
    )


def too_deep(rounds: int) -> Conflict:
    return Conflict(
        ConflictType.INCOMPATIBLE_VERSIONS,
        (),
        f"gave up after {rounds} rounds of backtracking; pin some plugins to exact versions "
        "in the config to narrow the search",
    )


def explain(provider: Provider, ident: str, causes: Sequence[Cause]) -> Conflict:
    """Say why ``causes``, the requirements on ``ident``, cannot all be met.

    Cost: a few cached provider lookups per cause.
    """
    mine = _essential(provider, causes)
    target = ident.removeprefix("service:")
    what = noun(ident)
    parties = tuple(
        ConflictParty(
            parent.plugin if parent else target,
            parent.version if parent else None,
            f"{target} {need.text}",
        )
        for parent, need in mine
    )
    asks = [f"{_who(parent)} needs {what} {need.text}" for parent, need in mine]
    available = _available(provider.catalogue, ident)
    if not available:
        return Conflict(
            ConflictType.MISSING_DEPENDENCY,
            parties,
            f"{asks[0]}, but no version of {what} is installed",
        )
    shown = _show(available)
    for (_, need), ask, party in zip(mine, asks, parties, strict=True):
        fitting = provider.matches(need)
        if not fitting:
            return Conflict(
                ConflictType.VERSION_MISMATCH,
                (party,),
                f"{ask}, but the installed versions of {what} are {shown}",
            )
        if all(provider.dead(c) is not None for c in fitting):
            return _dead_chain(provider, ask, fitting[0])
    common = _common(provider, mine)
    if common:  # they agree, but on nothing that can be used
        return _dead_chain(provider, asks[0], common[0])
    if len(asks) == 1:
        return Conflict(ConflictType.INCOMPATIBLE_VERSIONS, parties, asks[0])
    head, *rest = asks
    return Conflict(
        ConflictType.INCOMPATIBLE_VERSIONS,
        parties,
        f"{head}, but {', and '.join(rest)}; no version of {what} satisfies "
        f"{'both' if len(asks) == 2 else 'all of them'} (installed: {shown})",
    )


def _essential(provider: Provider, causes: Sequence[Cause]) -> list[Cause]:
    """``causes`` without repeats and, if they clash, without those the clash does not need."""
    unique = list({(parent, need.text): (parent, need) for parent, need in causes}.values())
    if _common(provider, unique):
        return unique
    kept = list(unique)
    for cause in unique:
        rest = [c for c in kept if c is not cause]
        if rest and not _common(provider, rest):
            kept = rest
    return kept


def _common(provider: Provider, causes: Sequence[Cause]) -> list[Candidate]:
    """The candidates every one of ``causes`` accepts, best first."""
    first, *others = (provider.matches(need) for _, need in causes)
    sets = [frozenset(m) for m in others]
    return [c for c in first if all(c in s for s in sets)]


def _dead_chain(provider: Provider, ask: str, start: Candidate) -> Conflict:
    """Follow why ``start`` cannot be used down to the requirement nothing satisfies."""
    path: list[str] = []
    candidate = start
    while True:
        need = provider.dead(candidate)
        assert need is not None
        fitting = provider.matches(need)
        path.append(str(candidate))
        if not fitting or provider.dead(fitting[0]) is None or len(path) > _CHAIN:
            break
        candidate = fitting[0]
    target = need.ident.removeprefix("service:")
    what = noun(need.ident)
    available = _available(provider.catalogue, need.ident)
    party = ConflictParty(candidate.plugin, candidate.version, f"{target} {need.text}")
    via = f" ({ask}: {' -> '.join(path)})" if len(path) > 1 else f" ({ask})"
    if not available:
        return Conflict(
            ConflictType.MISSING_DEPENDENCY,
            (party,),
            f"{candidate} needs {what} {need.text}, but no version of {what} is installed{via}",
        )
    return Conflict(
        ConflictType.VERSION_MISMATCH,
        (party,),
        f"{candidate} needs {what} {need.text}, but the installed versions of {what} are "
        f"{_show(available)}{via}",
    )


def _who(parent: Candidate | None) -> str:
    return "the config" if parent is None else str(parent)


def _available(catalogue: Catalogue, ident: str) -> list[Version]:
    target = ident.removeprefix("service:")
    if ident == target:
        return sorted(catalogue.get(target, {}), reverse=True)
    provided = {
        d.provides[target] for vs in catalogue.values() for d in vs.values() if target in d.provides
    }
    return sorted(provided, reverse=True)


def _show(versions: list[Version]) -> str:
    return ", ".join(str(v) for v in versions[:_SHOWN]) + (
        ", ..." if len(versions) > _SHOWN else ""
    )
