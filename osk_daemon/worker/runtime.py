"""The main loop of a plugin process: one DEALER socket, one asyncio loop, one plugin.

Why: the daemon supervises plugins it cannot trust to stay responsive, so the worker's
job is to make the plugin's state observable over the wire — alive (HELLO), started
(READY or START_FAILED), responsive (HEARTBEAT from the event loop itself) — and to turn
REQUEST/HEALTH/STOP frames into calls on the plugin.

How (theory of operation):

1. ``run_worker`` configures logging, creates the zmq context (never in the zygote, which
   must not own one) and runs ``_Worker.run`` on an asyncio loop; it always ends in
   ``os._exit`` with the code ``run`` returned. In a warm zygote child, ``warm_up`` made
   the log handler, the zmq context and the loop while the child waited for its request
   (it never forks again: it becomes this plugin process), and ``run_worker`` uses them.
2. ``run`` connects and sends HELLO before importing anything of the plugin, then starts
   the heartbeat and receive tasks. Heartbeats are sent by an event-loop task on purpose:
   a plugin that blocks the loop stops them, which is how the daemon detects a hang.
3. The plugin class is loaded (``module:Class`` or an ``osk.plugins`` entry point),
   instantiated, given its handed-over state and started; then READY lists its methods.
   The state is asked of the daemon only now (``spec["handover"]``: a STATE frame, see
   ``supervisor.handover``), or read from the state file.
   Any failure is reported as START_FAILED and the process exits with 1.
4. Frames are dispatched by kind in ``worker.link`` (``DaemonLink``, the socket's
   callback and the plugin's ``ContextLink``). REQUEST: sync handlers run inline, async
   ones as tasks, and each request gets exactly one REPLY or ERROR unless its deadline has
   passed. REPLY and ERROR resolve our own outgoing ``ctx.call`` futures. HEALTH runs
   ``health()`` in a task. STOP (or SIGTERM) sets the stop event. Undecodable frames are
   logged and dropped. With a heartbeat page and ``spec["health"]``, the worker runs its
   own health checks after READY instead and reports news only (``worker.health``).
5. Shutdown: ``stop()``, cancel the remaining tasks, close the socket with a linger so
   queued replies still leave, exit 0. A second SIGTERM exits immediately.
6. The daemon may die and come back: the socket's routing id is the token, so the new
   daemon knows this process when the socket reconnects by itself; a daemon gone for
   longer than ``orphan_timeout`` stops the plugin as STOP would (``worker.orphan``).
7. A standby (``spec["go_fd"]``, a socket to the daemon; ``supervisor.standby``) is the
   next life of an instance made before it is needed: it imports the plugin's module,
   connects and starts its loop, says ``ARMED`` on that socket and waits without a word to
   the broker. One byte from the daemon promotes it: HELLO, then step 3 (the plugin is
   instantiated and started only now, from the state saved by then). EOF (the daemon
   dropped it or died) or SIGTERM ends it with 0 before any plugin code beyond its module
   ran.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import mmap
import os
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any, NoReturn

import zmq

from osk_daemon.errors import FrameError, PluginLoadError
from osk_daemon.ipc.beats import BEAT_SIZE, mark_pushes_health, write_beat
from osk_daemon.ipc.codec import Kind, pack, unpack
from osk_daemon.ipc.endpoint import LoopSocket
from osk_daemon.worker.context import Context
from osk_daemon.worker.health import HealthReporter
from osk_daemon.worker.link import DaemonLink
from osk_daemon.worker.orphan import OrphanWatch
from osk_daemon.worker.sdk import Plugin, load_plugin_class, rpc_methods
from osk_daemon.worker.warm import LOG_FORMAT, rehearse, take_prepared, warm_up

__all__ = ["run_worker", "warm_up"]

LINGER_MS = 500
RECONNECT_MS = 20  # how soon a restarted daemon's endpoint is tried again (no back-off)
ARMED = b"a"  # a standby's word to the daemon on its go socket: ready to be promoted
# seconds to wait for a hand-over state: the daemon's export call may take 10 s
HANDOVER_TIMEOUT = 15.0
_NO_STATE: Any = object()  # no hand-over state (None is a state a plugin may export)

log = logging.getLogger("osk.worker")


def _map_beat(fd: Any) -> mmap.mmap | None:
    """Map the heartbeat page the daemon passed (``ipc.beats``); None without one."""
    if not isinstance(fd, int):
        return None
    try:
        return mmap.mmap(fd, BEAT_SIZE)
    except (OSError, ValueError) as exc:  # beats then go out as frames
        log.warning("cannot map the heartbeat page (fd %d): %s", fd, exc)
        return None
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)


def run_worker(spec: dict[str, Any]) -> NoReturn:
    """Run one plugin process to completion and exit; never returns.

    Exit code 0 after STOP/SIGTERM, 1 when the plugin failed to load or start or the
    runtime itself failed. See the module docstring for the protocol.
    """
    level = spec.get("log_level", "INFO")
    level = level.upper() if isinstance(level, str) else level
    prepared = take_prepared()
    if prepared is None:
        logging.basicConfig(stream=sys.stderr, format=LOG_FORMAT, level=level, force=True)
        zctx: zmq.Context[Any] = zmq.Context()
        loop = asyncio.new_event_loop()
    else:
        logging.getLogger().setLevel(level)
        zctx, loop = prepared.zctx, prepared.loop
    asyncio.set_event_loop(loop)
    code = 1
    try:
        with asyncio.Runner(loop_factory=lambda: loop) as runner:
            code = runner.run(_Worker(spec, zctx).run())
    except BaseException:
        log.critical("worker runtime failed:\n%s", traceback.format_exc())
    finally:
        with contextlib.suppress(Exception):
            zctx.destroy(linger=LINGER_MS)
        _flush_std()
    os._exit(code)


class _Worker:
    """One plugin process's lifecycle: the socket, signals, heartbeats, the plugin's start
    and stop, a standby's wait; what crosses the wire for the plugin is ``self.link``."""

    def __init__(self, spec: dict[str, Any], zctx: zmq.Context[Any]) -> None:
        self.spec = spec
        self.name: str = spec["plugin"]
        self.max_size = int(spec["max_message_size"])
        self.zctx = zctx
        self.plugin_class: type[Plugin] | None = None  # a standby loads it before its go
        self.promotion: asyncio.Future[bytes] | None = None  # what a standby waits for
        self.stopping = asyncio.Event()
        self.broken = False
        self.beat = _map_beat(spec.get("beat_fd"))  # heartbeats go there, not as frames
        self.checks: HealthReporter | None = None  # our own health checks, once READY
        tracer: Any = None  # an OpenTelemetry tracer when [tracing] is on
        tracing = spec.get("tracing")
        if tracing:
            from osk_daemon.observability.tracing import make_provider

            provider = make_provider(
                tracing["exporter"], self.name, tracing.get("file"), tracing["sample_ratio"]
            )
            tracer = provider.get_tracer("osk_daemon.worker") if provider else None
        self.link = DaemonLink(
            self.name, self.max_size, float(spec["call_timeout"]), self.stopping.set, tracer
        )

    async def run(self) -> int:
        go_fd = self.spec.get("go_fd")
        go = go_fd if isinstance(go_fd, int) else None
        standby = go is not None
        if standby:  # a failure here ends the standby (exit 1), its traceback in the log
            try:
                self.plugin_class = self.load_class()
            except PluginLoadError as exc:
                log.error("standby not armed, exiting: %s\n%s", exc, traceback.format_exc())
                return 1
        raw: zmq.Socket[bytes] = self.zctx.socket(zmq.DEALER)
        raw.setsockopt(zmq.MAXMSGSIZE, self.max_size + 8192)
        raw.setsockopt(zmq.LINGER, LINGER_MS)
        raw.setsockopt(zmq.SNDHWM, 0)
        raw.setsockopt(zmq.RCVHWM, 0)
        # the token is the routing id: a restarted daemon knows this process by it
        raw.setsockopt(zmq.ROUTING_ID, self.spec["token"].encode())
        raw.setsockopt(zmq.RECONNECT_IVL, RECONNECT_MS)
        raw.connect(self.spec["endpoint"])
        link = self.link
        sock = link.sock = LoopSocket(raw, link.on_frames, name="daemon")
        orphans = OrphanWatch(
            raw,
            float(self.spec.get("orphan_timeout", 0)),
            on_orphaned=self.stopping.set,
            on_reconnected=self.reconnected,
        )
        hello = pack(
            {
                "plugin": self.name,
                "instance": self.spec["instance"],
                "token": self.spec["token"],
                "pid": os.getpid(),
                "version": self.spec["version"],
            }
        )
        if not standby:
            link.send(Kind.HELLO, hello, target=self.name)
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.on_sigterm)
        sock.start(loop)
        orphans.start(loop)
        heartbeat: asyncio.Task[None] | None = None
        code = 0
        try:
            if go is not None:
                if not await self.promoted(go):
                    return 0
                link.send(Kind.HELLO, hello, target=self.name)
            heartbeat = loop.create_task(self.heartbeat_loop(), name="heartbeat")
            heartbeat.add_done_callback(self.on_loop_died)
            if await self.load_and_start():
                checks = self.health_reporter()  # marks the page before READY says so
                link.send(Kind.READY, pack({"methods": sorted(link.methods)}))
                if checks is not None:
                    self.checks = checks
                    checks.tick(loop.time())  # the first at once: dependents wait for it
                    link.on_probe = self.stop_own_checks
                await self.stopping.wait()
                self.stop_own_checks(probed=False)  # none runs against a stopping plugin
                await self.stop_plugin()
            elif not self.stopping.is_set():
                code = 1
            if self.broken:
                code = 1
        finally:
            tasks = [*link.tasks] if heartbeat is None else [heartbeat, *link.tasks]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            loop.remove_signal_handler(signal.SIGTERM)
            orphans.close()
            sock.close(linger=LINGER_MS)
        return code

    async def promoted(self, fd: int) -> bool:
        """A standby's wait: says ARMED on ``fd``, then True once the daemon wrote its byte
        there; False on EOF (the daemon dropped this standby, or died) or a stop (SIGTERM).
        Closes ``fd``."""
        await rehearse()  # the steps after the go run once on nothing: their pages are ours
        with contextlib.suppress(OSError):  # armed; a daemon gone shows as EOF below
            os.write(fd, ARMED)
        loop = asyncio.get_running_loop()
        woken = self.promotion = loop.create_future()

        def readable() -> None:
            if not woken.done():
                try:
                    woken.set_result(os.read(fd, 1))
                except OSError:
                    woken.set_result(b"")

        loop.add_reader(fd, readable)
        try:
            data = await woken
        finally:
            self.promotion = None
            loop.remove_reader(fd)
            os.close(fd)
        return bool(data) and not self.stopping.is_set()

    def load_class(self) -> type[Plugin]:
        return load_plugin_class(self.spec["entry"], list(self.spec.get("path") or []))

    async def load_and_start(self) -> bool:
        """Load, instantiate and start the plugin; False if it failed or STOP came first."""
        loop = asyncio.get_running_loop()
        starting, stop_wait = (
            loop.create_task(self.start_plugin()),
            loop.create_task(self.stopping.wait()),
        )
        await asyncio.wait({starting, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
        stop_wait.cancel()
        if not starting.done():
            log.info("stop requested while plugin %r was starting", self.name)
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await starting
            return False
        exc = starting.exception()
        if exc is None:
            return True
        if not isinstance(exc, PluginLoadError):
            exc = PluginLoadError(
                f"plugin {self.name!r} failed to start: {type(exc).__name__}: {exc}"
            )
        trace = "".join(traceback.format_exception(starting.exception()))
        log.error("%s\n%s", exc, trace)
        self.link.send(Kind.START_FAILED, pack({**exc.to_wire(), "traceback": trace}))
        return False

    async def start_plugin(self) -> None:
        cls = self.plugin_class or self.load_class()
        ctx = Context(
            self.name,
            int(self.spec["instance"]),
            str(self.spec["version"]),
            self.spec.get("config") or {},
            link=self.link,
        )
        plugin = cls(ctx)
        methods = rpc_methods(plugin)
        state = await self.handed_over() if self.spec.get("handover") else _NO_STATE
        if state is _NO_STATE and self.spec.get("state_file"):
            saved = _read_state(self.spec["state_file"], self.max_size)
            state = _NO_STATE if saved is None else saved
        if state is not _NO_STATE:
            await plugin.import_state(state)
        await plugin.start()
        self.link.plugin, self.link.methods = plugin, methods

    async def handed_over(self) -> Any:
        """The previous version's state, asked of the daemon now that the plugin exists
        and is about to start (so the state is as fresh as it can be); _NO_STATE if the
        daemon has none for us, or sent one that does not decode."""
        body = await self.link.ask_state(HANDOVER_TIMEOUT)
        if not body:
            return _NO_STATE
        try:
            return unpack(body, self.max_size)
        except FrameError as exc:
            log.warning("dropped the hand-over state: %s", exc)
            return _NO_STATE

    async def stop_plugin(self) -> None:
        plugin = self.link.plugin
        assert plugin is not None
        try:
            await plugin.stop()
        except Exception:
            log.exception("plugin %r raised in stop()", self.name)
        if self.spec.get("state_file"):
            try:
                _write_state(self.spec["state_file"], await plugin.export_state())
            except Exception:
                log.exception("plugin %r: could not save its state", self.name)

    def health_reporter(self) -> HealthReporter | None:
        """This worker's own health checks (``worker.health``), if its daemon asked for
        them (``spec["health"]``) and gave it a heartbeat page; else HEALTH frames come."""
        policy = self.spec.get("health")
        if self.beat is None or not isinstance(policy, dict):
            return None
        return HealthReporter(
            self.beat,
            self.link.check_health,
            self.link.send,
            float(policy["interval"]),
            float(policy["timeout"]),
        )

    def reconnected(self) -> None:
        """A new daemon (it restarted and adopts us): speak at once, and tell it our health
        rather than let it wait for the next change (it knows only the page's count)."""
        self.link.send(Kind.HEARTBEAT)
        if self.checks is not None:
            self.checks.resend()

    def stop_own_checks(self, probed: bool = True) -> None:
        """End this worker's own checks: the plugin stops, or (``probed``) the daemon
        probes it again, which the page then says."""
        checks, self.checks = self.checks, None
        if checks is not None:
            checks.close()
            if probed and self.beat is not None:
                mark_pushes_health(self.beat, pushes=False)

    def on_loop_died(self, task: asyncio.Task[Any]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.critical("%s loop failed; exiting", task.get_name(), exc_info=task.exception())
            self.broken = True
            self.stopping.set()

    def on_sigterm(self) -> None:
        if self.stopping.is_set():
            log.warning("second SIGTERM: exiting now")
            _flush_std()
            os._exit(1)
        self.stopping.set()
        if self.promotion is not None and not self.promotion.done():
            self.promotion.set_result(b"")  # a standby stopped before its go

    async def heartbeat_loop(self) -> None:
        """Beat every ``heartbeat_interval``, and start the worker's own health checks as
        they fall due (every beat, if they are more frequent): one timer for both."""
        interval = float(self.spec["heartbeat_interval"])
        beat = self.beat
        loop = asyncio.get_running_loop()
        due = loop.time()
        while True:
            now = loop.time()
            if beat is not None:
                write_beat(beat, time.monotonic())  # one store; the daemon reads it
            else:
                self.link.send(Kind.HEARTBEAT)
            step = interval
            checks = self.checks
            if checks is not None:
                checks.tick(now)
                step = min(interval, checks.interval)
            due += step
            if due < now:  # a busy loop: skip the missed beats
                due = now + step
            await asyncio.sleep(due - now)


def _read_state(path: str, limit: int) -> Any:
    """The state saved by an earlier life (``state_strategy = "disk"``), or None."""
    try:
        with Path(path).open("rb") as f:
            data = f.read(limit + 1)
    except FileNotFoundError:
        return None
    if len(data) > limit:
        log.error("saved state %s is larger than max_message_size; ignored", path)
        return None
    try:
        return unpack(data, limit)
    except FrameError as exc:
        log.error("saved state %s is unreadable (%s); ignored", path, exc)
        return None


def _write_state(path: str, state: Any) -> None:
    """Save ``state`` atomically: a crash mid-write leaves the previous file."""
    tmp = Path(f"{path}.tmp")
    with tmp.open("wb") as f:
        f.write(pack(state))
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def _flush_std() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
