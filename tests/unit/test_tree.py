"""The supervision tree's decisions: transitions, strategies, intensity, backoff, operator."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from osk_daemon.supervisor.backoff import BackoffPolicy
from osk_daemon.supervisor.tree import (
    ArmRestartTimer,
    Effect,
    GroupGaveUp,
    GroupSpec,
    LeafSpec,
    LeafState,
    RestartType,
    StartChild,
    StopChild,
    Strategy,
    Tree,
    TreeCommandError,
    TreeEventError,
)

pytestmark = pytest.mark.timeout(10)

S = LeafState
P, TR, TMP = RestartType.PERMANENT, RestartType.TRANSIENT, RestartType.TEMPORARY
ONE, ALL, REST = Strategy.ONE_FOR_ONE, Strategy.ONE_FOR_ALL, Strategy.REST_FOR_ONE
EXACT = BackoffPolicy(base=1.0, factor=2.0, max=8.0, jitter=0.0, reset_after=100.0)


def G(gid: str, strategy: Strategy, *children: str, intensity: int = 10) -> GroupSpec:
    return GroupSpec(gid, strategy, intensity, 10.0, children)


def build(*groups: GroupSpec, types: dict[str, RestartType] | None = None) -> Tree:
    gids = {g.id for g in groups}
    names = [c for g in groups for c in g.children if c not in gids]
    types = types or {}
    leaves = {n: LeafSpec(n, types.get(n, P), EXACT) for n in names}
    return Tree({g.id: g for g in groups}, leaves)


def boot(tree: Tree, now: float = 0.0) -> Tree:
    for e in tree.start(now):
        assert isinstance(e, StartChild)
        tree.child_started(e.leaf, now)
    return tree


def stops(effects: list[Effect]) -> list[str]:
    return [e.leaf for e in effects if isinstance(e, StopChild)]


def starts(effects: list[Effect]) -> list[str]:
    return [e.leaf for e in effects if isinstance(e, StartChild)]


def states(tree: Tree, *names: str) -> list[LeafState]:
    return [tree.leaf_state(n) for n in names]


# ---- validation -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("groups", "leaves", "message"),
    [
        ({"root": G("root", ONE, "x")}, {}, "unknown child 'x'"),
        ({"top": G("top", ONE)}, {}, "root group 'root'"),
        (
            {"root": G("root", ONE, "a", "g"), "g": G("g", ONE, "a")},
            {"a": LeafSpec("a", P)},
            "two parents",
        ),
        ({"root": G("root", ONE, "a", "a")}, {"a": LeafSpec("a", P)}, "two parents"),
        (
            {"root": G("root", ONE), "g": G("g", ONE, "h"), "h": G("h", ONE, "g")},
            {},
            "cycle",
        ),
        ({"root": G("root", ONE, "root")}, {}, "cycle"),
        ({"root": G("root", ONE), "g": G("g", ONE)}, {}, "'g' is not reachable"),
        ({"root": G("root", ONE)}, {"a": LeafSpec("a", P)}, "leaf 'a' is not a child"),
        ({"root": G("root", ONE, "b")}, {"b": LeafSpec("c", P)}, "has id 'c'"),
        ({"root": G("root", ONE, "a"), "a": G("a", ONE)}, {"a": LeafSpec("a", P)}, "both"),
        ({"root": GroupSpec("root", ONE, -1, 5.0, ())}, {}, "intensity"),
        ({"root": GroupSpec("root", ONE, 1, 0.0, ())}, {}, "period"),
    ],
)
def test_bad_shapes_are_refused(
    groups: dict[str, GroupSpec], leaves: dict[str, LeafSpec], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        Tree(groups, leaves)


def test_start_is_depth_first_in_start_order() -> None:
    tree = build(G("root", ONE, "a", "g", "d"), G("g", ONE, "b", "h"), G("h", ONE, "c"))
    assert tree.start(0.0) == [StartChild(n) for n in "abcd"]
    assert set(states(tree, *"abcd")) == {S.STARTING}


# ---- one leaf, one event: the transitions table -----------------------------------------------


def _to(state: LeafState) -> Callable[[Tree], None]:
    """Bring leaf "a" of a one-leaf tree into ``state`` (RESTARTING = waiting on timer 1)."""

    def starting(t: Tree) -> None:
        t.start(0.0)

    def running(t: Tree) -> None:
        starting(t)
        t.child_started("a", 0.0)

    def stopping(t: Tree) -> None:
        running(t)
        t.stop(["a"], 1.0)

    def restarting(t: Tree) -> None:
        running(t)
        t.child_exited("a", True, 1.0, 0.5)  # first restart: immediate
        t.child_exited("a", True, 1.0, 0.5)  # failed start: backoff timer 1

    def stopped(t: Tree) -> None:
        pass

    steps = {
        S.STOPPED: stopped,
        S.STARTING: starting,
        S.RUNNING: running,
        S.STOPPING: stopping,
        S.RESTARTING: restarting,
    }
    return steps[state]


@pytest.mark.parametrize(
    ("kind", "before", "event", "after", "effects"),
    [
        (P, S.STARTING, "started", S.RUNNING, []),
        (P, S.STARTING, "crashed", S.STARTING, [StartChild("a")]),
        (P, S.RUNNING, "crashed", S.STARTING, [StartChild("a")]),
        (P, S.RUNNING, "exited0", S.STARTING, [StartChild("a")]),
        (TR, S.RUNNING, "crashed", S.STARTING, [StartChild("a")]),
        (TR, S.RUNNING, "exited0", S.STOPPED, []),
        (TMP, S.RUNNING, "crashed", S.STOPPED, []),
        (TMP, S.RUNNING, "exited0", S.STOPPED, []),
        (P, S.STOPPING, "stopped", S.STOPPED, []),
        (P, S.STOPPING, "crashed", S.STOPPED, []),
        (P, S.STOPPING, "started", S.STOPPING, []),
        (P, S.RESTARTING, "timer", S.STARTING, [StartChild("a")]),
        (P, S.RESTARTING, "stale_timer", S.RESTARTING, []),
    ],
)
def test_transition(
    kind: RestartType, before: LeafState, event: str, after: LeafState, effects: list[Effect]
) -> None:
    tree = build(G("root", ONE, "a"), types={"a": kind})
    _to(before)(tree)
    assert tree.leaf_state("a") is before
    actions: dict[str, Callable[[], list[Effect]]] = {
        "started": lambda: tree.child_started("a", 2.0),
        "crashed": lambda: tree.child_exited("a", True, 2.0, 0.5),
        "exited0": lambda: tree.child_exited("a", False, 2.0, 0.5),
        "stopped": lambda: tree.child_stopped("a", 2.0),
        "timer": lambda: tree.timer_fired(1, 2.0),
        "stale_timer": lambda: tree.timer_fired(99, 2.0),
    }
    assert actions[event]() == effects
    assert tree.leaf_state("a") is after


@pytest.mark.parametrize(
    ("before", "event"),
    [
        (S.RUNNING, "child_started"),
        (S.RUNNING, "child_stopped"),
        (S.STARTING, "child_stopped"),
        (S.STOPPED, "child_started"),
        (S.STOPPED, "child_exited"),
        (S.STOPPED, "child_stopped"),
        (S.RESTARTING, "child_exited"),
        (S.RESTARTING, "child_stopped"),
    ],
)
def test_illegal_driver_events_name_the_leaf_and_state(before: LeafState, event: str) -> None:
    tree = build(G("root", ONE, "a"))
    _to(before)(tree)
    calls: dict[str, Callable[[], object]] = {
        "child_started": lambda: tree.child_started("a", 2.0),
        "child_exited": lambda: tree.child_exited("a", True, 2.0, 0.5),
        "child_stopped": lambda: tree.child_stopped("a", 2.0),
    }
    with pytest.raises(TreeEventError, match=f"{event}\\('a'\\): leaf in state {before.value}"):
        calls[event]()
    assert tree.leaf_state("a") is before


def test_unknown_names_are_refused() -> None:
    tree = boot(build(G("root", ONE, "a")))
    with pytest.raises(TreeEventError, match=r"'zz'.*unknown leaf"):
        tree.child_exited("zz", True, 1.0, 0.5)
    with pytest.raises(TreeCommandError, match="'zz'"):
        tree.stop(["zz"], 1.0)
    with pytest.raises(TreeCommandError, match="'zz'"):
        tree.leaf_state("zz")
    with pytest.raises(TreeCommandError, match="'zz'"):
        tree.group_gave_up("zz")
    with pytest.raises(ValueError, match="rand"):
        tree.child_exited("a", True, 1.0, 1.0)
    assert tree.leaf_state("a") is S.RUNNING


# ---- strategies x restart types ---------------------------------------------------------------


@pytest.mark.parametrize("kind", [P, TR, TMP])
@pytest.mark.parametrize(
    ("strategy", "stopped", "restarted"),
    [(ONE, [], ["b"]), (ALL, ["c", "a"], ["a", "b", "c"]), (REST, ["c"], ["b", "c"])],
)
def test_strategy_and_restart_type(
    strategy: Strategy, kind: RestartType, stopped: list[str], restarted: list[str]
) -> None:
    tree = boot(build(G("root", strategy, "a", "b", "c"), types=dict.fromkeys("abc", kind)))
    out = tree.child_exited("b", True, 1.0, 0.5)
    if kind is TMP:
        assert out == []
        assert states(tree, *"abc") == [S.RUNNING, S.STOPPED, S.RUNNING]
        return
    assert stops(out) == stopped
    for name in stopped[:-1]:
        assert tree.child_stopped(name, 1.1) == []
    last = tree.child_stopped(stopped[-1], 1.2) if stopped else out
    survivors = [n for n in "abc" if n not in restarted] if kind is not TMP else []
    assert starts(last) == restarted
    assert all(tree.leaf_state(n) is S.STARTING for n in restarted)
    assert all(tree.leaf_state(n) is S.RUNNING for n in survivors)
    assert [tree.restarts(n) for n in restarted] == [1] * len(restarted)


@pytest.mark.parametrize(("kind", "restarted"), [(P, True), (TR, False), (TMP, False)])
def test_normal_exit(kind: RestartType, restarted: bool) -> None:
    tree = boot(build(G("root", ALL, "a", "b"), types={"b": kind}))
    out = tree.child_exited("b", False, 1.0, 0.5)
    assert stops(out) == (["a"] if restarted else [])
    assert tree.leaf_state("a") is (S.STOPPING if restarted else S.RUNNING)


def test_temporary_siblings_are_stopped_but_not_restarted() -> None:
    tree = boot(build(G("root", ALL, "a", "t", "b"), types={"t": TMP}))
    assert stops(tree.child_exited("a", True, 1.0, 0.5)) == ["b", "t"]
    tree.child_stopped("b", 1.0)
    assert starts(tree.child_stopped("t", 1.0)) == ["a", "b"]
    assert tree.leaf_state("t") is S.STOPPED


def test_transient_that_ended_normally_is_restarted_with_its_siblings_as_in_otp() -> None:
    tree = boot(build(G("root", ALL, "a", "tr"), types={"tr": TR}))
    tree.child_exited("tr", False, 1.0, 0.5)
    assert tree.leaf_state("tr") is S.STOPPED
    assert stops(tree.child_exited("a", True, 2.0, 0.5)) == []
    assert states(tree, "a", "tr") == [S.STARTING, S.STARTING]


def test_rest_for_one_stops_later_children_in_reverse_then_starts_in_order() -> None:
    tree = boot(build(G("root", REST, *"abcd")))
    out = tree.child_exited("b", True, 1.0, 0.5)
    assert out == [StopChild("d", "restart"), StopChild("c", "restart")]
    assert tree.leaf_state("a") is S.RUNNING
    assert tree.child_stopped("d", 1.1) == []
    assert tree.child_stopped("c", 1.2) == [StartChild(n) for n in "bcd"]


def test_one_for_all_stops_whole_subtrees_in_reverse_start_order() -> None:
    tree = boot(build(G("root", ALL, "a", "g", "b"), G("g", ONE, "h1", "h2")))
    assert stops(tree.child_exited("b", True, 1.0, 0.5)) == ["h2", "h1", "a"]
    for name in ("h2", "h1"):
        tree.child_stopped(name, 1.0)
    assert starts(tree.child_stopped("a", 1.0)) == ["a", "h1", "h2", "b"]


# ---- events mid-restart -----------------------------------------------------------------------


def test_crash_during_one_for_all_restart_counts_as_stopped() -> None:
    tree = boot(build(G("root", ALL, "a", "b", "c", intensity=1)))
    assert stops(tree.child_exited("a", True, 1.0, 0.5)) == ["c", "b"]
    assert tree.child_exited("b", True, 1.1, 0.5) == []  # died while being stopped
    assert tree.leaf_state("b") is S.RESTARTING
    assert starts(tree.child_stopped("c", 1.2)) == ["a", "b", "c"]
    assert not tree.group_gave_up("root")  # one restart, not two


def test_earlier_sibling_crashing_mid_rest_for_one_widens_the_restart() -> None:
    tree = boot(build(G("root", REST, "a", "b", "c")))
    assert stops(tree.child_exited("b", True, 1.0, 0.5)) == ["c"]
    assert tree.child_exited("a", True, 1.1, 0.5) == []  # c is already stopping
    assert starts(tree.child_stopped("c", 1.2)) == ["a", "b", "c"]


def test_late_child_started_for_a_leaf_being_stopped_is_ignored() -> None:
    tree = build(G("root", ALL, "a", "b"))
    tree.start(0.0)
    tree.child_started("a", 0.0)
    assert stops(tree.child_exited("a", True, 1.0, 0.5)) == ["b"]
    assert tree.child_started("b", 1.0) == []
    assert starts(tree.child_stopped("b", 1.1)) == ["a", "b"]


# ---- intensity and escalation -----------------------------------------------------------------


def test_group_giving_up_escalates_to_its_parent() -> None:
    tree = boot(build(G("root", ONE, "z", "g"), G("g", ONE, "x", "y", intensity=1)))
    assert tree.child_exited("x", True, 1.0, 0.5) == [StartChild("x")]
    tree.child_started("x", 1.0)
    out = tree.child_exited("x", True, 2.0, 0.5)
    assert out == [StopChild("y", "group_gave_up"), GroupGaveUp("g", 2, 10.0)]
    assert tree.group_gave_up("g")
    assert states(tree, "x", "y", "z") == [S.GAVE_UP, S.STOPPING, S.RUNNING]
    # once y is down, root restarts g as one child: fresh, immediately (first group restart)
    assert tree.child_stopped("y", 2.5) == [StartChild("x"), StartChild("y")]
    assert not tree.group_gave_up("g")
    assert tree.restarts("x") == 2
    # g's history was cleared: one more crash is fine again
    tree.child_started("x", 3.0)
    assert tree.child_exited("x", True, 3.5, 0.5) == [ArmRestartTimer(1, 1.0)]


def test_nested_give_up_applies_the_parents_strategy_to_the_whole_group() -> None:
    tree = boot(build(G("root", REST, "a", "g", "b"), G("g", ONE, "x", intensity=0)))
    out = tree.child_exited("x", True, 1.0, 0.5)
    assert out[0] == GroupGaveUp("g", 1, 10.0)
    assert out[1:] == [StopChild("b", "restart")]  # root's rest_for_one, g counted as one
    assert tree.leaf_state("a") is S.RUNNING
    assert starts(tree.child_stopped("b", 1.1)) == ["x", "b"]


def test_root_giving_up_stops_everything_and_restarts_nothing() -> None:
    tree = boot(build(G("root", ONE, "a", "g", intensity=1), G("g", ONE, "b", intensity=0)))
    assert tree.child_exited("a", True, 1.0, 0.5) == [StartChild("a")]
    tree.child_started("a", 1.0)
    out = tree.child_exited("b", True, 2.0, 0.5)  # g gives up; root counts its second restart
    assert out == [
        GroupGaveUp("g", 1, 10.0),
        StopChild("a", "group_gave_up"),
        GroupGaveUp("root", 2, 10.0),
    ]
    assert tree.child_stopped("a", 2.1) == []
    assert tree.group_gave_up("root")
    assert states(tree, "a", "b") == [S.GAVE_UP, S.GAVE_UP]
    # the operator can revive leaves afterwards
    assert tree.start_children(["a"], 3.0) == [StartChild("a")]
    assert not tree.group_gave_up("root")
    assert tree.leaf_state("b") is S.GAVE_UP
    assert boot(tree, 4.0).leaf_state("b") is S.RUNNING


def test_restarts_outside_the_period_do_not_count() -> None:
    tree = boot(build(G("root", ONE, "a", intensity=1)))
    for t in (1.0, 12.0, 23.0):  # period is 10 s
        out = tree.child_exited("a", True, t, 0.5)
        assert not tree.group_gave_up("root")
        for e in out:
            if isinstance(e, ArmRestartTimer):
                assert tree.timer_fired(e.token, t + e.delay) == [StartChild("a")]
        tree.child_started("a", t + 5.0)
    assert not tree.group_gave_up("root")


# ---- backoff and timers -----------------------------------------------------------------------


def test_backoff_arms_timers_and_ignores_stale_tokens() -> None:
    tree = boot(build(G("root", ONE, "a")))
    assert tree.child_exited("a", True, 1.0, 0.5) == [StartChild("a")]
    tree.child_started("a", 1.0)
    assert tree.child_exited("a", True, 2.0, 0.5) == [ArmRestartTimer(1, 1.0)]
    assert tree.leaf_state("a") is S.RESTARTING
    assert tree.timer_fired(7, 3.0) == []
    assert tree.timer_fired(1, 3.0) == [StartChild("a")]
    assert tree.timer_fired(1, 3.0) == []
    tree.child_started("a", 3.0)
    assert tree.child_exited("a", True, 3.5, 0.5) == [ArmRestartTimer(2, 2.0)]


def test_timer_and_stops_both_gate_the_restart() -> None:
    tree = boot(build(G("root", ALL, "a", "b")))
    tree.child_exited("a", True, 1.0, 0.5)
    tree.child_stopped("b", 1.0)
    for name in "ab":
        tree.child_started(name, 1.0)
    out = tree.child_exited("a", True, 2.0, 0.5)
    assert out == [StopChild("b", "restart"), ArmRestartTimer(1, 1.0)]
    assert tree.timer_fired(1, 3.0) == []  # b is still stopping
    assert starts(tree.child_stopped("b", 3.5)) == ["a", "b"]


def test_absorbed_batch_keeps_its_delay_and_its_token_goes_stale() -> None:
    tree = boot(build(G("root", REST, "a", "b")))
    tree.child_exited("b", True, 1.0, 0.5)
    tree.child_started("b", 1.0)
    assert tree.child_exited("b", True, 2.0, 0.5) == [ArmRestartTimer(1, 1.0)]
    # a's first crash wants no delay, but b's pending 0.5 s remain
    assert tree.child_exited("a", True, 2.5, 0.5) == [ArmRestartTimer(2, 0.5)]
    assert tree.timer_fired(1, 3.0) == []
    assert tree.timer_fired(2, 3.0) == [StartChild("a"), StartChild("b")]


# ---- operator ---------------------------------------------------------------------------------


def test_operator_stop_is_sticky_and_start_revives() -> None:
    tree = boot(build(G("root", ALL, "a", "g"), G("g", ONE, "x", "y", intensity=0)))
    assert tree.stop(["g"], 1.0) == [
        StopChild("y", "operator_stop"),
        StopChild("x", "operator_stop"),
    ]
    tree.child_stopped("y", 1.1)
    tree.child_stopped("x", 1.2)
    assert states(tree, "x", "y") == [S.STOPPED, S.STOPPED]
    assert starts(tree.child_exited("a", True, 2.0, 0.5)) == ["a"]  # x, y stay stopped
    assert tree.start_children(["g"], 3.0) == [StartChild("x"), StartChild("y")]
    assert tree.start_children(["g"], 3.0) == []  # already starting
    assert tree.restarts("x") == 0


def test_operator_restart_never_counts_toward_intensity() -> None:
    tree = boot(build(G("root", ONE, "a", "b", intensity=0)))
    for t in range(5):
        assert tree.restart(["root"], float(t)) == [
            StopChild("b", "operator_restart"),
            StopChild("a", "operator_restart"),
        ]
        tree.child_stopped("b", t + 0.1)
        assert tree.child_stopped("a", t + 0.2) == [StartChild("a"), StartChild("b")]
        boot_all = [tree.child_started(n, t + 0.3) for n in "ab"]
        assert boot_all == [[], []]
    assert not tree.group_gave_up("root")
    assert tree.restarts("a") == 0


def test_operator_start_skips_the_backoff_wait() -> None:
    tree = boot(build(G("root", ONE, "a")))
    tree.child_exited("a", True, 1.0, 0.5)
    tree.child_started("a", 1.0)
    assert tree.child_exited("a", True, 2.0, 0.5) == [ArmRestartTimer(1, 1.0)]
    assert tree.start_children(["a"], 2.1) == [StartChild("a")]
    assert tree.timer_fired(1, 3.0) == []


def test_operator_stop_of_a_leaf_waiting_to_restart() -> None:
    tree = boot(build(G("root", ONE, "a")))
    tree.child_exited("a", True, 1.0, 0.5)
    tree.child_started("a", 1.0)
    tree.child_exited("a", True, 2.0, 0.5)
    assert tree.stop(["a"], 2.1) == []
    assert tree.leaf_state("a") is S.STOPPED
    assert tree.timer_fired(1, 3.0) == []


# ---- shutdown ---------------------------------------------------------------------------------


def test_shutdown_stops_everything_in_reverse_order_and_nothing_restarts() -> None:
    tree = boot(build(G("root", ONE, "a", "g", "d"), G("g", ONE, "b", "c")))
    tree.child_exited("c", True, 1.0, 0.5)
    tree.child_started("c", 1.0)
    tree.child_exited("c", True, 2.0, 0.5)  # c waits for a timer
    out = tree.shutdown(2.5)
    assert out == [StopChild(n, "shutdown") for n in ("d", "b", "a")]
    assert tree.leaf_state("c") is S.STOPPED
    assert tree.timer_fired(1, 3.0) == []
    assert tree.child_exited("d", True, 3.0, 0.5) == []  # exit while stopping = stopped
    assert tree.child_stopped("b", 3.0) == []
    assert tree.child_stopped("a", 3.0) == []
    assert set(states(tree, *"abcd")) == {S.STOPPED}
    with pytest.raises(TreeCommandError, match="shut down"):
        tree.start_children(["a"], 4.0)
    assert starts(tree.start(5.0)) == list("abcd")


# ---- property: any legal driver history keeps the tree and the processes in step --------------

_OPS = ("started", "crash", "stopped", "timer", "stop", "start", "restart", "shutdown", "boot")
_step = st.tuples(st.sampled_from(_OPS), st.integers(0, 50), st.booleans(), st.floats(0.0, 3.0))


class _Driver:
    """A faithful driver: tracks which leaves have a process and which reports are owed."""

    def __init__(self, tree: Tree) -> None:
        self.tree = tree
        self.alive: set[str] = set()
        self.starting: set[str] = set()
        self.stopping: set[str] = set()
        self.tokens: list[int] = []

    def apply(self, effects: list[Effect]) -> None:
        for e in effects:
            if isinstance(e, StartChild):
                assert e.leaf not in self.alive, f"StartChild for live {e.leaf}"
                self.alive.add(e.leaf)
                self.starting.add(e.leaf)
            elif isinstance(e, StopChild):
                assert e.leaf in self.alive and e.leaf not in self.stopping, e
                self.stopping.add(e.leaf)
            elif isinstance(e, ArmRestartTimer):
                assert e.delay > 0
                self.tokens.append(e.token)

    def gone(self, leaf: str) -> None:
        self.alive.discard(leaf)
        self.starting.discard(leaf)
        self.stopping.discard(leaf)

    def check(self) -> None:
        for leaf in self.tree.topology.order:
            state = self.tree.leaf_state(leaf)
            assert (state is S.STOPPING) == (leaf in self.stopping), (leaf, state)
            live = state in (S.STARTING, S.RUNNING, S.STOPPING)
            assert live == (leaf in self.alive), (leaf, state)
            if state is not S.STOPPING:
                assert (state is S.STARTING) == (leaf in self.starting), (leaf, state)


@settings(max_examples=300, deadline=None)
@given(
    strategies=st.tuples(*[st.sampled_from(list(Strategy))] * 3),
    intensities=st.tuples(*[st.integers(0, 3)] * 3),
    steps=st.lists(_step, max_size=60),
)
def test_random_histories_never_break_the_tree(
    strategies: tuple[Strategy, Strategy, Strategy],
    intensities: tuple[int, int, int],
    steps: list[tuple[str, int, bool, float]],
) -> None:
    (s0, s1, s2), (i0, i1, i2) = strategies, intensities
    tree = build(
        G("root", s0, "a", "g1", "e", intensity=i0),
        G("g1", s1, "b", "t", "g2", intensity=i1),
        G("g2", s2, "c", "d", intensity=i2),
        types={"t": TMP, "c": TR, "e": TR},
    )
    nodes = ["root", "g1", "g2", *tree.topology.order]
    drv = _Driver(tree)
    now = 0.0
    drv.apply(tree.start(now))
    for op, n, flag, dt in steps:
        now += dt
        rand = (n % 10) / 10
        if op == "started" and drv.starting:
            leaf = sorted(drv.starting)[n % len(drv.starting)]
            drv.starting.discard(leaf)
            drv.apply(tree.child_started(leaf, now))
        elif op == "crash" and drv.alive:
            leaf = sorted(drv.alive)[n % len(drv.alive)]
            drv.gone(leaf)
            drv.apply(tree.child_exited(leaf, flag, now, rand))
        elif op == "stopped" and drv.stopping:
            leaf = sorted(drv.stopping)[n % len(drv.stopping)]
            drv.gone(leaf)
            drv.apply(tree.child_stopped(leaf, now))
        elif op == "timer" and drv.tokens:
            drv.apply(tree.timer_fired(drv.tokens[n % len(drv.tokens)], now))
        elif op in ("stop", "start", "restart"):
            ids = [nodes[n % len(nodes)]]
            call = {"stop": tree.stop, "start": tree.start_children, "restart": tree.restart}[op]
            try:
                drv.apply(call(ids, now))
            except TreeCommandError:
                assert op != "stop"
        elif op == "shutdown":
            drv.apply(tree.shutdown(now))
        elif op == "boot" and flag:
            drv.apply(tree.start(now))
        drv.check()

    # quiesce: deliver every owed report and timer; nothing may be left hanging
    for _ in range(50):
        pending = sorted(drv.stopping), sorted(drv.starting), list(drv.tokens)
        if not any(pending):
            break
        drv.tokens.clear()
        for leaf in pending[0]:
            drv.gone(leaf)
            drv.apply(tree.child_stopped(leaf, now))
        for token in pending[2]:
            now += 10.0
            drv.apply(tree.timer_fired(token, now))
        for leaf in sorted(drv.starting):
            drv.starting.discard(leaf)
            drv.apply(tree.child_started(leaf, now))
        drv.check()
    states_now = {tree.leaf_state(leaf) for leaf in tree.topology.order}
    assert not states_now & {S.STARTING, S.STOPPING, S.RESTARTING}, states_now
