"""The rollout engine against a simulated set of instances: no processes, no clock.

``Cluster`` performs the engine's effects the way the driver does (a started instance is
counted at once but becomes ready only when the test says so; a stopped one disappears)
and checks the safety invariants on every step: a rolling update never has more than
N + max_surge instances nor fewer than N - max_unavailable ready; traffic never goes to a
role without a ready instance; an instance is never stopped while weights still send it
traffic.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pytest

from osk_daemon.rollout.engine import (
    AnalysisDone,
    Analyze,
    ArmTimer,
    CanaryFailed,
    Effect,
    Observed,
    Publish,
    Rollout,
    RolloutCommandError,
    SetWeights,
    StartInstances,
    State,
    StopInstances,
    TimerFired,
)
from osk_daemon.rollout.plan import Role, RolloutSpec, Strategy, phases_of

pytestmark = pytest.mark.timeout(10)

STABLE, CANARY = Role.STABLE, Role.CANARY


def spec(strategy: Strategy = Strategy.ROLLING, **kw: Any) -> RolloutSpec:
    return RolloutSpec("counter", "1.0.0", "2.0.0", strategy, **kw)


class Cluster:
    def __init__(self, rollout: Rollout) -> None:
        self.r = rollout
        n = rollout.spec.instances
        self.ready = {STABLE: n, CANARY: 0}
        self.starting = {STABLE: 0, CANARY: 0}
        self.weights: tuple[int, int] | None = None
        self.timers: list[int] = []
        self.analyses = 0
        self.events: list[str] = []
        self.log: list[Effect] = []

    def obs(self) -> Observed:
        return Observed(
            self.ready[STABLE],
            self.ready[STABLE] + self.starting[STABLE],
            self.ready[CANARY],
            self.ready[CANARY] + self.starting[CANARY],
        )

    def apply(self, effects: list[Effect]) -> None:
        for e in effects:
            self.log.append(e)
            if isinstance(e, StartInstances):
                assert e.count > 0
                self.starting[e.role] += e.count
            elif isinstance(e, StopInstances):
                assert 0 < e.count <= self.ready[e.role] + self.starting[e.role]
                if self.weights is not None:
                    share = self.weights[0 if e.role is STABLE else 1]
                    left = self.ready[e.role] + self.starting[e.role] - e.count
                    assert share == 0 or left > 0, f"stopping {e.role} while it gets {share}%"
                unready = min(e.count, self.starting[e.role])
                self.starting[e.role] -= unready
                self.ready[e.role] -= e.count - unready
            elif isinstance(e, SetWeights):
                if e.weights is not None:
                    for role, share in zip((STABLE, CANARY), e.weights, strict=True):
                        assert share == 0 or self.ready[role] > 0, f"{share}% to no {role}"
                self.weights = e.weights
            elif isinstance(e, ArmTimer):
                self.timers.append(e.token)
            elif isinstance(e, Analyze):
                self.analyses += 1
            elif isinstance(e, Publish):
                self.events.append(e.event)
        self.check()

    def check(self) -> None:
        s = self.r.spec
        if s.strategy is Strategy.ROLLING:
            total = sum(self.ready.values()) + sum(self.starting.values())
            assert total <= s.instances + s.max_surge
            assert sum(self.ready.values()) >= s.instances - s.max_unavailable

    def step(self) -> bool:
        """Report counts; if nothing moved, let the starting instances become ready."""
        effects = self.r.observe(self.obs())
        self.apply(effects)
        if effects:
            return True
        if any(self.starting.values()):
            for role in (STABLE, CANARY):
                self.ready[role] += self.starting[role]
                self.starting[role] = 0
            return True
        return False

    def run(
        self,
        judge: Callable[[int], AnalysisDone] | None = None,
        limit: int = 200,
        settle: bool = True,
    ) -> None:
        for _ in range(limit):
            if self.r.state in (State.SUCCEEDED, State.ROLLED_BACK, State.SERVING):
                return
            if self.r.state is State.HOLDING:
                self.apply(self.r.timer_fired(TimerFired(self.timers[-1])))
                continue
            if self.r.state is State.ANALYSING:
                verdict = judge(self.analyses) if judge else AnalysisDone(True, "fine")
                self.apply(self.r.analysis_done(verdict))
                continue
            if not self.step():
                return
        if settle:
            raise AssertionError(f"did not settle: {self.r.status()}")


def started(spec_: RolloutSpec) -> Cluster:
    c = Cluster(Rollout(spec_))
    c.apply(c.r.begin())
    return c


@pytest.mark.parametrize(
    ("n", "surge", "unavailable"), [(1, 1, 0), (3, 1, 0), (4, 0, 1), (5, 2, 1), (2, 3, 0)]
)
def test_rolling_replaces_every_instance_within_its_bounds(
    n: int, surge: int, unavailable: int
) -> None:
    c = started(spec(instances=n, max_surge=surge, max_unavailable=unavailable))
    c.run()
    assert c.r.state is State.SUCCEEDED
    assert (c.ready, c.starting) == ({STABLE: 0, CANARY: n}, {STABLE: 0, CANARY: 0})
    assert not any(isinstance(e, SetWeights) for e in c.log)  # traffic follows readiness
    assert c.events[0] == "rollout:step" and c.events[-1] == "rollout:succeeded"


def test_canary_walks_its_weight_steps_with_an_analysis_each() -> None:
    c = started(spec(Strategy.CANARY, instances=4, steps=(10, 50, 100)))
    c.run()
    assert c.r.state is State.SUCCEEDED
    weights = [e.weights for e in c.log if isinstance(e, SetWeights)]
    # (100, 0) first: a ready canary instance gets no call before its step's weights
    assert weights == [(100, 0), (90, 10), (50, 50), (0, 100)]
    begun = Rollout(spec(Strategy.CANARY, instances=4, steps=(10, 50, 100))).begin()
    assert SetWeights((100, 0)) in begun  # with the first start, before anything is ready
    assert c.analyses == 2
    starts = [e.count for e in c.log if isinstance(e, StartInstances)]
    assert starts == [1, 1, 2]  # ceil(4 * 10%) = 1, ceil(4 * 50%) = 2, then all 4
    # the stable version stays at full strength until the canary has all traffic
    first_stop = next(i for i, e in enumerate(c.log) if isinstance(e, StopInstances))
    last_weights = max(i for i, e in enumerate(c.log) if isinstance(e, SetWeights))
    assert first_stop > last_weights
    assert c.ready == {STABLE: 0, CANARY: 4}


def test_a_failed_analysis_rolls_back_and_says_why() -> None:
    c = started(spec(Strategy.CANARY, instances=2))
    c.run(judge=lambda n: AnalysisDone(n < 2, "canary p99 31 ms > 3x stable 8 ms"))
    assert c.r.state is State.ROLLED_BACK
    assert c.r.reason == "analysis failed: canary p99 31 ms > 3x stable 8 ms"
    assert c.weights == (100, 0)
    assert c.ready == {STABLE: 2, CANARY: 0}
    assert c.events[-2:] == ["rollout:rolling-back", "rollout:rolled-back"]


def test_blue_green_cuts_over_once_everything_new_is_ready() -> None:
    c = started(spec(Strategy.BLUE_GREEN, instances=3))
    c.run()
    assert c.r.state is State.SUCCEEDED
    assert [e.weights for e in c.log if isinstance(e, SetWeights)] == [(100, 0), (0, 100)]
    assert c.ready == {STABLE: 0, CANARY: 3}


def test_ab_serves_both_until_promoted_or_aborted() -> None:
    c = started(spec(Strategy.AB, instances=2, ab_split=30))
    c.run()
    assert c.r.state is State.SERVING
    assert c.weights == (70, 30)
    assert c.ready == {STABLE: 2, CANARY: 1}
    c.apply(c.r.promote())
    c.run()
    assert c.r.state is State.SUCCEEDED
    assert c.ready == {STABLE: 0, CANARY: 2}
    c2 = started(spec(Strategy.AB, instances=2))
    c2.run()
    c2.apply(c2.r.abort())
    c2.run()
    assert (c2.r.state, c2.r.reason) == (State.ROLLED_BACK, "aborted by the operator")
    assert c2.ready == {STABLE: 2, CANARY: 0}


def test_rolling_rollback_restores_the_stable_version_under_the_same_bounds() -> None:
    c = started(spec(instances=3))
    for _ in range(3):
        c.step()
    assert c.ready[CANARY] + c.starting[CANARY] >= 1
    c.apply(c.r.canary_failed(CanaryFailed("exit 1 during start")))
    assert c.r.state is State.ROLLING_BACK
    c.run()
    assert c.r.state is State.ROLLED_BACK
    assert c.ready == {STABLE: 3, CANARY: 0}
    assert "exit 1 during start" in c.r.reason
    # ignored once rolling back or done
    assert c.r.canary_failed(CanaryFailed("again")) == []


def test_the_progress_deadline_rolls_back_a_stuck_phase() -> None:
    c = started(spec(Strategy.CANARY, instances=1, progress_deadline=5.0))
    c.apply(c.r.observe(c.obs()))  # the canary is starting and never becomes ready
    deadline = c.timers[-1]
    assert c.r.timer_fired(TimerFired(deadline - 1)) == []  # a stale token does nothing
    c.apply(c.r.timer_fired(TimerFired(deadline)))
    assert c.r.state is State.ROLLING_BACK
    assert "did not complete within 5s" in c.r.reason
    c.run()
    assert c.r.state is State.ROLLED_BACK


def test_pause_stops_progress_and_resume_goes_on() -> None:
    c = started(spec(instances=2))
    c.apply(c.r.pause())
    assert c.r.state is State.PAUSED
    assert c.r.observe(c.obs()) == []
    assert c.r.pause() == []  # idempotent
    assert c.r.timer_fired(TimerFired(c.timers[-1])) == []  # the deadline was voided
    c.apply(c.r.resume())
    c.run()
    assert c.r.state is State.SUCCEEDED


def test_promote_skips_the_remaining_analysis() -> None:
    c = started(spec(Strategy.CANARY, instances=2, steps=(5, 25, 50, 100)))
    while c.r.state is not State.HOLDING:  # the first step holds for its analysis
        c.step()
    c.apply(c.r.promote())
    c.run()
    assert c.r.state is State.SUCCEEDED
    assert c.analyses == 0
    assert c.weights == (0, 100)


def reach(state: State) -> Rollout:
    """A rollout in ``state``, driven there through its events."""
    kind = Strategy.AB if state is State.SERVING else Strategy.CANARY
    c = started(spec(kind, instances=2))
    if state is State.PROGRESSING:
        return c.r
    if state in (State.HOLDING, State.ANALYSING, State.SERVING):
        while c.r.state is not (State.SERVING if kind is Strategy.AB else State.HOLDING):
            c.step()
        if state is State.ANALYSING:
            c.apply(c.r.timer_fired(TimerFired(c.timers[-1])))
        return c.r
    if state is State.PAUSED:
        c.apply(c.r.pause())
        return c.r
    if state is State.ROLLING_BACK:
        c.apply(c.r.abort())
        return c.r
    if state is State.ROLLED_BACK:
        c.apply(c.r.abort())
        c.run()
        return c.r
    c.apply(c.r.promote())
    c.run()
    assert c.r.state is State.SUCCEEDED
    return c.r


REFUSED = {
    ("pause", State.ROLLING_BACK),
    ("pause", State.ROLLED_BACK),
    ("pause", State.SUCCEEDED),
    ("resume", State.ROLLING_BACK),
    ("resume", State.ROLLED_BACK),
    ("resume", State.SUCCEEDED),
    ("promote", State.ROLLING_BACK),
    ("promote", State.ROLLED_BACK),
    ("promote", State.SUCCEEDED),
    ("abort", State.SUCCEEDED),
}


@pytest.mark.parametrize("state", list(State))
@pytest.mark.parametrize("command", ["pause", "resume", "promote", "abort"])
def test_every_command_is_safe_from_every_state(state: State, command: str) -> None:
    r = reach(state)
    assert r.state is state
    if (command, state) in REFUSED:
        with pytest.raises(RolloutCommandError, match=f"cannot {command}"):
            getattr(r, command)()
        assert r.state is state
        return
    getattr(r, command)()
    expected = {
        "pause": {State.PAUSED},
        "resume": {state} if state is not State.PAUSED else {State.PROGRESSING},
        "promote": {State.PROGRESSING, State.SUCCEEDED},
        "abort": {State.ROLLING_BACK, State.ROLLED_BACK},
    }[command]
    assert r.state in expected


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"instances": 0}, "instances must be >= 1"),
        ({"max_surge": 0, "max_unavailable": 0}, "cannot both be 0"),
        ({"steps": (50, 10)}, "steps must increase"),
        ({"steps": (0, 100)}, "percentages in 1..100"),
        ({"ab_split": 100}, "ab_split must be in 1..99"),
        ({"canary": "1.0.0", "strategy": Strategy.CANARY}, "already runs 1.0.0"),
    ],
)
def test_bad_specs_are_refused(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        replace(spec(), **changes)


def test_phases_of_each_strategy() -> None:
    assert [p.describe() for p in phases_of(spec(Strategy.BLUE_GREEN, instances=2))] == [
        "stable 2, canary 2, 100% / 0%",
        "stable 0, canary 2, 0% / 100%",
    ]
    assert len(phases_of(spec(Strategy.CANARY, steps=(5, 25, 50, 100)))) == 4
    assert phases_of(spec())[0].describe() == "stable 0, canary 1, traffic by ready instances"
