"""The life of one plugin instance, from spawn to exit, as a pure state machine.

Theory of operation
-------------------
State names are the ObjectStack spec's plugin loading states. An instance is PENDING until
the tree first starts it. StartRequested spawns a process (LOADING); its HELLO on the
broker means the process runs our worker (INITIALIZING, the plugin's ``start()`` is
running); READY means ``start()`` returned. A start timer, armed once the process exists
(Spawned), bounds the rest of LOADING and INITIALIZING.
A process a previous daemon left running is Adopted instead: PENDING goes straight to
INITIALIZING, and READY follows its first frame on the new daemon's broker.

Stopping is a ladder: ask the worker (STOP frame, it runs ``stop()`` and exits), SIGTERM
after ``shutdown_timeout``, SIGKILL after another ``shutdown_timeout``. A process that is
not connected yet skips the first rung. A hung instance (no heartbeats) cannot answer, so
it gets SIGKILL at once; an unhealthy one gets the full ladder.

Exited ends every life. Whether the exit was wanted (``stop_requested``) decides if the
tree hears "stopped" or "exited"; ``failure`` records why we killed it ourselves (start
timeout, hung, unhealthy, start failed), which makes the exit abnormal whatever the code.
The resting states are UNLOADED (stopped or exited normally) and FAILED.

The core never reads the clock or touches a process: the driver passes ``now`` and
performs the returned effects.
"""

from __future__ import annotations

import enum
import signal
from dataclasses import dataclass

from osk_daemon.errors import OskInternalError


class State(enum.StrEnum):
    PENDING = "pending"
    LOADING = "loading"
    INITIALIZING = "initializing"
    READY = "ready"
    UNLOADING = "unloading"
    UNLOADED = "unloaded"
    FAILED = "failed"


class Timer(enum.StrEnum):
    START = "start"  # start_timeout: LOADING/INITIALIZING took too long
    TERM = "term"  # shutdown_timeout after STOP: send SIGTERM
    KILL = "kill"  # shutdown_timeout after SIGTERM: send SIGKILL


# ---- events (facts, past tense) --------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StartRequested:
    pass


@dataclass(frozen=True, slots=True)
class Spawned:
    pid: int


@dataclass(frozen=True, slots=True)
class Adopted:
    """A previous daemon's process for this instance runs on: take it over, not spawn."""

    pid: int


@dataclass(frozen=True, slots=True)
class SpawnFailed:
    reason: str


@dataclass(frozen=True, slots=True)
class Connected:
    pass


@dataclass(frozen=True, slots=True)
class Started:
    pass


@dataclass(frozen=True, slots=True)
class StartFailed:
    reason: str


@dataclass(frozen=True, slots=True)
class StopRequested:
    reason: str = "requested"


@dataclass(frozen=True, slots=True)
class HeartbeatLost:
    pass


@dataclass(frozen=True, slots=True)
class HealthFailed:
    reason: str


@dataclass(frozen=True, slots=True)
class Exited:
    code: int | None
    signal: int | None
    oom: bool = False  # the kernel's OOM killer ended it (its memory limit)


@dataclass(frozen=True, slots=True)
class TimerFired:
    timer: Timer


Event = (
    StartRequested
    | Adopted
    | Spawned
    | SpawnFailed
    | Connected
    | Started
    | StartFailed
    | StopRequested
    | HeartbeatLost
    | HealthFailed
    | Exited
    | TimerFired
)

# ---- effects (commands for the driver) ----------------------------------------------------


@dataclass(frozen=True, slots=True)
class Spawn:
    pass


@dataclass(frozen=True, slots=True)
class SendStop:
    pass


@dataclass(frozen=True, slots=True)
class Signal:
    signum: int


@dataclass(frozen=True, slots=True)
class ArmTimer:
    timer: Timer
    delay: float


@dataclass(frozen=True, slots=True)
class CancelTimers:
    pass


@dataclass(frozen=True, slots=True)
class Publish:
    event: str  # an ObjectStack lifecycle event name
    detail: str = ""


Effect = Spawn | SendStop | Signal | ArmTimer | CancelTimers | Publish

S = State
_LIVE = (S.LOADING, S.INITIALIZING, S.READY, S.UNLOADING)
_RESTING = (S.PENDING, S.UNLOADED, S.FAILED)

# (state, event type) -> the handler's name. Anything missing is illegal and raises.
# Events that can race with a decision already taken (a late HELLO while unloading, a
# timer that fired as it was cancelled) are listed as "ignore".
TRANSITIONS: dict[tuple[State, type], str] = {
    **{(s, StartRequested): "spawn" for s in _RESTING},
    (S.PENDING, Adopted): "adopted",
    (S.LOADING, Spawned): "spawned",
    (S.INITIALIZING, Spawned): "spawned",  # HELLO can beat the spawner's reply
    (S.READY, Spawned): "spawned",
    (S.UNLOADING, Spawned): "spawned_while_unloading",
    (S.LOADING, SpawnFailed): "spawn_failed",
    (S.UNLOADING, SpawnFailed): "spawn_failed",
    (S.LOADING, Connected): "connected",
    (S.UNLOADING, Connected): "ignore",
    (S.INITIALIZING, Started): "started",
    (S.UNLOADING, Started): "ignore",
    (S.INITIALIZING, StartFailed): "start_failed",
    (S.UNLOADING, StartFailed): "ignore",
    (S.LOADING, StopRequested): "stop_unconnected",
    (S.INITIALIZING, StopRequested): "stop",
    (S.READY, StopRequested): "stop",
    (S.UNLOADING, StopRequested): "stop_again",
    (S.READY, HeartbeatLost): "hung",
    (S.INITIALIZING, HeartbeatLost): "hung",
    (S.UNLOADING, HeartbeatLost): "ignore",
    (S.READY, HealthFailed): "unhealthy",
    (S.UNLOADING, HealthFailed): "ignore",
    **{(s, Exited): "exited" for s in _LIVE},
    **{(s, TimerFired): "timer" for s in _LIVE},
    **{(s, TimerFired): "ignore" for s in _RESTING},
}


class Lifecycle:
    """One instance's state; ``step`` applies an event and returns the effects."""

    def __init__(self, start_timeout: float, shutdown_timeout: float) -> None:
        self.start_timeout = start_timeout
        self.shutdown_timeout = shutdown_timeout
        self.state = State.PENDING
        self.pid: int | None = None
        self.stop_requested = False
        self.failure: str | None = None  # why we killed it ourselves, if we did
        self.last_exit: Exited | None = None
        self.retry_count = 0

    def step(self, event: Event) -> list[Effect]:
        handler = TRANSITIONS.get((self.state, type(event)))
        if handler is None:
            raise OskInternalError(
                f"instance lifecycle: event {type(event).__name__} is illegal in state "
                f"{self.state.value}"
            )
        effects: list[Effect] = getattr(self, "_" + handler)(event)
        return effects

    @property
    def abnormal_exit(self) -> bool:
        """Did the last life end abnormally (non-zero code, a signal, or our own kill)?"""
        if self.failure is not None:
            return True
        ex = self.last_exit
        return ex is not None and (ex.signal is not None or ex.code != 0 or ex.oom)

    # ---- handlers -----------------------------------------------------------------------

    def _ignore(self, event: Event) -> list[Effect]:
        return []

    def _spawn(self, event: Event) -> list[Effect]:
        if self.state is not S.PENDING:
            self.retry_count += 1
        self.state = S.LOADING
        self.pid = None
        self.stop_requested = False
        self.failure = None
        # the start timer runs from Spawned: a spawn waiting its turn (hundreds started at
        # once) is the spawner's to bound (spawn_timeout), not the plugin's start
        return [Spawn(), Publish("plugin:before-init")]

    def _adopted(self, event: Adopted) -> list[Effect]:
        # its plugin started long ago; READY comes with its first frame on the new
        # broker (the driver feeds Started), or the start timer kills it
        self.state = S.INITIALIZING
        self.pid = event.pid
        self.stop_requested = False
        self.failure = None
        return [ArmTimer(Timer.START, self.start_timeout), Publish("plugin:adopted")]

    def _spawned(self, event: Spawned) -> list[Effect]:
        first = self.pid is None
        self.pid = event.pid
        if first and self.state is not S.READY:
            return [ArmTimer(Timer.START, self.start_timeout)]
        return []

    def _spawned_while_unloading(self, event: Spawned) -> list[Effect]:
        self.pid = event.pid
        return [Signal(signal.SIGTERM)]

    def _spawn_failed(self, event: SpawnFailed) -> list[Effect]:
        self.failure = f"spawn failed: {event.reason}"
        self.state = S.FAILED
        self.last_exit = None
        return [CancelTimers(), Publish("plugin:error", self.failure)]

    def _connected(self, event: Connected) -> list[Effect]:
        self.state = S.INITIALIZING
        return [Publish("plugin:init")]

    def _started(self, event: Started) -> list[Effect]:
        self.state = S.READY
        return [CancelTimers(), Publish("plugin:started")]

    def _start_failed(self, event: StartFailed) -> list[Effect]:
        # The worker exits by itself after START_FAILED; make sure it does.
        self.failure = f"start failed: {event.reason}"
        self.state = S.UNLOADING
        return [
            CancelTimers(),
            ArmTimer(Timer.KILL, self.shutdown_timeout),
            Publish("plugin:error", self.failure),
        ]

    def _stop_unconnected(self, event: StopRequested) -> list[Effect]:
        self.stop_requested = True
        self.state = S.UNLOADING
        first: list[Effect] = [Signal(signal.SIGTERM)] if self.pid is not None else []
        return [
            CancelTimers(),
            *first,
            ArmTimer(Timer.KILL, self.shutdown_timeout),
            Publish("plugin:before-destroy", event.reason),
        ]

    def _stop(self, event: StopRequested) -> list[Effect]:
        self.stop_requested = True
        return self._begin_ladder(event.reason)

    def _stop_again(self, event: StopRequested) -> list[Effect]:
        self.stop_requested = True
        return []

    def _begin_ladder(self, reason: str) -> list[Effect]:
        self.state = S.UNLOADING
        return [
            CancelTimers(),
            SendStop(),
            ArmTimer(Timer.TERM, self.shutdown_timeout),
            Publish("plugin:before-destroy", reason),
        ]

    def _hung(self, event: HeartbeatLost) -> list[Effect]:
        self.failure = "hung: no heartbeat from its event loop"
        self.state = S.UNLOADING
        return [
            CancelTimers(),
            Signal(signal.SIGKILL),
            ArmTimer(Timer.KILL, self.shutdown_timeout),
            Publish("plugin:error", self.failure),
        ]

    def _unhealthy(self, event: HealthFailed) -> list[Effect]:
        self.failure = f"unhealthy: {event.reason}"
        return [Publish("plugin:error", self.failure), *self._begin_ladder(self.failure)]

    def _exited(self, event: Exited) -> list[Effect]:
        self.last_exit = event
        if self.state is not S.UNLOADING and self.state is not S.READY and not self.failure:
            self.failure = f"exited during {self.state.value}"
        wanted = self.stop_requested or not self.abnormal_exit
        self.state = S.UNLOADED if wanted and not self.failure else S.FAILED
        return [CancelTimers(), Publish("plugin:destroyed", describe_exit(event))]

    def _timer(self, event: TimerFired) -> list[Effect]:
        timer = event.timer
        if timer is Timer.START and self.state in (S.LOADING, S.INITIALIZING):
            self.failure = f"did not become ready within {self.start_timeout:g}s"
            self.state = S.UNLOADING
            return [
                Signal(signal.SIGKILL),
                ArmTimer(Timer.KILL, self.shutdown_timeout),
                Publish("plugin:error", self.failure),
            ]
        if timer is Timer.TERM and self.state is S.UNLOADING:
            return [Signal(signal.SIGTERM), ArmTimer(Timer.KILL, self.shutdown_timeout)]
        if timer is Timer.KILL and self.state is S.UNLOADING:
            return [Signal(signal.SIGKILL), ArmTimer(Timer.KILL, self.shutdown_timeout)]
        return []


def exit_reason(life: Lifecycle) -> str:
    """Why a life ended on its own, as a metrics label: hung, unhealthy, start_failed,
    spawn_failed, start_timeout, oom, signal, crash (non-zero exit), exit (zero) or unknown
    (an adopted process, whose status only its new parent could read)."""
    failure = life.failure or ""
    for prefix, reason in (
        ("hung", "hung"),
        ("unhealthy", "unhealthy"),
        ("start failed", "start_failed"),
        ("spawn failed", "spawn_failed"),
        ("did not become ready", "start_timeout"),
    ):
        if failure.startswith(prefix):
            return reason
    ex = life.last_exit
    if ex is not None and ex.oom:
        return "oom"
    if ex is not None and ex.signal is not None:
        return "signal"
    if ex is not None and ex.code is None:
        return "unknown"  # an adopted process: its status was not ours to read
    return "crash" if ex is not None and ex.code else "exit"


def describe_exit(ex: Exited | None) -> str:
    """'exit 0', 'exit 3', 'SIGKILL', 'oom', 'exit ?' (an adopted process: not our
    child, its status is not ours to read) or '-' — how status tables show an exit."""
    if ex is None:
        return "-"
    if ex.oom:
        return "oom"
    if ex.code is None and ex.signal is None:
        return "exit ?"
    if ex.signal is not None:
        try:
            return signal.Signals(ex.signal).name
        except ValueError:
            return f"signal {ex.signal}"
    return f"exit {ex.code}"
