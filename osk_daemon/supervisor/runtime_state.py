"""The daemon's runtime state on disk, so a restarted daemon can re-adopt its plugins.

Why: the daemon may die (a crash, ``kill -9``, an upgrade) while its plugins run on. The
next daemon must know which processes are its plugins, without mistaking a reused pid for
one, and how to reach them again.

How: ``StateFile`` keeps ``runtime_dir/instances.json``: one ``InstanceRecord`` per live
instance (plugin, index, version, pid and the pid's start time in clock ticks since boot
from ``/proc/PID/stat``, the token the worker uses as its ZeroMQ routing id, its output
FIFOs, a fingerprint of its config, and its life state). The driver marks it dirty on every
state change; it is written at once, or, within ``WRITE_DELAY`` of the last write, at the
end of it (so at most 20 writes a second), to a temp file renamed over the
old one (a reader sees the old or the new file, never half of one), on a worker thread.
``load`` reads it back and never raises: a missing, unreadable or foreign file means
"nothing to adopt", logged.
``verify`` opens a pidfd on a record's pid *first* and only then compares the start time,
so the answer cannot change under it: a pid reused since then has another start time.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import osk_daemon
from osk_daemon.config import Config, PluginConfig

__all__ = [
    "STATE_FILE",
    "InstanceRecord",
    "StateFile",
    "config_fingerprint",
    "daemon_fingerprint",
    "load",
    "parent_of",
    "start_ticks",
    "verify",
]

log = logging.getLogger("osk.supervisor.state")

STATE_FILE = "instances.json"
WRITE_DELAY = 0.05  # s: a change is written at once, or this long after the last write
_FORMAT = 1


@dataclass(frozen=True)
class InstanceRecord:
    plugin: str
    index: int
    version: str
    pid: int
    start_ticks: int  # /proc/PID/stat field 22: when the process started, ticks since boot
    token: str  # the worker's routing id and its HELLO credential
    fingerprint: str  # config_fingerprint() of the config it was started with
    state: str  # its lifecycle state when the record was written
    stdout: str  # its output FIFOs
    stderr: str
    loaded_from: str = ""  # the plugin folder, for a plugin loaded at run time (oskctl load)
    daemon: str = ""  # daemon_fingerprint() of the daemon that started it
    slot: int = 0  # its cgroup slot (confinement.instance_cgroup)
    state_slot: int | None = None  # its state file's number, if not its index (a swap's)

    @property
    def leaf(self) -> str:
        return f"{self.plugin}/{self.index}"

    def encode(self) -> str:
        """The record as the state file holds it (one JSON object)."""
        return json.dumps(vars(self), separators=(",", ":"))


def config_fingerprint(cfg: PluginConfig) -> str:
    """A short digest of everything in a plugin's config: same digest, same instance."""
    raw = cfg.model_dump_json(exclude={"instances"}).encode()
    return hashlib.sha256(raw).hexdigest()[:16]


def daemon_fingerprint(config: Config) -> str:
    """A digest of what a worker got from the daemon besides its plugin's config (the
    heartbeat interval, size and time limits, orphan timeout, log level, tracing) and of
    the daemon's version: a process started under other ones is not adopted."""
    d = config.daemon
    facts = [
        osk_daemon.__version__,
        d.heartbeat_interval,
        int(d.max_message_size),
        d.call_timeout,
        d.orphan_timeout,
        str(d.log_level),
        config.tracing.model_dump_json(),
    ]
    return hashlib.sha256(json.dumps(facts).encode()).hexdigest()[:16]


def _stat_field(pid: int, field: int) -> int | None:
    """Numeric field ``field`` (1-based, as in proc(5)) of ``/proc/PID/stat``; None if
    there is no such process."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    # "pid (comm) state ppid ..." where comm may hold spaces and parentheses
    after_comm = raw[raw.rfind(b")") + 2 :].split()  # from field 3 on
    try:
        return int(after_comm[field - 3])
    except (IndexError, ValueError):
        return None


def start_ticks(pid: int) -> int | None:
    """When ``pid`` started (clock ticks since boot), or None if there is no such process."""
    return _stat_field(pid, 22)


def parent_of(pid: int) -> int | None:
    """``pid``'s parent pid, or None if there is no such process."""
    return _stat_field(pid, 4)


def verify(record: InstanceRecord) -> int | None:
    """A pidfd on the record's process if it is still that process, else None."""
    try:
        pidfd = os.pidfd_open(record.pid)
    except OSError:
        return None
    if start_ticks(record.pid) != record.start_ticks:
        os.close(pidfd)
        return None
    return pidfd


def load(runtime_dir: Path) -> list[InstanceRecord]:
    """The records a previous daemon left in ``runtime_dir``; [] if none can be read."""
    path = runtime_dir / STATE_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as exc:
        log.warning("%s: unreadable (%s); nothing to re-adopt", path, exc)
        return []
    if not isinstance(data, dict) or data.get("format") != _FORMAT:
        log.warning("%s: not a state file of this daemon version; nothing to re-adopt", path)
        return []
    records: list[InstanceRecord] = []
    for raw in data.get("instances", []):
        try:
            records.append(InstanceRecord(**raw))
        except TypeError as exc:
            log.warning("%s: skipped a bad record (%s): %r", path, exc, raw)
    return records


class StateFile:
    """Writes the live instances to ``runtime_dir/instances.json``, coalescing changes.

    The records are taken on the loop, already encoded (``InstanceRecord.encode``, which
    the caller keeps per instance until it changes: re-encoding 500 records 20 times a
    second during a start would cost the daemon a third of its time); the file is written
    on a worker thread (one, so writes land in order), since a write and a rename cost
    milliseconds on a busy disk."""

    def __init__(self, runtime_dir: Path, collect: Callable[[], Iterable[str]]) -> None:
        """``collect()`` returns the current records, each ``InstanceRecord.encode()``d
        (called when a write happens)."""
        self.path = runtime_dir / STATE_FILE
        self._collect = collect
        self._scheduled: asyncio.Handle | None = None
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="osk-state")
        self._closed = False
        self._last = -WRITE_DELAY  # monotonic time of the last write
        self.writes = 0

    def dirty(self) -> None:
        """Something changed: write soon (once for everything changed meanwhile)."""
        if self._scheduled is None and not self._closed:
            # at once after a quiet spell; within WRITE_DELAY of the last write, at its end
            delay = max(0.0, self._last + WRITE_DELAY - time.monotonic())
            self._scheduled = asyncio.get_running_loop().call_later(delay, self.write)

    def write(self) -> None:
        """Write now (also what ``dirty`` schedules); ``flush`` waits until it is done."""
        if self._scheduled is not None:
            self._scheduled.cancel()
            self._scheduled = None
        if self._closed:
            return
        self._last = time.monotonic()
        head = f'{{"format":{_FORMAT},"daemon_pid":{os.getpid()},"instances":['
        self._writer.submit(self._put, head + ",".join(self._collect()) + "]}")

    def flush(self) -> None:
        """Return once every write asked for so far is on disk."""
        if not self._closed:
            self._writer.submit(lambda: None).result()

    def _put(self, text: str) -> None:
        tmp = self.path.with_suffix(".tmp")
        try:
            tmp.write_text(text)
            tmp.replace(self.path)
            self.writes += 1
        except OSError as exc:  # a full disk must not stop the daemon; re-adoption suffers
            log.error("could not write %s: %s", self.path, exc)

    def remove(self) -> None:
        """Everything stopped: nothing is left to re-adopt (and nothing more is written)."""
        if self._scheduled is not None:
            self._scheduled.cancel()
            self._scheduled = None
        self._closed = True
        self._writer.shutdown(wait=True)
        with contextlib.suppress(OSError):
            self.path.unlink()
