"""SemVer and npm ranges against npm's own fixtures (npm/node-semver test/fixtures, strict mode).

Vectors with ``loose: true`` are left out: we implement npm's strict grammar only.
"""

from __future__ import annotations

import pytest

from osk_daemon.versioning import InvalidRange, InvalidVersion, Range, Version

pytestmark = pytest.mark.timeout(10)

# range-include.js: [range, version] that must match.
INCLUDE = [
    ("1.0.0 - 2.0.0", "1.2.3"),
    ("^1.2.3+build", "1.2.3"),
    ("^1.2.3+build", "1.3.0"),
    ("1.2.3-pre+asdf - 2.4.3-pre+asdf", "1.2.3"),
    ("1.2.3-pre+asdf - 2.4.3-pre+asdf", "1.2.3-pre.2"),
    ("1.2.3-pre+asdf - 2.4.3-pre+asdf", "2.4.3-alpha"),
    ("1.2.3+asdf - 2.4.3+asdf", "1.2.3"),
    ("1.0.0", "1.0.0"),
    (">=*", "0.2.4"),
    ("", "1.0.0"),
    ("*", "1.2.3"),
    (">=1.0.0", "1.0.0"),
    (">=1.0.0", "1.0.1"),
    (">=1.0.0", "1.1.0"),
    (">1.0.0", "1.0.1"),
    (">1.0.0", "1.1.0"),
    ("<=2.0.0", "2.0.0"),
    ("<=2.0.0", "1.9999.9999"),
    ("<=2.0.0", "0.2.9"),
    ("<2.0.0", "1.9999.9999"),
    ("<2.0.0", "0.2.9"),
    (">= 1.0.0", "1.0.0"),
    (">=  1.0.0", "1.0.1"),
    (">=   1.0.0", "1.1.0"),
    ("> 1.0.0", "1.0.1"),
    (">  1.0.0", "1.1.0"),
    ("<=   2.0.0", "2.0.0"),
    ("<= 2.0.0", "1.9999.9999"),
    ("<=  2.0.0", "0.2.9"),
    ("<    2.0.0", "1.9999.9999"),
    ("<\t2.0.0", "0.2.9"),
    (">=0.1.97", "0.1.97"),
    ("0.1.20 || 1.2.4", "1.2.4"),
    (">=0.2.3 || <0.0.1", "0.0.0"),
    (">=0.2.3 || <0.0.1", "0.2.3"),
    (">=0.2.3 || <0.0.1", "0.2.4"),
    ("||", "1.3.4"),
    ("2.x.x", "2.1.3"),
    ("1.2.x", "1.2.3"),
    ("1.2.x || 2.x", "2.1.3"),
    ("1.2.x || 2.x", "1.2.3"),
    ("x", "1.2.3"),
    ("2.*.*", "2.1.3"),
    ("1.2.*", "1.2.3"),
    ("1.2.* || 2.*", "2.1.3"),
    ("1.2.* || 2.*", "1.2.3"),
    ("*", "1.2.3"),
    ("2", "2.1.2"),
    ("2.3", "2.3.1"),
    ("~0.0.1", "0.0.1"),
    ("~0.0.1", "0.0.2"),
    ("~x", "0.0.9"),
    ("~2", "2.0.9"),
    ("~2.4", "2.4.0"),
    ("~2.4", "2.4.5"),
    ("~>3.2.1", "3.2.2"),
    ("~1", "1.2.3"),
    ("~>1", "1.2.3"),
    ("~> 1", "1.2.3"),
    ("~1.0", "1.0.2"),
    ("~ 1.0", "1.0.2"),
    ("~ 1.0.3", "1.0.12"),
    (">=1", "1.0.0"),
    (">= 1", "1.0.0"),
    ("<1.2", "1.1.1"),
    ("< 1.2", "1.1.1"),
    ("~v0.5.4-pre", "0.5.5"),
    ("~v0.5.4-pre", "0.5.4"),
    ("=0.7.x", "0.7.2"),
    ("<=0.7.x", "0.7.2"),
    (">=0.7.x", "0.7.2"),
    ("<=0.7.x", "0.6.2"),
    ("~1.2.1 >=1.2.3", "1.2.3"),
    ("~1.2.1 =1.2.3", "1.2.3"),
    ("~1.2.1 1.2.3", "1.2.3"),
    ("~1.2.1 >=1.2.3 1.2.3", "1.2.3"),
    ("~1.2.1 1.2.3 >=1.2.3", "1.2.3"),
    (">=1.2.1 1.2.3", "1.2.3"),
    ("1.2.3 >=1.2.1", "1.2.3"),
    (">=1.2.3 >=1.2.1", "1.2.3"),
    (">=1.2.1 >=1.2.3", "1.2.3"),
    (">=1.2", "1.2.8"),
    ("^1.2.3", "1.8.1"),
    ("^0.1.2", "0.1.2"),
    ("^0.1", "0.1.2"),
    ("^0.0.1", "0.0.1"),
    ("^1.2", "1.4.2"),
    ("^1.2 ^1", "1.4.2"),
    ("^1.2.3-alpha", "1.2.3-pre"),
    ("^1.2.0-alpha", "1.2.0-pre"),
    ("^0.0.1-alpha", "0.0.1-beta"),
    ("^0.0.1-alpha", "0.0.1"),
    ("^0.1.1-alpha", "0.1.1-beta"),
    ("^x", "1.2.3"),
    ("x - 1.0.0", "0.9.7"),
    ("x - 1.x", "0.9.7"),
    ("1.0.0 - x", "1.9.7"),
    ("1.x - x", "1.9.7"),
    ("<=7.x", "7.9.9"),
]

# range-include.js entries with { includePrerelease: true }.
INCLUDE_PRE = [
    ("2.x", "2.0.0-pre.0"),
    ("2.x", "2.1.0-pre.0"),
    ("*", "1.0.0-rc1"),
    ("^1.0.0-0", "1.0.1-rc1"),
    ("^1.0.0-rc2", "1.0.1-rc1"),
    ("^1.0.0", "1.0.1-rc1"),
    ("^1.0.0", "1.1.0-rc1"),
]

# range-exclude.js: [range, version] that must not match.
EXCLUDE = [
    ("1.0.0 - 2.0.0", "2.2.3"),
    ("1.2.3+asdf - 2.4.3+asdf", "1.2.3-pre.2"),
    ("1.2.3+asdf - 2.4.3+asdf", "2.4.3-alpha"),
    ("^1.2.3+build", "2.0.0"),
    ("^1.2.3+build", "1.2.0"),
    ("^1.2.3", "1.2.3-pre"),
    ("^1.2", "1.2.0-pre"),
    (">1.2", "1.3.0-beta"),
    ("<=1.2.3", "1.2.3-beta"),
    ("^1.2.3", "1.2.3-beta"),
    ("=0.7.x", "0.7.0-asdf"),
    (">=0.7.x", "0.7.0-asdf"),
    ("1.0.0", "1.0.1"),
    (">=1.0.0", "0.0.0"),
    (">=1.0.0", "0.0.1"),
    (">=1.0.0", "0.1.0"),
    (">1.0.0", "0.0.1"),
    (">1.0.0", "0.1.0"),
    ("<=2.0.0", "3.0.0"),
    ("<=2.0.0", "2.9999.9999"),
    ("<=2.0.0", "2.2.9"),
    ("<2.0.0", "2.9999.9999"),
    ("<2.0.0", "2.2.9"),
    (">=0.1.97", "0.1.93"),
    ("0.1.20 || 1.2.4", "1.2.3"),
    (">=0.2.3 || <0.0.1", "0.0.3"),
    (">=0.2.3 || <0.0.1", "0.2.2"),
    ("2.x.x", "1.1.3"),
    ("2.x.x", "3.1.3"),
    ("1.2.x", "1.3.3"),
    ("1.2.x || 2.x", "3.1.3"),
    ("1.2.x || 2.x", "1.1.3"),
    ("2.*.*", "1.1.3"),
    ("2.*.*", "3.1.3"),
    ("1.2.*", "1.3.3"),
    ("1.2.* || 2.*", "3.1.3"),
    ("1.2.* || 2.*", "1.1.3"),
    ("2", "1.1.2"),
    ("2.3", "2.4.1"),
    ("~0.0.1", "0.1.0-alpha"),
    ("~0.0.1", "0.1.0"),
    ("~2.4", "2.5.0"),
    ("~2.4", "2.3.9"),
    ("~>3.2.1", "3.3.2"),
    ("~>3.2.1", "3.2.0"),
    ("~1", "0.2.3"),
    ("~>1", "2.2.3"),
    ("~1.0", "1.1.0"),
    ("<1", "1.0.0"),
    (">=1.2", "1.1.1"),
    ("~v0.5.4-beta", "0.5.4-alpha"),
    ("=0.7.x", "0.8.2"),
    (">=0.7.x", "0.6.2"),
    ("<0.7.x", "0.7.2"),
    ("<1.2.3", "1.2.3-beta"),
    ("=1.2.3", "1.2.3-beta"),
    (">1.2", "1.2.8"),
    ("^0.0.1", "0.0.2-alpha"),
    ("^0.0.1", "0.0.2"),
    ("^1.2.3", "2.0.0-alpha"),
    ("^1.2.3", "1.2.2"),
    ("^1.2", "1.1.9"),
    ("^1.0.0", "2.0.0-rc1"),
]

# range-exclude.js entries with { includePrerelease: true }.
EXCLUDE_PRE = [
    ("2.x", "3.0.0-pre.0"),
    ("^1.0.0", "1.0.0-rc1"),
    ("^1.2.3-rc2", "2.0.0"),
    ("^1.0.0", "2.0.0-rc1"),
]

# comparisons.js: the first is greater than the second.
GREATER = [
    ("0.0.0", "0.0.0-foo"),
    ("0.0.1", "0.0.0"),
    ("1.0.0", "0.9.9"),
    ("0.10.0", "0.9.0"),
    ("0.99.0", "0.10.0"),
    ("2.0.0", "1.2.3"),
    ("1.2.3", "1.2.3-asdf"),
    ("1.2.3", "1.2.3-4"),
    ("1.2.3", "1.2.3-4-foo"),
    ("1.2.3-5-foo", "1.2.3-5"),
    ("1.2.3-5", "1.2.3-4"),
    ("1.2.3-5-foo", "1.2.3-5-Foo"),
    ("3.0.0", "2.7.2+asdf"),
    ("1.2.3-a.10", "1.2.3-a.5"),
    ("1.2.3-a.b", "1.2.3-a.5"),
    ("1.2.3-a.b", "1.2.3-a"),
    ("1.2.3-a.b.c.10.d.5", "1.2.3-a.b.c.5.d.100"),
    ("1.2.3-r2", "1.2.3-r100"),
    ("1.2.3-r100", "1.2.3-R2"),
]

# equality.js (strict entries; a leading ``v`` and whitespace are accepted in strict mode too).
EQUAL = [
    ("1.2.3", "v1.2.3"),
    ("1.2.3-0", "v1.2.3-0"),
    ("1.2.3-beta", " v1.2.3-beta "),
    ("1.2.3-beta+build", "1.2.3-beta+otherbuild"),
    ("1.2.3+build", "1.2.3+otherbuild"),
    ("  v1.2.3+build", "1.2.3+otherbuild"),
]

# range-parse.js: [range, canonical form, include_prerelease]; None means invalid.
PARSE: list[tuple[str, str | None, bool]] = [
    ("1.0.0 - 2.0.0", ">=1.0.0 <=2.0.0", False),
    ("1.0.0 - 2.0.0", ">=1.0.0-0 <2.0.1-0", True),
    ("1 - 2", ">=1.0.0 <3.0.0-0", False),
    ("1 - 2", ">=1.0.0-0 <3.0.0-0", True),
    ("1.0 - 2.0", ">=1.0.0 <2.1.0-0", False),
    ("1.0 - 2.0", ">=1.0.0-0 <2.1.0-0", True),
    ("1.0.0", "1.0.0", False),
    (">=*", "*", False),
    ("", "*", False),
    ("*", "*", False),
    (">=1.0.0", ">=1.0.0", False),
    (">1.0.0", ">1.0.0", False),
    ("<=2.0.0", "<=2.0.0", False),
    ("1", ">=1.0.0 <2.0.0-0", False),
    ("<2.0.0", "<2.0.0", False),
    (">= 1.0.0", ">=1.0.0", False),
    ("> 1.0.0", ">1.0.0", False),
    ("<    2.0.0", "<2.0.0", False),
    ("<\t2.0.0", "<2.0.0", False),
    ("0.1.20 || 1.2.4", "0.1.20||1.2.4", False),
    (">=0.2.3 || <0.0.1", ">=0.2.3||<0.0.1", False),
    ("||", "*", False),
    ("2.x.x", ">=2.0.0 <3.0.0-0", False),
    ("1.2.x", ">=1.2.0 <1.3.0-0", False),
    ("1.2.x || 2.x", ">=1.2.0 <1.3.0-0||>=2.0.0 <3.0.0-0", False),
    ("x", "*", False),
    ("2.*.*", ">=2.0.0 <3.0.0-0", False),
    ("1.2.* || 2.*", ">=1.2.0 <1.3.0-0||>=2.0.0 <3.0.0-0", False),
    ("2", ">=2.0.0 <3.0.0-0", False),
    ("2.3", ">=2.3.0 <2.4.0-0", False),
    ("~2.4", ">=2.4.0 <2.5.0-0", False),
    ("~>3.2.1", ">=3.2.1 <3.3.0-0", False),
    ("~1", ">=1.0.0 <2.0.0-0", False),
    ("~>1", ">=1.0.0 <2.0.0-0", False),
    ("~> 1", ">=1.0.0 <2.0.0-0", False),
    ("~1.0", ">=1.0.0 <1.1.0-0", False),
    ("~ 1.0", ">=1.0.0 <1.1.0-0", False),
    ("^0", "<1.0.0-0", False),
    ("^ 1", ">=1.0.0 <2.0.0-0", False),
    ("^0.1", ">=0.1.0 <0.2.0-0", False),
    ("^1.0", ">=1.0.0 <2.0.0-0", False),
    ("^1.2", ">=1.2.0 <2.0.0-0", False),
    ("^0.0.1", ">=0.0.1 <0.0.2-0", False),
    ("^0.0.1-beta", ">=0.0.1-beta <0.0.2-0", False),
    ("^0.1.2", ">=0.1.2 <0.2.0-0", False),
    ("^1.2.3", ">=1.2.3 <2.0.0-0", False),
    ("^1.2.3-beta.4", ">=1.2.3-beta.4 <2.0.0-0", False),
    ("<1", "<1.0.0-0", False),
    ("< 1", "<1.0.0-0", False),
    (">=1", ">=1.0.0", False),
    ("<1.2", "<1.2.0-0", False),
    (">01.02.03", None, False),
    ("~1.2.3beta", None, False),
    ("^ 1.2 ^ 1", ">=1.2.0 <2.0.0-0 >=1.0.0", False),
    ("1.2 - 3.4.5", ">=1.2.0 <=3.4.5", False),
    ("1.2.3 - 3.4", ">=1.2.3 <3.5.0-0", False),
    ("1.2 - 3.4", ">=1.2.0 <3.5.0-0", False),
    (">1", ">=2.0.0", False),
    (">1.2", ">=1.3.0", False),
    (">X", "<0.0.0-0", False),
    ("<X", "<0.0.0-0", False),
    ("<x <* || >* 2.x", "<0.0.0-0", False),
    (">x 2.x || * || <x", "*", False),
]

# invalid-versions.js plus strict-mode rejects from the other fixtures.
INVALID_VERSIONS = [
    ("1" * 256 + ".0.0", "longer than 256"),
    (f"{2**53 - 1}0.0.0", "too big"),
    (f"0.{2**53 - 1}0.0", "too big"),
    (f"0.0.{2**53 - 1}0", "too big"),
    ("hello, world", "expected MAJOR.MINOR.PATCH"),
    ("xyz", "expected MAJOR.MINOR.PATCH"),
    ("", "empty"),
    ("1.2", "expected MAJOR.MINOR.PATCH"),
    ("1.2.3.4", "expected MAJOR.MINOR.PATCH"),
    ("01.2.3", "leading zeros"),
    ("1.2.3-01", "bad prerelease"),
    ("1.2.3-", "bad prerelease"),
    ("1.2.3+", "bad prerelease or build"),
    ("1.2.3-a..b", "bad prerelease"),
    ("1.0.0beta", "expected MAJOR.MINOR.PATCH"),
    ("=1.2.3", "expected MAJOR.MINOR.PATCH"),
]


@pytest.mark.parametrize(("text", "version"), INCLUDE)
def test_range_includes(text: str, version: str) -> None:
    assert Range.parse(text).contains(Version.parse(version))


@pytest.mark.parametrize(("text", "version"), INCLUDE_PRE)
def test_range_includes_with_prereleases_opted_in(text: str, version: str) -> None:
    assert Range.parse(text, include_prerelease=True).contains(Version.parse(version))


@pytest.mark.parametrize(("text", "version"), EXCLUDE)
def test_range_excludes(text: str, version: str) -> None:
    assert not Range.parse(text).contains(Version.parse(version))


@pytest.mark.parametrize(("text", "version"), EXCLUDE_PRE)
def test_range_excludes_with_prereleases_opted_in(text: str, version: str) -> None:
    assert not Range.parse(text, include_prerelease=True).contains(Version.parse(version))


@pytest.mark.parametrize(("greater", "lesser"), GREATER)
def test_precedence(greater: str, lesser: str) -> None:
    a, b = Version.parse(greater), Version.parse(lesser)
    assert a > b
    assert b < a
    assert a >= b
    assert b <= a
    assert a != b
    assert not a < b


@pytest.mark.parametrize(("left", "right"), EQUAL)
def test_equality_ignores_build_metadata(left: str, right: str) -> None:
    a, b = Version.parse(left), Version.parse(right)
    assert a == b
    assert hash(a) == hash(b)
    assert not a < b
    assert not a > b


@pytest.mark.parametrize(("text", "canonical", "include_prerelease"), PARSE)
def test_range_canonical_form(text: str, canonical: str | None, include_prerelease: bool) -> None:
    if canonical is None:
        with pytest.raises(InvalidRange):
            Range.parse(text, include_prerelease=include_prerelease)
    else:
        assert Range.parse(text, include_prerelease=include_prerelease).normalized == canonical


@pytest.mark.parametrize(("text", "reason"), INVALID_VERSIONS)
def test_invalid_versions(text: str, reason: str) -> None:
    with pytest.raises(InvalidVersion, match=reason) as info:
        Version.parse(text)
    assert isinstance(info.value, ValueError)


def test_semver_spec_precedence_example() -> None:
    chain = "1.0.0-alpha 1.0.0-alpha.1 1.0.0-alpha.beta 1.0.0-beta 1.0.0-beta.2 "
    chain += "1.0.0-beta.11 1.0.0-rc.1 1.0.0"
    versions = [Version.parse(v) for v in chain.split()]
    assert sorted(reversed(versions)) == versions
    assert Version.parse("1.0.0") < Version.parse("2.0.0") < Version.parse("2.1.0")
    assert Version.parse("2.1.0") < Version.parse("2.1.1")


def test_version_round_trips_and_fields() -> None:
    v = Version.parse("v1.22.333-rc.1.x-y+build.007")
    assert (v.major, v.minor, v.patch) == (1, 22, 333)
    assert v.prerelease == ("rc", 1, "x-y")
    assert v.build == ("build", "007")
    assert v.is_prerelease
    assert str(v) == "1.22.333-rc.1.x-y+build.007"
    assert Version.parse(str(v)) == v
    assert Version(1, 2, 3) == Version.parse("1.2.3")
    assert not Version.parse("1.2.3").is_prerelease


def test_non_string_inputs_raise_value_errors() -> None:
    with pytest.raises(InvalidVersion, match="expected a string"):
        Version.parse(1.2)  # type: ignore[arg-type]
    with pytest.raises(InvalidRange, match="expected a string"):
        Range.parse(None)  # type: ignore[arg-type]
    with pytest.raises(InvalidVersion, match="negative"):
        Version(-1, 0, 0)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("^1.2.3.4", "'\\^1.2.3.4' is not a version, x-range or comparator"),
        ("1.2.3 - ", "'-' is not a version"),
        (">=1.0 <2 || bogus", "'bogus' is not a version"),
        ("a - 2.0.0", "left side of hyphen range, 'a', is not a version"),
        ("1.0.0 - 2.b", "right side of hyphen range"),
        (f"^{2**53}", "too big"),
        ("1" * 300, "longer than 256"),
    ],
)
def test_invalid_ranges_name_the_text_and_problem(text: str, reason: str) -> None:
    with pytest.raises(InvalidRange, match=reason) as info:
        Range.parse(text)
    assert info.value.text.startswith(text.strip()[:20])
    assert "invalid version range" in str(info.value)


def test_max_satisfying_prefers_highest_and_skips_prereleases() -> None:
    versions = [Version.parse(v) for v in ["1.2.3", "1.2.4", "1.3.0-rc.1", "2.0.0", "1.9.9"]]
    assert Range.parse("^1.2").max_satisfying(versions) == Version.parse("1.9.9")
    assert Range.parse("~1.2").max_satisfying(versions) == Version.parse("1.2.4")
    assert Range.parse("1.3.0-rc.0 - 1.3.0").max_satisfying(versions) == Version.parse("1.3.0-rc.1")
    assert Range.parse("^1.2", include_prerelease=True).max_satisfying(versions) == Version.parse(
        "1.9.9"
    )
    assert Range.parse(">=3").max_satisfying(versions) is None
    assert Range.parse("^1.2").filter(versions)[:2] == versions[:2]


def test_str_keeps_what_the_author_wrote() -> None:
    assert str(Range.parse("  ^2.1 ")) == "^2.1"
    assert str(Range.parse("")) == "*"
    assert Version.parse("1.0.0") in Range.parse(">=1")
