"""Incompatibilities: sets of choices that cannot all hold, the facts the search reasons with.

The search (``search``) is PubGrub's: it learns incompatibilities from conflicts and proves
"no solution" by deriving the empty one. Here are the values it works on.

A *term* says what an identifier may be, as a bit set over its values: bit 0 is "not
chosen", bit ``i + 1`` is its ``i``-th candidate (best first, ``Provider.candidates``). A
term holds when the identifier's value is in the set, so intersection, union and negation
are ``&``, ``|`` and ``^ universe``, and every question the search asks of a term ("does
what we know imply it?", "does it contradict it?") is one ``&``. A term that excludes bit 0
is *positive*: the identifier must be chosen.

An *incompatibility* is a set of terms, at most one per identifier, that cannot all hold at
once. It is *external* (a fact read from the catalogue or the config) or *derived* from two
others by resolution; the derived ones form a graph whose leaves are external, and the
graph behind the empty incompatibility is the proof ``explain`` turns into words:

- ``FromConfig``: the config needs ``need``: {ident: not in range};
- ``FromDependency``: the candidates ``versions`` of ``ident`` all need ``need``:
  {ident: versions, need.ident: not in range}, or for an optional need {ident: versions,
  need.ident: chosen outside range};
- ``Derived``: follows from ``left`` and ``right``.
"""

from __future__ import annotations

from dataclasses import dataclass

from osk_daemon.versioning.matching import NOT_CHOSEN
from osk_daemon.versioning.provider import Need

__all__ = ["NOT_CHOSEN", "Cause", "Derived", "FromConfig", "FromDependency", "Incompatibility"]


@dataclass(frozen=True, slots=True)
class FromConfig:
    need: Need


@dataclass(frozen=True, slots=True)
class FromDependency:
    ident: str
    versions: int  # bit set over the candidates of ``ident``
    need: Need


@dataclass(frozen=True, slots=True)
class Derived:
    left: Incompatibility
    right: Incompatibility


Cause = FromConfig | FromDependency | Derived


@dataclass(frozen=True, slots=True, eq=False)
class Incompatibility:
    """``terms`` (identifier -> term) cannot all hold at once; ``cause`` says why."""

    terms: dict[str, int]
    cause: Cause

    @property
    def external(self) -> bool:
        return not isinstance(self.cause, Derived)
