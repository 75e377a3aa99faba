"""What the driver keeps per plugin instance, and how it describes one to operators.

An ``Instance`` is the mutable record around the pure cores: the lifecycle and health
trackers, the live process (pid, token, output pipes), the timers armed for it and the
bookkeeping behind ``oskctl status``. It survives restarts; each spawn bumps
``generation`` so callbacks from an earlier life are recognised and ignored.
"""

from __future__ import annotations

import asyncio
import functools
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from osk_daemon.config import Config, PluginConfig, StateStrategy
from osk_daemon.ipc.beats import Beat
from osk_daemon.isolation.cgroups import InstanceCgroup
from osk_daemon.supervisor.confinement import Prepared
from osk_daemon.supervisor.health import HealthPolicy, HealthTracker
from osk_daemon.supervisor.lifecycle import Lifecycle, State, Timer, describe_exit
from osk_daemon.supervisor.runtime_state import InstanceRecord, config_fingerprint

WORKER_TARGET = "osk_daemon.worker.runtime:run_worker"
LIVE_STATES = frozenset({State.LOADING, State.INITIALIZING, State.READY, State.UNLOADING})


@dataclass(eq=False)
class Instance:
    plugin: str
    index: int
    config: PluginConfig
    life: Lifecycle
    health: HealthTracker
    generation: int = 0
    token: str = ""
    spawned_at: float = 0.0  # monotonic
    ready_at: float | None = None  # monotonic
    last_seen: float = 0.0  # monotonic, any frame from the worker
    timers: dict[Timer, asyncio.TimerHandle] = field(default_factory=dict)
    exited: asyncio.Event = field(default_factory=asyncio.Event)
    health_handle: asyncio.TimerHandle | None = None
    health_timeout: asyncio.TimerHandle | None = None
    health_id: int = 0
    health_sent_at: float = 0.0  # monotonic, the last probe
    # the worker checks its own health (worker.health): what its page said last, and when
    # a report or a new count last came (monotonic)
    health_push: bool = False
    health_count: int = 0
    health_durations: float = 0.0
    health_heard: float = 0.0
    restart_span: Any = None  # tracing: from a crash to the replacement's readiness
    close_output: Callable[[], None] | None = None
    beat: Beat | None = None  # this life's heartbeat page, if its worker has one
    prepared: Prepared | None = None  # its cgroup and launch plan, while it lives
    usage: dict[str, Any] = field(default_factory=dict)  # last cgroup sample
    # what its sandbox does not enforce (require = false), as Confinement.check found it
    sandbox_degraded: tuple[str, ...] = ()
    # the version whose ready instance hands its state over to this one, when this
    # instance's worker asks for it (supervisor.handover); None once handed over
    handover_from: str | None = None
    handover_donor: int | None = None  # that instance's index, if one was paired with it
    handover_stash: bytes | None = None  # its state, exported as it retired before we asked
    # which of the plugin's state files (state-<n>.msgpack) this instance keeps: its
    # index, or the slot of the instance it replaces in a swap (None: its index)
    state_slot: int | None = None
    retiring: bool = False  # being drained and stopped by a rollout or reload
    # a rollout's new instance: the broker routes to it once the rollout counts it ready
    # (ready and healthy), not at its READY
    traffic_held: bool = False
    gentle_start: bool = False  # start at a low CPU priority (added while others serve)
    # a gentle start's CPU cap (rollout.start_cpu) and the cgroup it is on: lifted at READY,
    # when the life ends or by this timer, whichever comes first
    start_cap: tuple[asyncio.TimerHandle, InstanceCgroup] | None = None
    exits_by_reason: dict[str, int] = field(default_factory=dict)  # unrequested ends
    # for re-adoption by a restarted daemon (runtime_state): this life's process start
    # time, its output FIFOs, and whether it was adopted and has not spoken yet
    start_ticks: int | None = None
    fifos: tuple[Path, Path] | None = None
    adopting: bool = False
    slot: int = 0  # the cgroup slot of this life (two, taken in turn, with a standby)
    _fingerprint: tuple[PluginConfig, str] | None = None
    _record: tuple[tuple[object, ...], str] | None = None  # what it was made of, encoded

    def fingerprint(self) -> str:
        """``config_fingerprint`` of its config, computed once per config object."""
        cached = self._fingerprint
        if cached is None or cached[0] is not self.config:
            cached = self._fingerprint = (self.config, config_fingerprint(self.config))
        return cached[1]

    def state_record(self, loaded_from: str, daemon: str) -> str | None:
        """This life as the state file keeps it (``InstanceRecord.encode``), or None if
        it is not a live process; encoded again only when one of its fields changed."""
        pid, fifos = self.life.pid, self.fifos
        if not self.live or pid is None or self.start_ticks is None or fifos is None:
            return None
        state = self.life.state.value
        made_of = (
            pid,
            self.start_ticks,
            self.token,
            state,
            fifos,
            self.config,
            loaded_from,
            self.slot,
            self.state_slot,
        )
        cached = self._record
        if cached is None or cached[0] != made_of:
            record = InstanceRecord(
                plugin=self.plugin,
                index=self.index,
                version=str(self.config.version),
                pid=pid,
                start_ticks=self.start_ticks,
                token=self.token,
                fingerprint=self.fingerprint(),
                state=state,
                stdout=str(fifos[0]),
                stderr=str(fifos[1]),
                loaded_from=loaded_from,
                daemon=daemon,
                slot=self.slot,
                state_slot=self.state_slot,
            )
            cached = self._record = (made_of, record.encode())
        return cached[1]

    @classmethod
    def create(cls, plugin: str, index: int, cfg: PluginConfig) -> Instance:
        inst = cls(
            plugin,
            index,
            cfg,
            Lifecycle(cfg.start_timeout, cfg.shutdown_timeout),
            HealthTracker(health_policy(cfg)),
        )
        inst.exited.set()
        return inst

    @property
    def state_index(self) -> int:
        """The number of this instance's state file (``state_slot``, else its index)."""
        return self.index if self.state_slot is None else self.state_slot

    @property
    def key(self) -> tuple[str, int]:
        return (self.plugin, self.index)

    @functools.cached_property
    def leaf(self) -> str:  # the name and index never change: made once, read per row
        return leaf_id(self.plugin, self.index)

    @property
    def live(self) -> bool:
        return self.life.state in LIVE_STATES

    def cancel_timers(self) -> None:
        for handle in self.timers.values():
            handle.cancel()
        self.timers.clear()

    def cancel_health(self) -> None:
        for handle in (self.health_handle, self.health_timeout):
            if handle is not None:
                handle.cancel()
        self.health_handle = self.health_timeout = None
        self.health_push = False

    def worker_spec(
        self, config: Config, endpoint: str, *, token: str | None = None
    ) -> dict[str, Any]:
        """What the worker needs to run this instance. ``handover``: the worker asks for
        the previous version's state before its plugin starts (until one life asked, every
        life of this instance does). With ``token`` (a standby's, not this life's) there
        is no hand-over."""
        d = config.daemon
        extra: dict[str, Any] = {}
        if self.handover_from is not None and token is None:
            extra["handover"] = self.handover_from
        if self.config.preserve_state and self.config.state_strategy is StateStrategy.DISK:
            extra["state_file"] = f"state-{self.state_index}.msgpack"  # in its state dir
        t = config.tracing
        if t.exporter != "none":
            traces = t.file or d.runtime_dir / "traces.jsonl"
            extra["tracing"] = {
                "exporter": t.exporter,
                "file": str(traces),
                "sample_ratio": t.sample_ratio,
            }
        return {
            **extra,
            "plugin": self.plugin,
            "instance": self.index,
            "version": self.config.version,
            "entry": self.config.entry,
            "path": [str(p) for p in self.config.path],
            "config": dict(self.config.config),
            "endpoint": endpoint,
            "token": self.token if token is None else token,
            "heartbeat_interval": d.heartbeat_interval,
            **({"health": self._health_spec()} if self.health.policy.enabled else {}),
            "orphan_timeout": d.orphan_timeout,
            "max_message_size": int(d.max_message_size),
            "call_timeout": d.call_timeout,
            "log_level": d.log_level.upper() if isinstance(d.log_level, str) else "INFO",
        }

    def _health_spec(self) -> dict[str, float]:
        """The policy of the checks a worker runs itself if it has a heartbeat page."""
        policy = self.health.policy
        return {"interval": policy.interval, "timeout": policy.timeout}

    def worker_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.pop("NOTIFY_SOCKET", None)  # only the daemon talks to systemd
        env.update(self.config.env)
        env["OSK_PLUGIN"] = self.plugin
        env["OSK_INSTANCE"] = str(self.index)
        return env

    def status(self, restarts: int) -> dict[str, Any]:
        now = time.monotonic()
        ready = self.life.state is State.READY and self.ready_at is not None
        return {
            "plugin": self.plugin,
            "instance": self.index,
            "version": self.config.version,
            "pid": self.life.pid if self.live else None,
            "state": self.life.state.value,
            "health": self.health.status.value,
            "restarts": restarts,
            "uptime_s": round(now - self.ready_at, 3) if ready and self.ready_at else None,
            "last_exit": describe_exit(self.life.last_exit),
            "detail": self.life.failure or self.health.detail or "",
            "sandbox": self.config.sandbox.level.value,
            "sandbox_degraded": list(self.sandbox_degraded),
            **(self.usage if self.live else {}),
        }


def health_policy(cfg: PluginConfig) -> HealthPolicy:
    """The health core's thresholds from a plugin's ``health_check`` table."""
    hc = cfg.health_check
    return HealthPolicy(
        enabled=hc.enabled,
        interval=hc.interval,
        timeout=hc.timeout,
        failure_threshold=hc.failure_threshold,
        success_threshold=hc.success_threshold,
        auto_restart=hc.auto_restart,
    )


def leaf_id(plugin: str, index: int) -> str:
    return f"{plugin}/{index}"
