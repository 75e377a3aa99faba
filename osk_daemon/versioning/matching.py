"""Which of an identifier's candidates a range accepts, as a bit set, in a few bisections.

The search asks this for every requirement of every release it reads (thousands for a
catalogue of 200 plugins x 20 versions), so testing each candidate with ``Range.contains``
would be most of its cost. Candidates are sorted best first, that is by version (or
service version) descending, and a comparator set (an AND of ``>=``, ``<``, ``=`` ...)
accepts an interval of that order: each comparator moves one end of it, found by
bisection. npm's prerelease rule (a prerelease matches only if a comparator of the set
names a prerelease of the same major.minor.patch, unless the range opts in) is not an
interval, so the few prerelease candidates are tested one by one with ``Range.contains``,
which stays the definition.

Bit ``i + 1`` of a mask stands for candidate ``i`` (bit 0 is "not chosen", see
``incompatibility``).
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Sequence

from osk_daemon.versioning.semver import Range, Version

NOT_CHOSEN = 1  # bit 0 of a term: the identifier is not chosen


class Ordered:
    """The versions of one identifier's candidates, best (highest) first."""

    def __init__(self, values: Sequence[Version]) -> None:
        self._values = list(values)
        self._ascending = self._values[::-1]
        self._prereleases = [(2 << i, v) for i, v in enumerate(self._values) if v.prerelease]

    def mask(self, rng: Range) -> int:
        """The candidates ``rng`` accepts. Cost: two bisections per comparator."""
        ascending, count = self._ascending, len(self._values)
        found = 0
        for comparators in rng.sets:
            low, high = 0, count  # positions in ascending order, high excluded
            for comparator in comparators:
                version, op = comparator.version, comparator.op
                if version is None:
                    continue
                if op == ">=":
                    low = max(low, bisect_left(ascending, version))
                elif op == ">":
                    low = max(low, bisect_right(ascending, version))
                elif op == "<":
                    high = min(high, bisect_left(ascending, version))
                elif op == "<=":
                    high = min(high, bisect_right(ascending, version))
                elif op == "=":
                    low = max(low, bisect_left(ascending, version))
                    high = min(high, bisect_right(ascending, version))
                else:
                    return self._tested(rng)
            if low < high:
                found |= ((1 << (count - low)) - (1 << (count - high))) << 1
        for bit, version in self._prereleases:
            found = found | bit if rng.contains(version) else found & ~bit
        return found

    def _tested(self, rng: Range) -> int:
        return sum(2 << i for i, v in enumerate(self._values) if rng.contains(v))


def lowest(mask: int) -> int:
    """The index of the best candidate in a term (lowest set bit above bit 0), or -1."""
    mask &= ~NOT_CHOSEN
    return (mask & -mask).bit_length() - 2


def indices(mask: int) -> list[int]:
    """The candidate indices in a term, best first."""
    found = []
    mask &= ~NOT_CHOSEN
    while mask:
        low = mask & -mask
        found.append(low.bit_length() - 2)
        mask ^= low
    return found
