"""Conflicts, and how to tell a person why no set of versions works.

When nothing works the search hands over a proof: the empty incompatibility, derived from
facts read from the config and the catalogue ("the config needs A ^2", "B 1.0.0 to 1.4.2
need C ^3"; see ``incompatibility``). Those facts, the leaves of the derivation, are
exactly what the failure rests on: drop any one and the proof falls apart. This module
picks among them the *clash* a person can act on and says it in one sentence, with the
other facts in brackets as the context that makes the clash unavoidable:

- a requirement on something of which nothing is installed: missing-dependency;
- a requirement no installed version satisfies: version-mismatch, listing what is there;
- requirements on one identifier, from plugins that can be chosen together, that no
  installed version satisfies at once: incompatible-versions, "A needs X ^3, but B needs X
  ~2.5; no version of X satisfies both", keeping only the requirements the clash needs.

When the proof holds several clashes (every release of a plugin fails for its own reason),
incompatible-versions is preferred as the headline; the others are among the context.
Each ``Conflict`` is of the ObjectStack ``DependencyConflictSchema`` types.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

from osk_daemon.errors import OskError
from osk_daemon.versioning.incompatibility import (
    Derived,
    FromConfig,
    FromDependency,
    Incompatibility,
)
from osk_daemon.versioning.matching import NOT_CHOSEN, indices
from osk_daemon.versioning.provider import Catalogue, Need, Provider, noun
from osk_daemon.versioning.semver import Range, Version

_SHOWN = 8  # installed versions listed in a message
_LISTED = 3  # versions of one plugin listed by name in a message
_CONTEXT = 12  # facts given as context


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


@dataclass(frozen=True, slots=True, eq=False)
class _Ask:
    """A fact of the proof as a requirement: ``who`` (None: the config) needs ``need``."""

    who: tuple[str, int] | None  # (identifier, its candidates that ask it, as a term)
    need: Need


def explain(provider: Provider, proof: Incompatibility) -> Conflict:
    """Say why nothing works, given the search's ``proof`` (the empty incompatibility).

    Cost: linear in the size of the derivation, plus a few cached matches per fact.
    """
    asks = [_ask(fact) for fact in _facts(proof)]
    allowed = {a.need.ident: provider.mask(a.need) for a in asks if a.who is None}
    asks = [_narrowed(a, allowed) for a in asks]
    kind, clash = _clash(provider, asks)
    what = noun(clash[0].need.ident)
    said = [_say(provider, a) for a in clash]
    others = _context(provider, [a for a in asks if a not in clash])
    parties = tuple(_party(provider, a) for a in clash)
    if kind is ConflictType.MISSING_DEPENDENCY:
        text = f"{said[0]}, but no version of {what} is installed{others}"
    elif kind is ConflictType.VERSION_MISMATCH:
        text = (
            f"{said[0]}, but the installed versions of {what} are {_installed(provider, clash[0])}"
        )
        text += others
    elif len(said) == 1:
        text = f"{said[0]}{others}, and no set of installed versions satisfies all of that"
    else:
        head, *rest = said
        text = (
            f"{head}, but {', and '.join(rest)}{others}; no version of {what} satisfies "
            f"{'both' if len(said) == 2 else 'all of them'} "
            f"(installed: {_installed(provider, clash[0])})"
        )
    return Conflict(kind, parties, text)


# -- the proof --------------------------------------------------------------------------------


def _facts(proof: Incompatibility) -> list[Incompatibility]:
    """The external incompatibilities the proof rests on, depth first, each once."""
    found: list[Incompatibility] = []
    seen: set[int] = set()
    stack = [proof]
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node.cause, Derived):
            stack += (node.cause.right, node.cause.left)
        else:
            found.append(node)
    return found


def _ask(fact: Incompatibility) -> _Ask:
    cause = fact.cause
    if isinstance(cause, FromConfig):
        return _Ask(None, cause.need)
    assert isinstance(cause, FromDependency)
    return _Ask((cause.ident, cause.versions), cause.need)


def _narrowed(ask: _Ask, allowed: dict[str, int]) -> _Ask:
    """The ask, said only of the releases the config allows (when that leaves any)."""
    if ask.who is None or ask.who[0] not in allowed:
        return ask
    ident, versions = ask.who
    return _Ask((ident, versions & allowed[ident] or versions), ask.need)


def _clash(provider: Provider, asks: list[_Ask]) -> tuple[ConflictType, list[_Ask]]:
    """The requirements to headline, and what kind of conflict they make."""
    fallback: tuple[ConflictType, list[_Ask]] | None = None
    by_target: dict[str, list[_Ask]] = {}
    for ask in asks:
        by_target.setdefault(ask.need.ident, []).append(ask)
    for target, on in by_target.items():
        found = _incompatible(provider, on)
        if found:
            return ConflictType.INCOMPATIBLE_VERSIONS, found
        if fallback is None:
            for ask in on:
                if ask.need.optional:
                    continue
                if provider.universe(target) == NOT_CHOSEN:
                    fallback = ConflictType.MISSING_DEPENDENCY, [ask]
                elif not provider.mask(ask.need):
                    fallback = ConflictType.VERSION_MISMATCH, [ask]
    if fallback is not None:
        return fallback
    return ConflictType.INCOMPATIBLE_VERSIONS, asks[:1]  # no clash on one identifier


def _incompatible(provider: Provider, on: Sequence[_Ask]) -> list[_Ask]:
    """Requirements on one identifier that can hold together but accept nothing in common.

    Two asks can hold together unless they come from disjoint releases of one plugin. A
    pair is the common case and the easiest to read; otherwise one ask per plugin, dropping
    those the clash does not need.
    """
    unique = list({(a.who, a.need.text, a.need.optional): a for a in on}.values())
    for i, one in enumerate(unique):
        for other in unique[i + 1 :]:
            if (
                _together(one, other)
                and not (one.need.optional and other.need.optional)
                and not provider.mask(one.need) & provider.mask(other.need)
            ):
                return [one, other]
    kept = list({a.who[0] if a.who else None: a for a in reversed(unique)}.values())[::-1]
    if len(kept) < 3 or _common(provider, kept) or all(a.need.optional for a in kept):
        return []
    for ask in list(kept):
        rest = [a for a in kept if a is not ask]
        if len(rest) >= 2 and not _common(provider, rest):
            kept = rest
    return kept


def _together(one: _Ask, other: _Ask) -> bool:
    if one.who is None or other.who is None or one.who[0] != other.who[0]:
        return True
    return bool(one.who[1] & other.who[1])


def _common(provider: Provider, asks: Sequence[_Ask]) -> int:
    found = -1
    for ask in asks:
        found &= provider.mask(ask.need)
    return found


# -- words ------------------------------------------------------------------------------------


def _say(provider: Provider, ask: _Ask) -> str:
    """``echo 2.3.0 needs store ^3.0``, ``every version of mid needs lib ^1``..."""
    need = ask.need
    what = f"{noun(need.ident)} {need.text}{' (optional)' if need.optional else ''}"
    if ask.who is None:
        return f"the config needs {what}"
    ident, versions = ask.who
    if ident.startswith("service:"):
        offers = [provider.candidates(ident)[i] for i in indices(versions)]
        listed = ", ".join(f"{c.provided}" for c in offers)
        return f"{noun(ident)} {listed} comes from {need.ident} {need.text} only"
    who, many = _versions(provider, ident, versions)
    return f"{who} {'need' if many else 'needs'} {what}"


def _versions(provider: Provider, ident: str, versions: int) -> tuple[str, bool]:
    """A set of releases in words, and whether the phrase is plural."""
    every = provider.candidates(ident)
    chosen = indices(versions)
    if len(chosen) == 1:
        return f"{ident} {every[chosen[0]].version}", False
    if len(chosen) == len(every):
        return f"every version of {ident}", False
    newest, oldest = every[chosen[0]].version, every[chosen[-1]].version
    if chosen[-1] - chosen[0] + 1 == len(chosen):
        return f"{ident} {oldest} to {newest}", True
    if len(chosen) <= _LISTED:
        listed = [str(every[i].version) for i in reversed(chosen)]
        return f"{ident} {', '.join(listed[:-1])} and {listed[-1]}", True
    return f"{len(chosen)} versions of {ident} from {oldest} to {newest}", True


def _context(provider: Provider, asks: Sequence[_Ask]) -> str:
    """The other facts of the proof: the config's, then dependents before dependencies."""
    if not asks:
        return ""
    config = [a for a in asks if a.who is None]
    rest = [a for a in asks if a.who is not None]
    rank = provider.layering([a.need.ident for a in config])
    rest.sort(key=lambda a: rank.get(a.who[0] if a.who else "", len(rank)))
    said = []
    if config:
        wanted = [f"{noun(a.need.ident)} {a.need.text}" for a in config]
        tail = f"{', '.join(wanted[:-1])} and {wanted[-1]}" if len(wanted) > 1 else wanted[0]
        said.append(f"the config needs {tail}")
    runs: dict[tuple[str, str, bool], list[_Ask]] = {}
    for ask in rest:
        assert ask.who is not None
        if provider.universe(ask.need.ident) == NOT_CHOSEN:
            said.append(f"{_say(provider, ask)}, which is not installed")
        elif not provider.mask(ask.need):
            said.append(
                f"{_say(provider, ask)}, but the installed versions are {_installed(provider, ask)}"
            )
        elif ask.who[0].startswith("service:"):
            said.append(_say(provider, ask))
        else:
            key = (ask.who[0], ask.need.ident, ask.need.optional)
            if key not in runs:
                said.append("")  # filled in below, keeping the order
                runs[key] = []
            runs[key].append(ask)
    merged = iter([_say_runs(provider, r) for r in runs.values()])
    said = [text or next(merged) for text in said]
    if len(said) > _CONTEXT:
        said[_CONTEXT:] = [f"and {len(said) - _CONTEXT} more requirements"]
    return f" ({'; '.join(said)})"


def _say_runs(provider: Provider, asks: list[_Ask]) -> str:
    """Releases of one plugin asking one identifier, run by run, as one sentence."""
    if len(asks) == 1:
        return _say(provider, asks[0])
    asks = sorted(asks, key=lambda a: -indices(a.who[1] if a.who else 0)[-1])
    ident = asks[0].who[0] if asks[0].who else ""
    versions = 0
    for ask in asks:
        versions |= ask.who[1] if ask.who else 0
    who, many = _versions(provider, ident, versions)
    texts = list(dict.fromkeys(a.need.text for a in asks))
    need = asks[0].need
    optional = " (optional)" if need.optional else ""
    verb = "need" if many else "needs"
    if len(texts) == 1:
        return f"{who} {verb} {noun(need.ident)} {texts[0]}{optional}"
    ranges = f"{', '.join(texts[:-1])} or {texts[-1]}"
    return f"{who} {verb} {noun(need.ident)} {ranges}{optional}, depending on the release"


def _party(provider: Provider, ask: _Ask) -> ConflictParty:
    target = ask.need.ident.removeprefix("service:")
    requirement = f"{target} {ask.need.text}"
    if ask.who is None:
        return ConflictParty(target, None, requirement)
    ident, versions = ask.who
    newest = provider.candidates(ident)[indices(versions)[0]]
    return ConflictParty(newest.plugin, newest.version, requirement)


def _installed(provider: Provider, ask: _Ask) -> str:
    return _show(_available(provider.catalogue, ask.need.ident))


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
