"""The resolver: highest versions win, backtracking finds the rest, conflicts read like prose."""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from unittest.mock import patch

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from osk_daemon.versioning import Range, Version, search
from osk_daemon.versioning.manifest import Manifest
from osk_daemon.versioning.matching import Ordered
from osk_daemon.versioning.provider import Provider
from osk_daemon.versioning.resolver import (
    ConflictType,
    Declares,
    Resolution,
    ResolutionFailed,
    resolve,
    start_order,
)

pytestmark = pytest.mark.timeout(20)


@dataclass(frozen=True)
class Req:
    name: str
    range: Range
    optional: bool = False
    service: bool = False


@dataclass(frozen=True)
class Rel:
    requires: Sequence[Req] = ()
    provides: Mapping[str, Version] = field(default_factory=dict)


def req(text: str) -> Req:
    """'store ^3.0', '?metrics ^1' (optional), '@auth.tokens ^1' (a service)."""
    name, _, rng = text.partition(" ")
    optional, name = name.startswith("?"), name.lstrip("?")
    service, name = name.startswith("@"), name.lstrip("@")
    return Req(name, Range.parse(rng), optional, service)


def cat(spec: Mapping[str, Mapping[str, Sequence[str]]]) -> dict[str, dict[Version, Declares]]:
    out: dict[str, dict[Version, Declares]] = {}
    for plugin, versions in spec.items():
        out[plugin] = {}
        for version, needs in versions.items():
            provides = {
                n[1:].split(" ")[0]: Version.parse(n.split(" ")[1]) for n in needs if n[0] == "+"
            }
            out[plugin][Version.parse(version)] = Rel(
                tuple(req(n) for n in needs if n[0] != "+"), provides
            )
    return out


def roots(**ranges: str) -> dict[str, Range]:
    return {name: Range.parse(r) for name, r in ranges.items()}


def chosen(resolution: Resolution) -> dict[str, str]:
    return {p: str(v) for p, v in resolution.versions.items()}


def test_picks_highest_versions_of_a_diamond_and_orders_waves() -> None:
    catalogue = cat(
        {
            "app": {"1.0.0": ["left ^1", "right ^1"], "1.1.0": ["left ^1", "right ^1"]},
            "left": {"1.0.0": ["base ^1.0"], "1.2.0": ["base ^1.2"]},
            "right": {"1.0.0": ["base ~1.1"], "1.5.0": ["base >=1.1.0 <1.3.0"]},
            "base": {"1.0.0": [], "1.1.0": [], "1.2.4": [], "1.3.0": [], "2.0.0": []},
        }
    )
    result = resolve(catalogue, roots(app="^1"))
    assert chosen(result) == {"app": "1.1.0", "base": "1.2.4", "left": "1.2.0", "right": "1.5.0"}
    assert result.requires["app"] == {"left", "right"}
    assert start_order(result) == [["base"], ["left", "right"], ["app"]]


def test_backtracks_to_an_older_version_that_fits() -> None:
    catalogue = cat(
        {
            "echo": {"2.3.0": ["store ^3.0"], "2.2.0": ["store ~2.5"]},
            "auth": {"1.4.0": ["store ~2.5"]},
            "store": {"2.5.0": [], "2.5.7": [], "3.0.0": []},
        }
    )
    result = resolve(catalogue, roots(echo="^2", auth="1.4.x"))
    assert chosen(result) == {"auth": "1.4.0", "echo": "2.2.0", "store": "2.5.7"}


def test_conflict_is_explained_like_a_person_would() -> None:
    catalogue = cat(
        {
            "echo": {"2.3.0": ["store ^3.0"]},
            "auth": {"1.4.0": ["store ~2.5"]},
            "store": {"2.5.0": [], "3.0.0": []},
        }
    )
    with pytest.raises(ResolutionFailed) as info:
        resolve(catalogue, roots(echo="^2", auth="^1"))
    conflict = info.value.conflict
    assert conflict.type is ConflictType.INCOMPATIBLE_VERSIONS
    text = conflict.description
    assert "echo 2.3.0 needs store ^3.0" in text
    assert "auth 1.4.0 needs store ~2.5" in text
    assert "no version of store satisfies both (installed: 3.0.0, 2.5.0)" in text
    assert {p.plugin for p in conflict.plugins} == {"echo", "auth"}
    assert str(info.value) == text


def test_version_mismatch_names_what_is_installed() -> None:
    catalogue = cat({"echo": {"1.0.0": ["store ^9"]}, "store": {"3.0.0": [], "3.1.0": []}})
    with pytest.raises(ResolutionFailed) as info:
        resolve(catalogue, roots(echo="*"))
    assert info.value.conflict.type is ConflictType.VERSION_MISMATCH
    assert info.value.conflict.description == (
        "echo 1.0.0 needs store ^9, but the installed versions of store are 3.1.0, 3.0.0"
        " (the config needs echo *)"
    )


def test_config_range_that_nothing_satisfies() -> None:
    catalogue = cat({"store": {"3.0.0": []}})
    with pytest.raises(ResolutionFailed, match=r"the config needs store \^4") as info:
        resolve(catalogue, roots(store="^4"))
    assert info.value.conflict.type is ConflictType.VERSION_MISMATCH


def test_missing_dependency() -> None:
    catalogue = cat({"echo": {"1.0.0": ["ghost ^1"]}})
    with pytest.raises(ResolutionFailed) as info:
        resolve(catalogue, roots(echo="*"))
    assert info.value.conflict.type is ConflictType.MISSING_DEPENDENCY
    assert "echo 1.0.0 needs ghost ^1, but no version of ghost is installed" in str(info.value)
    with pytest.raises(ResolutionFailed, match="the config needs nope"):
        resolve(catalogue, roots(nope="^1"))


def test_cycle_is_named() -> None:
    catalogue = cat(
        {
            "a": {"1.0.0": ["b ^1"]},
            "b": {"1.0.0": ["c ^1"]},
            "c": {"1.0.0": ["a ^1"]},
        }
    )
    with pytest.raises(ResolutionFailed) as info:
        resolve(catalogue, roots(a="^1"))
    conflict = info.value.conflict
    assert conflict.type is ConflictType.CIRCULAR_DEPENDENCY
    assert "a 1.0.0 -> b 1.0.0 -> c 1.0.0 -> a 1.0.0" in conflict.description
    assert [p.plugin for p in conflict.plugins] == ["a", "b", "c"]


def test_start_order_refuses_a_cycle() -> None:
    v = Version(1, 0, 0)
    looped = Resolution({"a": v, "b": v}, {"a": frozenset({"b"}), "b": frozenset({"a"})})
    with pytest.raises(ValueError, match="a -> b -> a"):
        start_order(looped)


def test_optional_does_not_pull_in_but_is_enforced_when_present() -> None:
    catalogue = cat(
        {
            "echo": {"1.0.0": ["?metrics ^2"]},
            "metrics": {"1.0.0": [], "2.0.0": [], "3.0.0": []},
            "dash": {"1.0.0": ["metrics >=1"]},
        }
    )
    assert chosen(resolve(catalogue, roots(echo="*"))) == {"echo": "1.0.0"}
    result = resolve(catalogue, roots(echo="*", dash="*"))
    assert chosen(result)["metrics"] == "2.0.0"
    assert result.optional["echo"] == {"metrics"}
    assert start_order(result) == [["metrics"], ["dash", "echo"]]


def test_optional_missing_plugin_is_fine() -> None:
    catalogue = cat({"echo": {"1.0.0": ["?ghost ^1"]}})
    assert chosen(resolve(catalogue, roots(echo="*"))) == {"echo": "1.0.0"}


def test_prereleases_only_when_a_range_opts_in() -> None:
    catalogue = cat(
        {
            "echo": {"1.0.0": ["store ^2.0.0"], "1.1.0": ["store ^2.1.0-rc.1"]},
            "store": {"2.0.0": [], "2.1.0-rc.2": [], "3.0.0-beta.1": []},
        }
    )
    assert chosen(resolve(catalogue, roots(echo="1.0.0")))["store"] == "2.0.0"
    assert chosen(resolve(catalogue, roots(echo="1.1.0")))["store"] == "2.1.0-rc.2"
    assert chosen(resolve(catalogue, roots(store="*")))["store"] == "2.0.0"
    everything = {"store": Range.parse("*", include_prerelease=True)}
    assert chosen(resolve(catalogue, everything))["store"] == "3.0.0-beta.1"


def test_service_requirements_pin_their_provider() -> None:
    catalogue = cat(
        {
            "echo": {"1.0.0": ["@auth.tokens ^2"]},
            "auth": {"1.0.0": ["+auth.tokens 1.5.0"], "2.0.0": ["+auth.tokens 2.1.0"]},
            "oauth": {"3.0.0": ["+auth.tokens 3.0.0"]},
        }
    )
    result = resolve(catalogue, roots(echo="*"))
    assert chosen(result) == {"auth": "2.0.0", "echo": "1.0.0"}
    assert result.requires["echo"] == {"auth"}
    broken = cat(
        {"echo": {"1.0.0": ["@auth.tokens ^9"]}, "auth": {"1.0.0": ["+auth.tokens 1.5.0"]}}
    )
    with pytest.raises(
        ResolutionFailed, match=r"echo 1.0.0 needs service auth.tokens \^9, but the installed"
    ) as info:
        resolve(broken, roots(echo="*"))
    assert info.value.conflict.type is ConflictType.VERSION_MISMATCH
    assert "installed versions of service auth.tokens are 1.5.0" in str(info.value)


def test_deep_backtracking_walks_down_a_long_chain() -> None:
    # Every version of p{i} but the oldest needs p{i+1} at its own newest version, and the
    # newest version of the last plugin needs something that is not installed; the only
    # consistent choice is the oldest version at the bottom of the chain.
    depth, width = 12, 6
    spec: dict[str, dict[str, list[str]]] = {}
    for i in range(depth):
        spec[f"p{i}"] = {}
        for j in range(width):
            needs = [f"p{i + 1} >={j}.0.0"] if i + 1 < depth else []
            if i + 1 == depth and j > 0:
                needs = ["nothing ^1"]
            spec[f"p{i}"][f"{j}.0.0"] = needs
    spec["nothing"] = {"0.1.0": []}
    result = resolve(cat(spec), roots(p0="*"))
    assert chosen(result)[f"p{depth - 1}"] == "0.0.0"
    assert chosen(result)["p0"] == "0.0.0"
    assert len(start_order(result)) == depth


def test_manifests_are_accepted_directly() -> None:
    def manifest(name: str, version: str, *requires: dict[str, object]) -> Manifest:
        return Manifest.model_validate(
            {"name": name, "version": version, "entry": f"{name}:P", "requires": list(requires)}
        )

    echo = manifest("echo", "2.3.0", {"name": "store", "range": "^3.0"})
    store = manifest("store", "3.1.0")
    catalogue: dict[str, dict[Version, Declares]] = {
        "echo": {echo.version: echo},
        "store": {store.version: store},
    }
    result = resolve(catalogue, roots(echo="^2"))
    assert start_order(result) == [["store"], ["echo"]]


def test_a_new_major_the_rest_cannot_follow_falls_back_to_the_previous_release() -> None:
    # app 2.0.0 moved to core ^3, but everything it uses still needs core ^2: the answer
    # is app 1.9.0, found without trying every mid x lib combination.
    spec: dict[str, dict[str, list[str]]] = {
        "app": {"2.0.0": ["core ^3", "mid ^1"], "1.9.0": ["core ^2", "mid ^1"]},
        "mid": {f"1.0.{i}": ["lib ^1"] for i in range(15)},
        "lib": {f"1.0.{i}": ["core ^2"] for i in range(15)},
        "core": {"2.0.0": [], "2.4.0": [], "3.0.0": []},
    }
    result = resolve(cat(spec), roots(app="*"), max_rounds=200)
    assert chosen(result) == {"app": "1.9.0", "core": "2.4.0", "lib": "1.0.14", "mid": "1.0.14"}
    assert start_order(result) == [["core"], ["lib"], ["mid"], ["app"]]


def test_a_clash_under_many_releases_is_proved_without_trying_every_combination() -> None:
    # 20 x 20 x 20 combinations, none of which works; each run of releases that asks for
    # the same is learned about once.
    spec: dict[str, dict[str, list[str]]] = {
        "app": {f"1.{i}.0": ["left ^1", "right ^1"] for i in range(20)},
        "left": {f"1.0.{i}": ["base ^2"] for i in range(20)},
        "right": {f"1.0.{i}": ["base ^1"] for i in range(20)},
        "base": {"1.0.0": [], "2.0.0": []},
    }
    with pytest.raises(ResolutionFailed) as info:
        resolve(cat(spec), roots(app="*"), max_rounds=2_000)
    conflict = info.value.conflict
    assert conflict.type is ConflictType.INCOMPATIBLE_VERSIONS
    assert "needs base ^2" in conflict.description
    assert "needs base ^1" in conflict.description
    assert "no version of base satisfies both (installed: 2.0.0, 1.0.0)" in conflict.description


def test_explanation_leaves_out_requirements_that_do_not_clash() -> None:
    catalogue = cat(
        {
            "echo": {"2.3.0": ["store ^3.0"]},
            "auth": {"1.4.0": ["store ~2.5"]},
            "dash": {"1.0.0": ["store *"]},
            "store": {"2.5.0": [], "3.0.0": []},
        }
    )
    with pytest.raises(ResolutionFailed) as info:
        resolve(catalogue, roots(dash="*", echo="^2", auth="^1"))
    conflict = info.value.conflict
    assert {p.plugin for p in conflict.plugins} == {"echo", "auth"}
    assert "dash" not in conflict.description
    assert "satisfies both" in conflict.description


def test_gives_up_with_advice_past_max_rounds() -> None:
    spec: dict[str, dict[str, list[str]]] = {
        "app": {f"1.{i}.0": ["left ^1", "right ^1"] for i in range(5)},
        "left": {f"1.0.{i}": ["base ^2"] for i in range(5)},
        "right": {f"1.0.{i}": ["base ^1"] for i in range(5)},
        "base": {"1.0.0": [], "2.0.0": []},
    }
    with pytest.raises(ResolutionFailed, match=r"gave up after .* pin some plugins") as info:
        resolve(cat(spec), roots(app="*"), max_rounds=3)
    assert info.value.conflict.type is ConflictType.INCOMPATIBLE_VERSIONS


def test_optional_requirement_narrows_a_plugin_something_else_brings_in() -> None:
    # The optional edge is enforced during the search: dash settles for metrics 2.x
    # rather than 3.x, and nothing is resolved twice.
    catalogue = cat(
        {
            "echo": {"1.0.0": ["?metrics ~2.1"]},
            "dash": {"2.0.0": ["metrics ^3"], "1.0.0": ["metrics >=2"]},
            "metrics": {"2.0.0": [], "2.1.5": [], "3.0.0": []},
        }
    )
    result = resolve(catalogue, roots(echo="*", dash="*"))
    assert chosen(result) == {"dash": "1.0.0", "echo": "1.0.0", "metrics": "2.1.5"}


def test_layering_puts_dependents_before_their_dependencies() -> None:
    catalogue = cat(
        {
            "app": {"1.0.0": ["left ^1"], "1.1.0": ["left ^1", "right ^1"]},
            "left": {"1.0.0": ["base ^1"]},
            "right": {"1.0.0": ["base ^1", "@auth.tokens ^1"]},
            "base": {"1.0.0": []},
            "auth": {"1.0.0": ["+auth.tokens 1.0.0"]},
            "unrelated": {"1.0.0": []},
        }
    )
    rank = Provider(catalogue, set()).layering(["app"])
    assert set(rank) == {"app", "left", "right", "base", "service:auth.tokens", "auth"}
    assert rank["app"] < rank["left"] < rank["base"]
    assert rank["right"] < rank["service:auth.tokens"] < rank["auth"]
    assert rank["right"] < rank["base"]


def test_a_clash_behind_a_chain_names_every_link() -> None:
    catalogue = cat(
        {
            "app": {"1.0.0": ["mid ^1", "core ^3"]},
            "mid": {f"1.{i}.0": ["lib ^1"] for i in range(4)},
            "lib": {f"1.0.{i}": ["core ^2"] for i in range(4)},
            "core": {"2.0.0": [], "3.0.0": []},
        }
    )
    with pytest.raises(ResolutionFailed) as info:
        resolve(catalogue, roots(app="*"))
    conflict = info.value.conflict
    assert conflict.type is ConflictType.INCOMPATIBLE_VERSIONS
    text = conflict.description
    assert "app 1.0.0 needs core ^3" in text
    assert "every version of lib needs core ^2" in text
    assert "every version of mid needs lib ^1" in text
    assert "the config needs app *" in text
    assert {p.plugin for p in conflict.plugins} == {"app", "lib"}


def test_a_run_of_releases_is_named_as_a_run() -> None:
    catalogue = cat(
        {
            "app": {"1.0.0": ["lib ^1", "core ^3"]},
            "lib": {
                **{f"1.0.{i}": ["core ^2"] for i in range(3, 9)},
                **{f"1.0.{i}": ["core ^1"] for i in range(3)},
            },
            "core": {"1.0.0": [], "2.0.0": [], "3.0.0": []},
        }
    )
    with pytest.raises(ResolutionFailed) as info:
        resolve(catalogue, roots(app="*"))
    text = info.value.conflict.description
    assert "lib 1.0.3 to 1.0.8 need core ^2" in text
    assert "lib 1.0.0 to 1.0.2 need core ^1" in text


# -- properties: the search agrees with brute force on small catalogues ----------------------

_RANGES = ("*", "^1", "^1.1", "~1.0.0", ">=1.1.0", "<1.2.0", "2.x", "^2.1", "1.0.0 - 1.1.0")
_VERSIONS = ("1.0.0", "1.1.0", "1.2.0", "2.0.0", "2.1.0")


@st.composite
def _catalogues(draw: st.DrawFn) -> tuple[dict[str, dict[Version, Declares]], dict[str, Range]]:
    names = [f"p{i}" for i in range(draw(st.integers(2, 5)))]
    spec: dict[str, dict[str, list[str]]] = {}
    for i, name in enumerate(names):
        versions = draw(st.lists(st.sampled_from(_VERSIONS), min_size=1, max_size=3, unique=True))
        spec[name] = {}
        for version in versions:
            needs = []
            for dep in names[i + 1 :]:  # only on later plugins: no cycles
                if draw(st.integers(0, 2)) == 0:
                    optional = "?" if draw(st.booleans()) and draw(st.booleans()) else ""
                    needs.append(f"{optional}{dep} {draw(st.sampled_from(_RANGES))}")
            spec[name][version] = needs
    wanted = draw(st.lists(st.sampled_from(names), min_size=1, max_size=2, unique=True))
    return cat(spec), {n: Range.parse(draw(st.sampled_from(_RANGES))) for n in wanted}


def _valid(
    catalogue: Mapping[str, Mapping[Version, Declares]],
    wanted: Mapping[str, Range],
    picked: Mapping[str, Version],
) -> bool:
    if any(n not in picked or not r.contains(picked[n]) for n, r in wanted.items()):
        return False
    for plugin, version in picked.items():
        for need in catalogue[plugin][version].requires:
            if need.name in picked:
                if not need.range.contains(picked[need.name]):
                    return False
            elif not need.optional:
                return False
    return True


def _brute_force(
    catalogue: Mapping[str, Mapping[Version, Declares]], wanted: Mapping[str, Range]
) -> bool:
    names = sorted(catalogue)
    choices = [[None, *catalogue[n]] for n in names]
    return any(
        _valid(catalogue, wanted, {n: v for n, v in zip(names, combo, strict=True) if v})
        for combo in itertools.product(*choices)
    )


@settings(max_examples=300, deadline=None)
@given(_catalogues())
def test_finds_a_solution_exactly_when_one_exists(
    case: tuple[dict[str, dict[Version, Declares]], dict[str, Range]],
) -> None:
    catalogue, wanted = case
    try:
        result = resolve(catalogue, wanted)
    except ResolutionFailed as exc:
        assert not _brute_force(catalogue, wanted), exc.conflict.description
        assert exc.conflict.type is not ConflictType.CIRCULAR_DEPENDENCY
        assert "gave up" not in exc.conflict.description
    else:
        assert _valid(catalogue, wanted, result.versions)


_SOME_RANGES = (
    "*",
    "^1.2",
    "^0.2.3",
    "~1.2.3",
    ">=1.2.0 <2.0.0",
    "1.x",
    "1.2.3 - 2.1",
    "<=1.2.3",
    ">1.2.3",
    "=1.2.3",
    "1.2.3-rc.1",
    "^1.2.3-beta.2",
    "<1.0.0 || >=2.0.0",
    ">=1.2.3-rc.1 <1.3",
)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.builds(
            Version,
            st.integers(0, 2),
            st.integers(0, 3),
            st.integers(0, 4),
            st.sampled_from(((), ("rc", 1), ("beta", 2), (0,))),
        ),
        min_size=1,
        max_size=12,
        unique=True,
    ),
    st.sampled_from(_SOME_RANGES),
    st.booleans(),
)
def test_bisected_matching_agrees_with_range_contains(
    versions: list[Version], text: str, prerelease: bool
) -> None:
    ordered = sorted(versions, reverse=True)
    rng = Range.parse(text, include_prerelease=prerelease)
    expected = sum(2 << i for i, v in enumerate(ordered) if rng.contains(v))
    assert Ordered(ordered).mask(rng) == expected


@settings(max_examples=150, deadline=None)
@given(_catalogues())
def test_short_jumps_agree_with_brute_force_too(
    case: tuple[dict[str, dict[Version, Declares]], dict[str, Range]],
) -> None:
    # Small catalogues never jump far; with no allowance every backjump is one level.
    with patch.object(search, "_CHRONOLOGICAL", 0):
        test_finds_a_solution_exactly_when_one_exists.hypothesis.inner_test(case)  # type: ignore[attr-defined]
