"""One rollout as a pure state machine: observed instance counts in, scaling and routing out.

Theory of operation
-------------------
The engine walks the phases of ``plan.phases_of(spec)``. In each phase it *reconciles*:
given the latest ``Observed`` counts (instances of each role, and how many of them are
ready), it asks the driver to start or stop instances and to set traffic weights until the
phase's target holds; then the phase is done and the next one begins.

Order inside a phase is what makes it safe. A weighted phase first starts what it needs,
moves traffic only once those instances are ready, and stops the surplus only after the
traffic has moved away from it (the driver then drains each stopped instance: no new
requests, in-flight ones finish). A rolling phase interleaves: it starts new instances
while the total stays within N + ``max_surge``, and stops old ones while at least
N - ``max_unavailable`` stay ready (Kubernetes' algorithm).

Contract with the driver: after performing effects, it reports ``Observed`` counting
instances it has started (starting ones are in ``total``, not in ``ready``) and not counting
those it is draining. Until that report the engine reconciles on its own projection of
the effects it asked for, so no event in between can ask twice for the same instance.

A canary phase, once done, holds for the analysis window, then asks the driver to judge
(``Analyze``); a failed judgement, a canary instance that fails, or a phase that does not
complete within ``progress_deadline`` rolls back: stable at full strength and 100% of
traffic, canary stopped. Operator commands (pause, resume, promote, abort) are accepted
in every state: a no-op where they mean nothing (abort twice), a ``RolloutCommandError``
where they cannot mean anything (promote a rolled-back rollout).

States and moves (``_MOVES``)::

    PROGRESSING --phase done--> HOLDING (canary) | SERVING (A/B) | next phase | SUCCEEDED
    HOLDING --window over--> ANALYSING --passed--> next phase (PROGRESSING)
    any active --failure / abort--> ROLLING_BACK --done--> ROLLED_BACK
    any active --pause--> PAUSED --resume / promote--> PROGRESSING

Time is passed in only as timer tokens: the engine reads no clock.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from osk_daemon.errors import ControlError, OskInternalError
from osk_daemon.rollout.plan import (
    Phase,
    Role,
    RolloutSpec,
    phases_of,
    rollback_phase,
    takeover_phase,
)

__all__ = [
    "AnalysisDone",
    "Analyze",
    "ArmTimer",
    "CanaryFailed",
    "Effect",
    "Observed",
    "Publish",
    "Rollout",
    "RolloutCommandError",
    "SetWeights",
    "StartInstances",
    "State",
    "StopInstances",
    "TimerFired",
]


class State(enum.StrEnum):
    PROGRESSING = "progressing"
    HOLDING = "holding"
    ANALYSING = "analysing"
    SERVING = "serving"  # A/B: both versions, until promote or abort
    PAUSED = "paused"
    ROLLING_BACK = "rolling-back"
    SUCCEEDED = "succeeded"
    ROLLED_BACK = "rolled-back"


S = State
ACTIVE = frozenset({S.PROGRESSING, S.HOLDING, S.ANALYSING, S.SERVING, S.PAUSED})
FINISHED = frozenset({S.SUCCEEDED, S.ROLLED_BACK})

_MOVES: Mapping[State, frozenset[State]] = {
    S.PROGRESSING: frozenset(
        {S.PROGRESSING, S.HOLDING, S.SERVING, S.SUCCEEDED, S.PAUSED, S.ROLLING_BACK}
    ),
    S.HOLDING: frozenset({S.ANALYSING, S.PAUSED, S.ROLLING_BACK, S.PROGRESSING}),
    S.ANALYSING: frozenset({S.PROGRESSING, S.PAUSED, S.ROLLING_BACK}),
    S.SERVING: frozenset({S.PROGRESSING, S.PAUSED, S.ROLLING_BACK}),
    S.PAUSED: frozenset({S.PROGRESSING, S.SERVING, S.ROLLING_BACK}),
    S.ROLLING_BACK: frozenset({S.ROLLED_BACK}),
    S.SUCCEEDED: frozenset(),
    S.ROLLED_BACK: frozenset(),
}


class RolloutCommandError(ControlError):
    """An operator command that cannot apply to the rollout in its present state."""


# ---- events ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Observed:
    """Instance counts: ``*_total`` includes starting ones, ``*_ready`` excludes draining."""

    stable_ready: int
    stable_total: int
    canary_ready: int
    canary_total: int

    def ready(self, role: Role) -> int:
        return self.stable_ready if role is Role.STABLE else self.canary_ready

    def total(self, role: Role) -> int:
        return self.stable_total if role is Role.STABLE else self.canary_total


@dataclass(frozen=True)
class TimerFired:
    token: int


@dataclass(frozen=True)
class AnalysisDone:
    passed: bool
    reason: str = ""


@dataclass(frozen=True)
class CanaryFailed:
    reason: str


# ---- effects --------------------------------------------------------------------------------


@dataclass(frozen=True)
class StartInstances:
    role: Role
    count: int


@dataclass(frozen=True)
class StopInstances:
    """Drain and stop ``count`` instances of ``role`` (the driver picks which)."""

    role: Role
    count: int


@dataclass(frozen=True)
class SetWeights:
    """Traffic shares (stable %, canary %), or None: by ready instances."""

    weights: tuple[int, int] | None


@dataclass(frozen=True)
class ArmTimer:
    """Fire ``TimerFired(token)`` after ``delay`` seconds; a newer token voids older ones."""

    token: int
    delay: float


@dataclass(frozen=True)
class Analyze:
    """Judge the canary against the stable version over the last ``window`` seconds."""

    window: float


@dataclass(frozen=True)
class Publish:
    event: str
    detail: dict[str, Any]


Effect = StartInstances | StopInstances | SetWeights | ArmTimer | Analyze | Publish


class Rollout:
    """The decisions of one rollout. Not thread-safe; every call is O(1)."""

    def __init__(self, spec: RolloutSpec) -> None:
        self.spec = spec
        self.state = S.PROGRESSING
        self.phases = phases_of(spec)
        self.index = 0
        self.weights: tuple[int, int] | None = None
        self.reason = ""
        self._weights_done = False
        self._paused_from: State | None = None
        self._token = 0
        self._obs = Observed(spec.instances, spec.instances, 0, 0)

    @property
    def phase(self) -> Phase:
        return self.phases[self.index]

    def begin(self) -> list[Effect]:
        """Start the rollout: the first phase, from the stable version at full strength."""
        return self._enter_phase()

    def status(self) -> dict[str, Any]:
        return {
            "plugin": self.spec.plugin,
            "strategy": str(self.spec.strategy),
            "stable": self.spec.stable,
            "canary": self.spec.canary,
            "state": str(self.state),
            "phase": self.index + 1,
            "phases": len(self.phases),
            "target": self.phase.describe(),
            "weights": list(self.weights) if self.weights else None,
            "observed": vars(self._obs).copy(),
            "reason": self.reason,
        }

    # ---- events ---------------------------------------------------------------------------

    def observe(self, obs: Observed) -> list[Effect]:
        self._obs = obs
        if self.state in (S.PROGRESSING, S.ROLLING_BACK):
            return self._reconcile()
        return []

    def timer_fired(self, event: TimerFired) -> list[Effect]:
        if event.token != self._token:
            return []  # stale: a newer timer replaced it
        if self.state is S.PROGRESSING:
            return self._roll_back(
                f"phase {self.index + 1} ({self.phase.describe()}) did not complete within "
                f"{self.spec.progress_deadline:g}s"
            )
        if self.state is S.HOLDING:
            self._move(S.ANALYSING)
            return [Analyze(self.spec.analysis_window)]
        return []

    def analysis_done(self, event: AnalysisDone) -> list[Effect]:
        if self.state is not S.ANALYSING:
            return []  # a late verdict (paused or rolled back meanwhile)
        if not event.passed:
            return self._roll_back(f"analysis failed: {event.reason}")
        out: list[Effect] = [Publish("rollout:analysis", {"passed": True, "detail": event.reason})]
        return out + self._next_phase()

    def canary_failed(self, event: CanaryFailed) -> list[Effect]:
        if self.state not in ACTIVE:
            return []
        return self._roll_back(f"canary {self.spec.canary} failed: {event.reason}")

    # ---- operator commands ----------------------------------------------------------------

    def pause(self) -> list[Effect]:
        if self.state is S.PAUSED:
            return []
        self._refuse_unless_active("pause")
        self._paused_from = self.state
        self._move(S.PAUSED)
        self._token += 1  # void the running timer; resume re-arms
        return [Publish("rollout:paused", self._where())]

    def resume(self) -> list[Effect]:
        if self.state is not S.PAUSED:
            self._refuse_unless_active("resume")
            return []
        resumed = self._paused_from
        self._paused_from = None
        if resumed is S.SERVING:
            self._move(S.SERVING)
            return [Publish("rollout:resumed", self._where())]
        self._move(S.PROGRESSING)
        return [
            Publish("rollout:resumed", self._where()),
            *self._arm_deadline(),
            *self._reconcile(),
        ]

    def promote(self) -> list[Effect]:
        """Skip what is left: the canary takes over at once (no more analysis)."""
        self._refuse_unless_active("promote")
        self.phases = [*self.phases[: self.index + 1], takeover_phase(self.spec)]
        self._paused_from = None
        if self.state is not S.PROGRESSING:
            self._move(S.PROGRESSING)
        return [Publish("rollout:promoted", self._where()), *self._next_phase()]

    def abort(self, reason: str = "aborted by the operator") -> list[Effect]:
        if self.state in (S.ROLLING_BACK, S.ROLLED_BACK):
            return []
        self._refuse_unless_active("abort")
        return self._roll_back(reason)

    # ---- inside -----------------------------------------------------------------------------

    def _refuse_unless_active(self, command: str) -> None:
        if self.state in ACTIVE:
            return
        if self.state is S.SUCCEEDED:
            raise RolloutCommandError(
                f"cannot {command}: the rollout of {self.spec.plugin} to {self.spec.canary} "
                f"succeeded; deploy {self.spec.stable} to go back"
            )
        raise RolloutCommandError(
            f"cannot {command}: the rollout of {self.spec.plugin} is {self.state}"
            + (f" ({self.reason})" if self.reason else "")
        )

    def _move(self, new: State) -> None:
        if new not in _MOVES[self.state]:
            raise OskInternalError(f"rollout: no move from {self.state} to {new}")
        self.state = new

    def _where(self) -> dict[str, Any]:
        return {"phase": self.index + 1, "phases": len(self.phases), "state": str(self.state)}

    def _arm(self, delay: float) -> ArmTimer:
        self._token += 1
        return ArmTimer(self._token, delay)

    def _arm_deadline(self) -> list[Effect]:
        return [self._arm(self.spec.progress_deadline)]

    def _enter_phase(self) -> list[Effect]:
        self._weights_done = False
        detail = {**self._where(), "target": self.phase.describe()}
        return [Publish("rollout:step", detail), *self._arm_deadline(), *self._reconcile()]

    def _next_phase(self) -> list[Effect]:
        if self.index + 1 >= len(self.phases):
            self._move(S.SUCCEEDED)
            self._token += 1
            return [Publish("rollout:succeeded", {"version": self.spec.canary})]
        self.index += 1
        if self.state is not S.PROGRESSING:
            self._move(S.PROGRESSING)
        return self._enter_phase()

    def _roll_back(self, reason: str) -> list[Effect]:
        self.reason = reason
        self._paused_from = None
        self._move(S.ROLLING_BACK)
        self.phases = [*self.phases[: self.index + 1], rollback_phase(self.spec)]
        self.index = len(self.phases) - 1
        self._weights_done = False
        self._token += 1  # no deadline while rolling back: it only moves towards known-good
        return [Publish("rollout:rolling-back", {"reason": reason}), *self._reconcile()]

    def _reconcile(self) -> list[Effect]:
        phase, obs = self.phase, self._obs
        out: list[Effect] = (
            self._reconcile_rolling(phase, obs)
            if phase.rolling
            else self._reconcile_weighted(phase, obs)
        )
        done = all(
            obs.total(r) == phase.count(r) and obs.ready(r) == phase.count(r) for r in Role
        ) and (phase.rolling or self._weights_done)
        # moving traffic is immediate; only instances starting or stopping are waited for
        if done and not any(isinstance(e, StartInstances | StopInstances) for e in out):
            out += self._phase_done()
        self._obs = _projected(obs, out)
        return out

    def _reconcile_rolling(self, phase: Phase, obs: Observed) -> list[Effect]:
        n = self.spec.instances
        out: list[Effect] = []
        self._weights_done = True
        if self.weights is not None:  # a rolling rollback after weighted phases
            self.weights = None
            out.append(SetWeights(None))
        total = obs.stable_total + obs.canary_total
        for role in Role:
            grow = min(phase.count(role) - obs.total(role), n + self.spec.max_surge - total)
            if grow > 0:
                out.append(StartInstances(role, grow))
                total += grow
        available = obs.stable_ready + obs.canary_ready
        for role in Role:
            surplus = obs.total(role) - phase.count(role)
            if surplus <= 0:
                continue
            unready = min(surplus, obs.total(role) - obs.ready(role))
            allowed = max(0, available - (n - self.spec.max_unavailable))
            count = unready + min(surplus - unready, allowed)
            if count > 0:
                out.append(StopInstances(role, count))
                available -= count - unready
        return out

    def _reconcile_weighted(self, phase: Phase, obs: Observed) -> list[Effect]:
        out: list[Effect] = [
            StartInstances(role, phase.count(role) - obs.total(role))
            for role in Role
            if phase.count(role) > obs.total(role)
        ]
        if not self._weights_done:
            if obs.canary_ready < phase.canary or (phase.stable and obs.stable_ready < 1):
                if self.weights is None:  # the first weighted phase: until its canary is
                    self.weights = (100, 0)  # ready, the stable version keeps every call
                    out.append(SetWeights(self.weights))
                return out  # traffic moves only to instances that are ready
            self._weights_done = True
            if phase.weights != self.weights:
                self.weights = phase.weights
                out.append(SetWeights(phase.weights))
        out += [
            StopInstances(role, obs.total(role) - phase.count(role))
            for role in Role
            if obs.total(role) > phase.count(role)
        ]
        return out

    def _phase_done(self) -> list[Effect]:
        if self.state is S.ROLLING_BACK:
            self._move(S.ROLLED_BACK)
            return [Publish("rollout:rolled-back", {"reason": self.reason})]
        if self.phase.analyse:
            self._move(S.HOLDING)
            return [
                Publish("rollout:holding", {**self._where(), "window": self.spec.analysis_window}),
                self._arm(self.spec.analysis_window),
            ]
        if self.phase.hold:
            self._move(S.SERVING)
            self._token += 1
            return [Publish("rollout:serving", self._where())]
        return self._next_phase()


def _projected(obs: Observed, effects: list[Effect]) -> Observed:
    """What the driver will report once it has performed ``effects``: started instances
    count (not yet ready), stopped ones are gone, not-ready ones first. Reconciling on
    this view before the next report cannot ask twice for the same instance."""
    counts = {
        Role.STABLE: [obs.stable_ready, obs.stable_total],
        Role.CANARY: [obs.canary_ready, obs.canary_total],
    }
    for e in effects:
        if isinstance(e, StartInstances):
            counts[e.role][1] += e.count
        elif isinstance(e, StopInstances):
            ready, total = counts[e.role]
            unready = min(e.count, total - ready)
            counts[e.role] = [ready - (e.count - unready), total - e.count]
    (sr, st), (cr, ct) = counts[Role.STABLE], counts[Role.CANARY]
    return Observed(sr, st, cr, ct)
