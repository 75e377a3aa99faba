"""Every transition of the instance lifecycle, without processes."""

from __future__ import annotations

import signal

import pytest

from osk_daemon.errors import OskInternalError
from osk_daemon.supervisor import lifecycle as lc
from osk_daemon.supervisor.lifecycle import State, Timer

pytestmark = pytest.mark.timeout(10)

S = State


def at(state: State) -> lc.Lifecycle:
    """A lifecycle driven along the happy path until ``state``."""
    life = lc.Lifecycle(start_timeout=10, shutdown_timeout=5)
    path: list[tuple[State, lc.Event]] = [
        (S.LOADING, lc.StartRequested()),
        (S.LOADING, lc.Spawned(42)),
        (S.INITIALIZING, lc.Connected()),
        (S.READY, lc.Started()),
        (S.UNLOADING, lc.StopRequested()),
    ]
    if state is S.PENDING:
        return life
    for reached, event in path:
        life.step(event)
        if reached is state and not (state is S.LOADING and life.pid is None):
            return life
    raise AssertionError(state)


def kinds(effects: list[lc.Effect]) -> list[type]:
    return [type(e) for e in effects]


def test_start_spawns_and_arms_the_start_timer() -> None:
    life = at(S.PENDING)
    effects = life.step(lc.StartRequested())
    assert life.state is S.LOADING
    assert lc.Spawn() in effects
    assert not any(isinstance(e, lc.ArmTimer) for e in effects)  # waiting to be spawned
    assert life.step(lc.Spawned(42)) == [lc.ArmTimer(Timer.START, 10)]
    assert life.retry_count == 0


def test_happy_path_to_ready_cancels_the_start_timer() -> None:
    life = at(S.INITIALIZING)
    effects = life.step(lc.Started())
    assert life.state is S.READY
    assert lc.CancelTimers() in effects
    assert lc.Publish("plugin:started") in effects


def test_hello_may_arrive_before_the_spawner_reports_the_pid() -> None:
    life = lc.Lifecycle(10, 5)
    life.step(lc.StartRequested())
    life.step(lc.Connected())
    life.step(lc.Spawned(7))
    assert (life.state, life.pid) == (S.INITIALIZING, 7)


def test_stop_ladder_stop_then_term_then_kill() -> None:
    life = at(S.READY)
    effects = life.step(lc.StopRequested("operator"))
    assert life.state is S.UNLOADING
    assert kinds(effects)[:3] == [lc.CancelTimers, lc.SendStop, lc.ArmTimer]
    effects = life.step(lc.TimerFired(Timer.TERM))
    assert effects == [lc.Signal(signal.SIGTERM), lc.ArmTimer(Timer.KILL, 5)]
    effects = life.step(lc.TimerFired(Timer.KILL))
    assert lc.Signal(signal.SIGKILL) in effects
    life.step(lc.Exited(None, signal.SIGKILL))
    assert life.state is S.UNLOADED
    assert life.stop_requested


def test_stop_before_connect_signals_directly() -> None:
    life = at(S.LOADING)
    effects = life.step(lc.StopRequested())
    assert lc.Signal(signal.SIGTERM) in effects
    assert lc.SendStop() not in effects


def test_stop_before_the_pid_is_known_signals_when_it_arrives() -> None:
    life = lc.Lifecycle(10, 5)
    life.step(lc.StartRequested())
    effects = life.step(lc.StopRequested())
    assert not any(isinstance(e, lc.Signal) for e in effects)
    assert life.step(lc.Spawned(9)) == [lc.Signal(signal.SIGTERM)]


@pytest.mark.parametrize(
    ("code", "sig", "state", "abnormal"),
    [(0, None, S.UNLOADED, False), (3, None, S.FAILED, True), (None, 9, S.FAILED, True)],
)
def test_unrequested_exit_from_ready(
    code: int | None, sig: int | None, state: State, abnormal: bool
) -> None:
    life = at(S.READY)
    effects = life.step(lc.Exited(code, sig))
    assert life.state is state
    assert life.abnormal_exit is abnormal
    assert not life.stop_requested
    assert lc.CancelTimers() in effects


def test_exit_while_loading_is_a_failure_even_with_code_zero() -> None:
    life = at(S.LOADING)
    life.step(lc.Exited(0, None))
    assert life.state is S.FAILED
    assert life.abnormal_exit


def test_start_timeout_kills() -> None:
    life = at(S.INITIALIZING)
    effects = life.step(lc.TimerFired(Timer.START))
    assert lc.Signal(signal.SIGKILL) in effects
    assert life.failure and "ready within" in life.failure
    life.step(lc.Exited(None, 9))
    assert life.state is S.FAILED


def test_start_failed_waits_for_the_exit_and_fails() -> None:
    life = at(S.INITIALIZING)
    effects = life.step(lc.StartFailed("boom"))
    assert life.state is S.UNLOADING
    assert lc.ArmTimer(Timer.KILL, 5) in effects
    life.step(lc.Exited(1, None))
    assert life.state is S.FAILED
    assert life.failure == "start failed: boom"


def test_hung_instance_is_killed_at_once_and_counts_as_abnormal() -> None:
    life = at(S.READY)
    effects = life.step(lc.HeartbeatLost())
    assert effects[1] == lc.Signal(signal.SIGKILL)
    life.step(lc.Exited(None, 9))
    assert life.state is S.FAILED
    assert life.abnormal_exit


def test_unhealthy_instance_gets_the_graceful_ladder_and_counts_as_abnormal() -> None:
    life = at(S.READY)
    effects = life.step(lc.HealthFailed("3 failed checks"))
    assert lc.SendStop() in effects
    life.step(lc.Exited(0, None))
    assert life.state is S.FAILED
    assert life.abnormal_exit


def test_spawn_failure() -> None:
    life = at(S.LOADING)
    life.step(lc.SpawnFailed("fork: out of memory"))
    assert life.state is S.FAILED
    assert life.abnormal_exit


def test_restart_counts_retries_and_clears_the_last_failure() -> None:
    life = at(S.READY)
    life.step(lc.HeartbeatLost())
    life.step(lc.Exited(None, 9))
    life.step(lc.StartRequested())
    assert life.retry_count == 1
    assert life.failure is None
    assert not life.stop_requested


@pytest.mark.parametrize(
    "event",
    [
        lc.Connected(),
        lc.Started(),
        lc.StartFailed("x"),
        lc.HeartbeatLost(),
        lc.HealthFailed("x"),
        lc.StopRequested(),
    ],
)
def test_races_while_unloading_are_ignored(event: lc.Event) -> None:
    life = at(S.UNLOADING)
    assert life.step(event) == []
    assert life.state is S.UNLOADING


@pytest.mark.parametrize("timer", list(Timer))
def test_stale_timers_in_resting_states_are_ignored(timer: Timer) -> None:
    for state in (S.PENDING,):
        life = at(state)
        assert life.step(lc.TimerFired(timer)) == []


@pytest.mark.parametrize(
    ("state", "event"),
    [
        (S.PENDING, lc.Started()),
        (S.PENDING, lc.Exited(0, None)),
        (S.READY, lc.StartRequested()),
        (S.READY, lc.Connected()),
        (S.LOADING, lc.HealthFailed("x")),
    ],
)
def test_illegal_events_raise_naming_state_and_event(state: State, event: lc.Event) -> None:
    life = at(state)
    with pytest.raises(OskInternalError, match=f"{type(event).__name__}.*{state.value}"):
        life.step(event)


def test_describe_exit() -> None:
    assert lc.describe_exit(None) == "-"
    assert lc.describe_exit(lc.Exited(3, None)) == "exit 3"
    assert lc.describe_exit(lc.Exited(None, 9)) == "SIGKILL"


# ---- re-adoption after a daemon restart ---------------------------------------------------


def test_an_adopted_process_waits_for_its_first_frame_under_the_start_timer() -> None:
    life = at(S.PENDING)
    effects = life.step(lc.Adopted(77))
    assert (life.state, life.pid) == (S.INITIALIZING, 77)
    assert effects == [lc.ArmTimer(Timer.START, 10), lc.Publish("plugin:adopted")]
    assert lc.Spawn() not in effects  # it runs already
    life.step(lc.Started())
    assert life.state is S.READY and life.retry_count == 0


def test_an_adopted_process_that_never_speaks_is_killed_by_the_start_timer() -> None:
    life = at(S.PENDING)
    life.step(lc.Adopted(77))
    effects = life.step(lc.TimerFired(Timer.START))
    assert lc.Signal(signal.SIGKILL) in effects
    life.step(lc.Exited(None, None))  # not our child: its status is unknown
    assert life.state is S.FAILED and life.abnormal_exit


def test_only_a_pending_instance_can_be_adopted() -> None:
    with pytest.raises(OskInternalError):
        at(S.READY).step(lc.Adopted(1))


def test_an_unknown_status_is_abnormal_but_a_requested_stop_still_ends_unloaded() -> None:
    life = at(S.PENDING)
    life.step(lc.Adopted(77))
    life.step(lc.Started())
    life.step(lc.Exited(None, None))
    assert life.state is S.FAILED and lc.exit_reason(life) == "unknown"
    assert lc.describe_exit(life.last_exit) == "exit ?"
    stopped = at(S.PENDING)
    stopped.step(lc.Adopted(78))
    stopped.step(lc.Started())
    stopped.step(lc.StopRequested())
    stopped.step(lc.Exited(None, None))
    assert stopped.state is S.UNLOADED
