"""SemVer 2.0.0 versions and npm-style ranges, checked against npm's own test vectors.

Why our own: the PyPI candidates (``node-semver``, ``semantic_version``) each fail some of
npm's fixtures (``^1.0.0`` with prereleases included; spaces after operators, ``~>``, ``^x``).
Plugin authors write npm ranges, so the rules here are npm's (strict mode, not ``loose``).

How it works:

- ``Version`` is a frozen value ordered by SemVer precedence: numbers numerically, a
  prerelease sorts before its release, prerelease identifiers compare numeric-numerically,
  numeric before alphanumeric, alphanumerics in ASCII order, and a shorter list of equal
  identifiers first. Build metadata is kept for ``str`` but ignored by ``==``, ``<`` and
  ``hash``. A leading ``v`` and surrounding whitespace are accepted, as npm does.
- ``Range.parse`` splits on ``||`` into comparator sets (alternatives); inside a set, spaces
  mean AND. Each set is first checked for a hyphen range, then every token (``^``, ``~``,
  ``~>``, x-ranges, partial versions, ``<``/``<=``/``>``/``>=``/``=``) is desugared into at
  most two primitive comparators exactly as npm's ``ranges.js`` does (``^1.2.3`` becomes
  ``>=1.2.3 <2.0.0-0``). ``normalized`` shows that form.
- A prerelease version satisfies a set only if every comparator accepts it *and* some
  comparator names a prerelease on the same ``[major, minor, patch]`` tuple, so ``^1.2.3``
  never picks ``2.0.0-rc.1`` by accident. ``include_prerelease=True`` drops that rule.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

__all__ = ["Comparator", "InvalidRange", "InvalidVersion", "Range", "Version"]

MAX_LENGTH = 256
MAX_SAFE_INTEGER = 2**53 - 1

_NUM = r"0|[1-9]\d*"
_PRE_ID = r"(?:0|[1-9]\d*|\d*[a-zA-Z-][a-zA-Z0-9-]*)"
_PRE = rf"{_PRE_ID}(?:\.{_PRE_ID})*"
_BUILD = r"[0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*"
_VERSION_RE = re.compile(rf"v?({_NUM})\.({_NUM})\.({_NUM})(?:-({_PRE}))?(?:\+({_BUILD}))?")
_XR = rf"{_NUM}|[xX*]"
_PARTIAL = rf"v?({_XR})(?:\.({_XR})(?:\.({_XR})(?:-({_PRE}))?(?:\+({_BUILD}))?)?)?"
_TOKEN_RE = re.compile(rf"(~>?|\^|<=|>=|<|>|=)?{_PARTIAL}")
_PARTIAL_RE = re.compile(_PARTIAL)
_HYPHEN_RE = re.compile(r"^\s*(\S+)\s+-\s+(\S+)\s*$")
_OP_SPACE_RE = re.compile(r"(~>?|\^|<=|>=|<|>|=)\s+")


class InvalidVersion(ValueError):
    """``text`` is not a SemVer 2.0.0 version; ``reason`` says what is wrong."""

    def __init__(self, text: str, reason: str) -> None:
        self.text = text
        self.reason = reason
        super().__init__(f"invalid version {text!r}: {reason}")


class InvalidRange(ValueError):
    """``text`` is not an npm-style version range; ``reason`` says what is wrong."""

    def __init__(self, text: str, reason: str) -> None:
        self.text = text
        self.reason = reason
        super().__init__(f"invalid version range {text!r}: {reason}")


PreId = int | str


@dataclass(frozen=True, slots=True, eq=False)
class Version:
    """A SemVer 2.0.0 version; ordered and hashed by precedence (build metadata ignored)."""

    major: int
    minor: int
    patch: int
    prerelease: tuple[PreId, ...] = ()
    build: tuple[str, ...] = ()
    _key: tuple[object, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if min(self.major, self.minor, self.patch) < 0:
            raise InvalidVersion(str(self), "numbers must not be negative")
        pre: tuple[object, ...] = (
            (0, tuple((0, p, "") if isinstance(p, int) else (1, 0, p) for p in self.prerelease))
            if self.prerelease
            else (1,)
        )
        object.__setattr__(self, "_key", (self.major, self.minor, self.patch, pre))

    @classmethod
    def parse(cls, text: str) -> Version:
        """Parse ``1.2.3``, ``1.2.3-rc.1+build.5`` or ``v1.2.3``; raises ``InvalidVersion``."""
        if not isinstance(text, str):
            raise InvalidVersion(repr(text), f"expected a string, got {type(text).__name__}")
        if len(text) > MAX_LENGTH:
            raise InvalidVersion(text[:40] + "...", f"longer than {MAX_LENGTH} characters")
        match = _VERSION_RE.fullmatch(text.strip())
        if match is None:
            raise InvalidVersion(text, _diagnose(text.strip()))
        major, minor, patch = (_number(text, match.group(i), InvalidVersion) for i in (1, 2, 3))
        return cls(major, minor, patch, _prerelease(match.group(4)), _build(match.group(5)))

    @property
    def is_prerelease(self) -> bool:
        return bool(self.prerelease)

    @property
    def release(self) -> tuple[int, int, int]:
        return (self.major, self.minor, self.patch)

    def __str__(self) -> str:
        text = f"{self.major}.{self.minor}.{self.patch}"
        if self.prerelease:
            text += "-" + ".".join(str(p) for p in self.prerelease)
        if self.build:
            text += "+" + ".".join(self.build)
        return text

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Version):
            return NotImplemented
        return self._key == other._key

    def __hash__(self) -> int:
        return hash(self._key)

    def __lt__(self, other: Version) -> bool:
        return self._key < other._key

    def __le__(self, other: Version) -> bool:
        return self._key <= other._key

    def __gt__(self, other: Version) -> bool:
        return self._key > other._key

    def __ge__(self, other: Version) -> bool:
        return self._key >= other._key


def _diagnose(text: str) -> str:
    if not text:
        return "empty, expected MAJOR.MINOR.PATCH such as 1.4.2"
    core = text.removeprefix("v").split("+", 1)[0].split("-", 1)[0]
    parts = core.split(".")
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        return "expected MAJOR.MINOR.PATCH[-prerelease][+build], such as 1.4.2 or 2.0.0-rc.1"
    if any(len(p) > 1 and p.startswith("0") for p in parts):
        return "numbers must not have leading zeros"
    return "bad prerelease or build part: dot-separated [0-9A-Za-z-] identifiers, no leading zeros"


def _number(text: str, digits: str, error: type[InvalidVersion] | type[InvalidRange]) -> int:
    value = int(digits)
    if value > MAX_SAFE_INTEGER:
        raise error(text, f"number {digits} is too big (max {MAX_SAFE_INTEGER})")
    return value


def _prerelease(text: str | None) -> tuple[PreId, ...]:
    if not text:
        return ()
    return tuple(int(p) if p.isdigit() else p for p in text.split("."))


def _build(text: str | None) -> tuple[str, ...]:
    return tuple(text.split(".")) if text else ()


# -- ranges -----------------------------------------------------------------------------------

_TESTS = {
    "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b,
    ">": lambda a, b: a > b,
    ">=": lambda a, b: a >= b,
    "=": lambda a, b: a == b,
}


@dataclass(frozen=True, slots=True)
class Comparator:
    """One primitive test such as ``>=1.2.3`` or ``<2.0.0-0``; ``version=None`` accepts all."""

    op: str
    version: Version | None

    def test(self, version: Version) -> bool:
        return self.version is None or bool(_TESTS[self.op](version, self.version))

    def __str__(self) -> str:
        if self.version is None:
            return "*"
        return f"{'' if self.op == '=' else self.op}{self.version}"


ANY = Comparator("", None)
_NOTHING = Comparator("<", Version(0, 0, 0, (0,)))


@dataclass(frozen=True, slots=True)
class Range:
    """An npm-style range: ``sets`` are alternatives, each an AND of comparators."""

    text: str
    sets: tuple[tuple[Comparator, ...], ...]
    include_prerelease: bool = False

    @classmethod
    def parse(cls, text: str, *, include_prerelease: bool = False) -> Range:
        """Parse npm range syntax; raises ``InvalidRange`` naming the offending part.

        Cost: linear in the length of ``text``.
        """
        if not isinstance(text, str):
            raise InvalidRange(repr(text), f"expected a string, got {type(text).__name__}")
        if len(text) > MAX_LENGTH:
            raise InvalidRange(text[:40] + "...", f"longer than {MAX_LENGTH} characters")
        sets = [_parse_set(text, p, include_prerelease) for p in re.split(r"\s*\|\|\s*", text)]
        if len(sets) > 1:
            sets = [s for s in sets if s != (_NOTHING,)] or [(_NOTHING,)]
        if (ANY,) in sets:
            sets = [(ANY,)]
        return cls(text.strip(), tuple(dict.fromkeys(sets)), include_prerelease)

    def contains(self, version: Version) -> bool:
        """Whether ``version`` satisfies any comparator set (with npm's prerelease rule)."""
        return any(self._set_contains(s, version) for s in self.sets)

    __contains__ = contains

    def max_satisfying(self, versions: Iterable[Version]) -> Version | None:
        """The highest of ``versions`` this range contains, or None. Cost: one pass."""
        best: Version | None = None
        for version in versions:
            if (best is None or version > best) and self.contains(version):
                best = version
        return best

    def filter(self, versions: Iterable[Version]) -> list[Version]:
        """The ``versions`` this range contains, in the order given."""
        return [v for v in versions if self.contains(v)]

    @property
    def normalized(self) -> str:
        """The desugared form, e.g. ``^1.2`` -> ``>=1.2.0 <2.0.0-0``."""
        return "||".join(" ".join(str(c) for c in s) for s in self.sets)

    def __str__(self) -> str:
        return self.text or "*"

    def _set_contains(self, comparators: tuple[Comparator, ...], version: Version) -> bool:
        for comparator in comparators:
            if not comparator.test(version):
                return False
        if version.prerelease and not self.include_prerelease:
            return any(
                c.version is not None
                and c.version.prerelease
                and c.version.release == version.release
                for c in comparators
            )
        return True


def _parse_set(text: str, part: str, inc_pre: bool) -> tuple[Comparator, ...]:
    hyphen = _HYPHEN_RE.match(part)
    if hyphen is not None:
        return _hyphen(text, hyphen.group(1), hyphen.group(2), inc_pre)
    tokens = _OP_SPACE_RE.sub(r"\1", part.strip()).split()
    out: list[Comparator] = []
    for token in tokens:
        out.extend(_token(text, token, inc_pre))
    if _NOTHING in out:
        return (_NOTHING,)
    floor = _ge(0, 0, 0, (0,) if inc_pre else ())
    kept = dict.fromkeys(c for c in out if c is not ANY and c != floor)
    return tuple(kept) or (ANY,)


_Parts = tuple[int | None, int | None, int | None, tuple[PreId, ...]]


def _partial(text: str, groups: tuple[str | None, ...]) -> _Parts:
    def num(digits: str | None) -> int | None:
        if digits is None or digits in "xX*":
            return None
        return _number(text, digits, InvalidRange)

    major, minor, patch = num(groups[0]), num(groups[1]), num(groups[2])
    if major is None:
        minor = patch = None
    if minor is None:
        patch = None
    return major, minor, patch, _prerelease(groups[3])


def _token(text: str, token: str, inc_pre: bool) -> list[Comparator]:
    match = _TOKEN_RE.fullmatch(token)
    if match is None:
        raise InvalidRange(text, f"{token!r} is not a version, x-range or comparator")
    op = match.group(1) or ""
    parts = _partial(text, match.groups()[1:])
    if op in ("~", "~>"):
        return _tilde(parts)
    if op == "^":
        return _caret(parts, inc_pre)
    return _xrange(op, parts, inc_pre)


def _ge(major: int, minor: int, patch: int, pre: tuple[PreId, ...] = ()) -> Comparator:
    return Comparator(">=", Version(major, minor, patch, pre))


def _lt0(major: int, minor: int, patch: int) -> Comparator:
    return Comparator("<", Version(major, minor, patch, (0,)))


def _tilde(parts: _Parts) -> list[Comparator]:
    major, minor, patch, pre = parts
    if major is None:
        return [ANY]
    if minor is None:
        return [_ge(major, 0, 0), _lt0(major + 1, 0, 0)]
    if patch is None:
        return [_ge(major, minor, 0), _lt0(major, minor + 1, 0)]
    return [_ge(major, minor, patch, pre), _lt0(major, minor + 1, 0)]


def _caret(parts: _Parts, inc_pre: bool) -> list[Comparator]:
    major, minor, patch, pre = parts
    z: tuple[PreId, ...] = (0,) if inc_pre else ()
    if major is None:
        return [ANY]
    if minor is None:
        return [_ge(major, 0, 0, z), _lt0(major + 1, 0, 0)]
    if patch is None:
        upper = _lt0(major, minor + 1, 0) if major == 0 else _lt0(major + 1, 0, 0)
        return [_ge(major, minor, 0, z), upper]
    low = pre or (z if major == 0 else ())
    if major == 0:
        upper = _lt0(0, 0, patch + 1) if minor == 0 else _lt0(0, minor + 1, 0)
    else:
        upper = _lt0(major + 1, 0, 0)
    return [_ge(major, minor, patch, low), upper]


def _xrange(op: str, parts: _Parts, inc_pre: bool) -> list[Comparator]:
    major, minor, patch, pre = parts
    z: tuple[PreId, ...] = (0,) if inc_pre else ()
    if major is None:
        return [_NOTHING] if op in ("<", ">") else [ANY]
    if minor is not None and patch is not None:
        return [Comparator(op or "=", Version(major, minor, patch, pre))]
    if op in ("", "="):
        if minor is None:
            return [_ge(major, 0, 0, z), _lt0(major + 1, 0, 0)]
        return [_ge(major, minor, 0, z), _lt0(major, minor + 1, 0)]
    m = minor if minor is not None else 0
    if op == ">":
        return [_ge(major + 1, 0, 0, z) if minor is None else _ge(major, m + 1, 0, z)]
    if op == "<=":
        return [_lt0(major + 1, 0, 0) if minor is None else _lt0(major, m + 1, 0)]
    if op == "<":
        return [_lt0(major, m, 0)]
    return [_ge(major, m, 0, z)]


def _hyphen(text: str, low: str, high: str, inc_pre: bool) -> tuple[Comparator, ...]:
    out: list[Comparator] = []
    for side, value in (("left", low), ("right", high)):
        match = _PARTIAL_RE.fullmatch(value)
        if match is None:
            raise InvalidRange(text, f"{side} side of hyphen range, {value!r}, is not a version")
    lo = _partial(text, _PARTIAL_RE.fullmatch(low).groups())  # type: ignore[union-attr]
    hi = _partial(text, _PARTIAL_RE.fullmatch(high).groups())  # type: ignore[union-attr]
    z: tuple[PreId, ...] = (0,) if inc_pre else ()
    major, minor, patch, pre = lo
    if major is not None:
        floor = _ge(major, minor or 0, patch or 0, pre or z)
        if floor != _ge(0, 0, 0, z):
            out.append(floor)
    major, minor, patch, pre = hi
    if major is None:
        pass
    elif minor is None:
        out.append(_lt0(major + 1, 0, 0))
    elif patch is None:
        out.append(_lt0(major, minor + 1, 0))
    elif pre:
        out.append(Comparator("<=", Version(major, minor, patch, pre)))
    elif inc_pre:
        out.append(_lt0(major, minor, patch + 1))
    else:
        out.append(Comparator("<=", Version(major, minor, patch)))
    return tuple(out) or (ANY,)
