"""Graceful degradation: the graph's checks, every verdict move, scenarios and a property."""

from __future__ import annotations

import itertools
from typing import Literal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from osk_daemon.errors import OskInternalError
from osk_daemon.supervisor.dependencies import (
    STOPPED,
    TRANSITIONS,
    ClearDegraded,
    DependencyGraph,
    DependencyStatusChanged,
    DependencyTracker,
    Edge,
    Effect,
    MarkDegraded,
    Notify,
    Status,
    Verdict,
)
from osk_daemon.worker.sdk import HealthStatus as H

pytestmark = pytest.mark.timeout(10)

ALL_STATUSES: tuple[Status, ...] = (*H, STOPPED)
# Written out here, not imported: the contract the tests hold the module to.
DOWN = {H.UNHEALTHY, H.FAILED, STOPPED}
UP = {H.HEALTHY, H.DEGRADED, H.RECOVERING}
NO_VERDICT = {H.UNKNOWN}


def ev(plugin: str, status: Status) -> DependencyStatusChanged:
    return DependencyStatusChanged(plugin, status)


def feed(t: DependencyTracker, *events: tuple[str, Status]) -> list[Effect]:
    out: list[Effect] = []
    for plugin, status in events:
        out.extend(t.step(ev(plugin, status)))
    return out


def down(plugin: str, dep: str, optional: bool = False) -> Notify:
    return Notify(plugin, "dependency_down", dep, optional)


def up(plugin: str, dep: str, optional: bool = False) -> Notify:
    return Notify(plugin, "dependency_up", dep, optional)


# ---- the graph ------------------------------------------------------------------------------


def test_graph_indexes_edges_both_ways() -> None:
    g = DependencyGraph(
        ["a", "b", "c"], [("a", "b", False), ("a", "c", True), ("b", "c", False)], ["a"]
    )
    assert g.requirements("a") == (Edge("a", "b", False), Edge("a", "c", True))
    assert g.dependents("c") == (Edge("a", "c", True), Edge("b", "c", False))
    assert g.dependents("a") == ()
    assert g.offline_capable == frozenset({"a"})
    assert g.edges == (Edge("a", "b"), Edge("a", "c", True), Edge("b", "c"))


@pytest.mark.parametrize(
    ("plugins", "edges", "offline", "message"),
    [
        (["a"], [("a", "zz", False)], [], "dependency a -> zz names an unknown plugin 'zz'"),
        (["a"], [("zz", "a", False)], [], "dependency zz -> a names an unknown plugin 'zz'"),
        (["a"], [], ["zz"], "offline_capable names unknown plugins: zz"),
        (["a"], [("a", "a", False)], [], "plugin 'a' depends on itself"),
        (["a", "b"], [("a", "b", False), ("a", "b", True)], [], "a -> b is declared twice"),
        (["a", "b"], [("a", "b", False), ("b", "a", True)], [], "dependency cycle: a -> b -> a"),
        (
            ["a", "b", "c", "d"],
            [("d", "a", False), ("a", "b", False), ("b", "c", False), ("c", "a", False)],
            [],
            "dependency cycle: a -> b -> c -> a",
        ),
    ],
)
def test_graph_rejects(
    plugins: list[str], edges: list[tuple[str, str, bool]], offline: list[str], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        DependencyGraph(plugins, edges, offline)


def test_a_long_chain_is_checked_without_recursion() -> None:
    names = [f"p{i:05d}" for i in range(5000)]
    edges = [(names[i], names[i + 1], False) for i in range(len(names) - 1)]
    DependencyGraph(names, edges)
    with pytest.raises(ValueError, match="dependency cycle"):
        DependencyGraph(names, [*edges, (names[-1], names[0], False)])


# ---- every transition -----------------------------------------------------------------------


def test_transitions_table_covers_every_held_and_incoming_verdict() -> None:
    held = (Verdict.UP, Verdict.DOWN)
    assert set(TRANSITIONS) == set(itertools.product(held, Verdict))
    assert {k for k, v in TRANSITIONS.items() if v != "hold"} == {
        (Verdict.UP, Verdict.DOWN),
        (Verdict.DOWN, Verdict.UP),
    }


# store is needed by: audit (optional), echo (required), edge (required, offline_capable).
def star() -> DependencyTracker:
    return DependencyTracker(
        DependencyGraph(
            ["store", "audit", "echo", "edge"],
            [("audit", "store", True), ("echo", "store", False), ("edge", "store", False)],
            offline_capable=["edge"],
        )
    )


WENT_DOWN: list[Effect] = [
    down("audit", "store", optional=True),
    MarkDegraded("echo", ("store",)),
    down("echo", "store"),
    down("edge", "store"),
]
CAME_UP: list[Effect] = [
    up("audit", "store", optional=True),
    ClearDegraded("echo"),
    up("echo", "store"),
    up("edge", "store"),
]


def verdict_after(first: Status) -> str:
    return "down" if first in DOWN else "up"


@pytest.mark.parametrize(("first", "second"), list(itertools.product(ALL_STATUSES, ALL_STATUSES)))
def test_every_status_move(first: Status, second: Status) -> None:
    t = star()
    feed(t, ("store", first))
    held = verdict_after(first)
    effects = t.step(ev("store", second))
    if held == "up" and second in DOWN:
        assert effects == WENT_DOWN
    elif held == "down" and second in UP:
        assert effects == CAME_UP
    else:
        assert effects == []
    now_down = second in DOWN or (second in NO_VERDICT and held == "down")
    assert t.is_available("store") is not now_down
    assert t.is_degraded("echo") is now_down
    assert t.is_degraded("edge") is False
    assert t.is_degraded("audit") is False
    assert t.status("store") == second


@pytest.mark.parametrize("status", [s for s in ALL_STATUSES if s not in DOWN])
def test_from_the_initial_unknown_nothing_but_down_moves(status: Status) -> None:
    assert star().step(ev("store", status)) == []


@pytest.mark.parametrize("status", sorted(DOWN))
def test_from_the_initial_unknown_down_is_a_crossing(status: Status) -> None:
    assert star().step(ev("store", status)) == WENT_DOWN


@pytest.mark.parametrize("status", ALL_STATUSES)
def test_repeating_a_status_emits_nothing(status: Status) -> None:
    t = star()
    feed(t, ("store", status))
    assert t.step(ev("store", status)) == []
    assert t.step(ev("store", status)) == []


def test_plain_strings_are_accepted_as_statuses() -> None:
    t = star()
    assert t.step(DependencyStatusChanged("store", "failed")) == WENT_DOWN  # type: ignore[arg-type]
    assert t.status("store") is H.FAILED


def test_unknown_plugin_and_status_are_bugs() -> None:
    t = star()
    with pytest.raises(OskInternalError, match="unknown plugin 'nope'"):
        t.step(ev("nope", H.FAILED))
    with pytest.raises(OskInternalError, match="status 'dead' of plugin 'store'"):
        t.step(DependencyStatusChanged("store", "dead"))  # type: ignore[arg-type]


# ---- scenarios ------------------------------------------------------------------------------


def test_chain_degradation_is_not_transitive() -> None:
    t = DependencyTracker(
        DependencyGraph(
            ["app", "echo", "store"], [("app", "echo", False), ("echo", "store", False)]
        )
    )
    assert feed(t, ("store", H.FAILED)) == [MarkDegraded("echo", ("store",)), down("echo", "store")]
    # echo's own health report of "degraded" is still UP for app.
    assert feed(t, ("echo", H.DEGRADED)) == []
    assert t.degraded == {"echo"}
    assert t.is_available("echo") and not t.is_available("store")
    assert t.explain("echo") == "echo is degraded: its required dependency store is failed"
    feed(t, ("app", H.HEALTHY))
    assert t.explain("app") == "app is healthy"
    assert not t.is_degraded("app")
    # Only echo itself going down reaches app.
    assert feed(t, ("echo", STOPPED)) == [MarkDegraded("app", ("echo",)), down("app", "echo")]
    assert (
        t.explain("echo") == "echo is stopped and degraded: its required dependency store is failed"
    )
    assert feed(t, ("store", H.HEALTHY)) == [ClearDegraded("echo"), up("echo", "store")]
    assert feed(t, ("echo", H.HEALTHY)) == [ClearDegraded("app"), up("app", "echo")]
    assert t.degraded == frozenset()


def test_diamond_degraded_until_every_required_dependency_is_back() -> None:
    #      top
    #     /   \
    #  left   right     (top needs both)
    #     \   /
    #      base
    t = DependencyTracker(
        DependencyGraph(
            ["top", "left", "right", "base"],
            [
                ("top", "left", False),
                ("top", "right", False),
                ("left", "base", False),
                ("right", "base", False),
            ],
        )
    )
    assert feed(t, ("base", H.UNHEALTHY)) == [
        MarkDegraded("left", ("base",)),
        down("left", "base"),
        MarkDegraded("right", ("base",)),
        down("right", "base"),
    ]
    assert not t.is_degraded("top")
    assert feed(t, ("left", H.FAILED)) == [MarkDegraded("top", ("left",)), down("top", "left")]
    assert feed(t, ("right", H.FAILED)) == [
        MarkDegraded("top", ("left", "right")),
        down("top", "right"),
    ]
    assert t.explain("top") == (
        "top is degraded: its required dependencies are down: left is failed, right is failed"
    )
    assert feed(t, ("left", H.RECOVERING)) == [MarkDegraded("top", ("right",)), up("top", "left")]
    assert t.is_degraded("top")
    assert feed(t, ("right", H.HEALTHY)) == [ClearDegraded("top"), up("top", "right")]
    assert feed(t, ("base", H.HEALTHY)) == [
        ClearDegraded("left"),
        up("left", "base"),
        ClearDegraded("right"),
        up("right", "base"),
    ]
    assert t.degraded == frozenset()


def test_optional_dependency_only_sends_events() -> None:
    t = DependencyTracker(DependencyGraph(["echo", "cache"], [("echo", "cache", True)]))
    assert feed(t, ("cache", STOPPED)) == [down("echo", "cache", optional=True)]
    assert not t.is_degraded("echo")
    feed(t, ("echo", H.HEALTHY))
    assert t.explain("echo") == "echo is healthy; its optional dependency cache is stopped"
    assert feed(t, ("cache", H.HEALTHY)) == [up("echo", "cache", optional=True)]
    assert t.explain("echo") == "echo is healthy"


def test_required_and_optional_together() -> None:
    t = DependencyTracker(
        DependencyGraph(
            ["echo", "store", "cache"], [("echo", "store", False), ("echo", "cache", True)]
        )
    )
    feed(t, ("echo", H.HEALTHY), ("cache", H.FAILED))
    assert feed(t, ("store", H.FAILED)) == [MarkDegraded("echo", ("store",)), down("echo", "store")]
    assert t.explain("echo") == (
        "echo is degraded: its required dependency store is failed; "
        "its optional dependency cache is failed"
    )
    assert feed(t, ("cache", H.HEALTHY)) == [up("echo", "cache", optional=True)]
    assert t.is_degraded("echo")


def test_offline_capable_is_told_but_never_degraded() -> None:
    t = DependencyTracker(
        DependencyGraph(["edge", "store"], [("edge", "store", False)], offline_capable=["edge"])
    )
    feed(t, ("edge", H.HEALTHY))
    assert feed(t, ("store", H.FAILED)) == [down("edge", "store")]
    assert not t.is_degraded("edge") and t.is_available("edge")
    assert t.down_requirements("edge") == ("store",)
    assert t.explain("edge") == (
        "edge is healthy and serves offline: its required dependency store is failed"
    )
    assert feed(t, ("store", H.HEALTHY)) == [up("edge", "store")]


def test_flapping_emits_once_per_crossing() -> None:
    t = DependencyTracker(DependencyGraph(["echo", "store"], [("echo", "store", False)]))
    seen: list[Effect] = []
    for _ in range(3):
        seen += feed(
            t,
            ("store", H.UNHEALTHY),
            ("store", H.FAILED),  # still down
            ("store", H.UNKNOWN),  # restarted, no verdict yet: still down
            ("store", H.RECOVERING),
            ("store", H.DEGRADED),  # still up
            ("store", H.HEALTHY),
        )
    once: list[Effect] = [
        MarkDegraded("echo", ("store",)),
        down("echo", "store"),
        ClearDegraded("echo"),
        up("echo", "store"),
    ]
    assert seen == once * 3


def test_recovery_after_restart_waits_for_a_verdict() -> None:
    t = DependencyTracker(DependencyGraph(["echo", "store"], [("echo", "store", False)]))
    feed(t, ("store", H.FAILED))
    assert feed(t, ("store", H.UNKNOWN)) == []
    assert t.is_degraded("echo") and not t.is_available("store")
    assert t.explain("echo") == (
        "echo is degraded: its required dependency store is unknown (last seen failed)"
    )
    assert feed(t, ("store", H.HEALTHY)) == [ClearDegraded("echo"), up("echo", "store")]
    assert t.is_available("store")


def test_queries_before_any_report() -> None:
    t = star()
    assert t.is_available("echo") and t.status("echo") is H.UNKNOWN
    assert t.explain("echo") == "echo has no health verdict yet"
    assert t.explain("nope") == "nope is not a known plugin"
    assert not t.is_available("nope")


# ---- the invariant --------------------------------------------------------------------------


@st.composite
def graphs(draw: st.DrawFn) -> DependencyGraph:
    n = draw(st.integers(1, 7))
    names = [f"p{i}" for i in range(n)]
    pairs = [(names[i], names[j]) for i in range(n) for j in range(i + 1, n)]  # i needs j
    chosen = draw(st.lists(st.sampled_from(pairs), unique=True)) if pairs else []
    edges = [(a, b, draw(st.booleans())) for a, b in chosen]
    offline = draw(st.lists(st.sampled_from(names), unique=True))
    order = draw(st.permutations(names))  # the graph must not care about input order
    return DependencyGraph(order, edges, offline)


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_degraded_iff_a_required_dependency_is_down(data: st.DataObject) -> None:
    g = data.draw(graphs())
    names = sorted(g.plugins)
    events = data.draw(
        st.lists(st.tuples(st.sampled_from(names), st.sampled_from(ALL_STATUSES)), max_size=40)
    )
    t = DependencyTracker(g)
    is_down = dict.fromkeys(names, False)  # the model: last status with a verdict
    shown: set[str] = set()  # what a driver applying the effects would show
    for plugin, status in events:
        was_down = is_down[plugin]
        if status not in NO_VERDICT:
            is_down[plugin] = status in DOWN
        effects = t.step(ev(plugin, status))
        for e in effects:
            if isinstance(e, MarkDegraded):
                assert e.because == t.down_requirements(e.plugin)
                shown.add(e.plugin)
            elif isinstance(e, ClearDegraded):
                assert e.plugin in shown
                shown.discard(e.plugin)
        notified = [e for e in effects if isinstance(e, Notify)]
        if was_down == is_down[plugin]:
            assert effects == []
        else:
            kind: Literal["dependency_down", "dependency_up"] = (
                "dependency_down" if is_down[plugin] else "dependency_up"
            )
            assert notified == [
                Notify(e.dependent, kind, plugin, e.optional) for e in g.dependents(plugin)
            ]
        assert t.step(ev(plugin, status)) == []  # idempotent
        for p in names:
            expected = p not in g.offline_capable and any(
                is_down[e.dependency] for e in g.requirements(p) if not e.optional
            )
            assert t.is_degraded(p) is expected, (p, t.explain(p))
            assert t.is_available(p) is not is_down[p]
        assert shown == t.degraded
