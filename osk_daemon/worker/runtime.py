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
   Any failure is reported as START_FAILED and the process exits with 1.
4. Frames are dispatched by kind. REQUEST: sync handlers run inline, async ones as tasks,
   and each request gets exactly one REPLY or ERROR unless its deadline has passed. REPLY
   and ERROR resolve our own outgoing ``ctx.call`` futures. HEALTH runs ``health()`` in a
   task. STOP (or SIGTERM) sets the stop event. Undecodable frames are logged and dropped.
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
import errno
import inspect
import itertools
import logging
import mmap
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, NoReturn

import zmq

from osk_daemon.errors import (
    DeadlineExceeded,
    FrameError,
    MethodNotFound,
    OskError,
    PluginLoadError,
    RemoteError,
    Unavailable,
    error_from_wire,
)
from osk_daemon.ipc.beats import BEAT_SIZE, write_beat
from osk_daemon.ipc.codec import (
    Encoder,
    Header,
    Kind,
    check_batch,
    decode_header,
    encode_header,
    encode_reply_header,
    pack,
    unpack,
)
from osk_daemon.ipc.endpoint import LoopSocket
from osk_daemon.worker.context import Context
from osk_daemon.worker.orphan import OrphanWatch
from osk_daemon.worker.sdk import (
    RESERVED_PREFIX,
    Plugin,
    load_plugin_class,
    rpc_methods,
    split_args,
    to_health,
)
from osk_daemon.worker.warm import LOG_FORMAT, rehearse, take_prepared, warm_up

__all__ = ["run_worker", "warm_up"]

LINGER_MS = 500
RECONNECT_MS = 20  # how soon a restarted daemon's endpoint is tried again (no back-off)
CALL_GRACE = 0.5  # seconds past a call's deadline before giving up locally
ARMED = b"a"  # a standby's word to the daemon on its go socket: ready to be promoted

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


_DEPENDENCY_EVENTS = frozenset({"dependency_down", "dependency_up"})
_enc = Encoder()  # the loop thread's (requests and replies are packed only there)
_NOT_AWAITABLE = frozenset({type(None), bool, int, float, str, bytes, list, dict, tuple})
_DENIED = frozenset({errno.EACCES, errno.EPERM, errno.ENETUNREACH})


def error_body(exc: BaseException) -> bytes:
    """The ERROR body for an exception raised by a handler."""
    err = exc if isinstance(exc, OskError) else RemoteError(str(exc), type(exc).__name__)
    return pack(err.to_wire())


class _Worker:
    """One plugin process's state: the socket, the plugin, in-flight tasks and calls."""

    def __init__(self, spec: dict[str, Any], zctx: zmq.Context[Any]) -> None:
        self.spec = spec
        self.name: str = spec["plugin"]
        self.max_size = int(spec["max_message_size"])
        self.call_timeout = float(spec["call_timeout"])
        self.zctx = zctx
        self.sock: LoopSocket | None = None
        self.plugin: Plugin | None = None
        self.plugin_class: type[Plugin] | None = None  # a standby loads it before its go
        self.promotion: asyncio.Future[bytes] | None = None  # what a standby waits for
        self.methods: dict[str, Callable[..., Any]] = {}
        self.tasks: set[asyncio.Task[Any]] = set()
        self.pending: dict[int, asyncio.Future[tuple[Kind, bytes]]] = {}
        self.ids = itertools.count(1)
        self.stopping = asyncio.Event()
        self.broken = False
        self.beat = _map_beat(spec.get("beat_fd"))  # heartbeats go there, not as frames
        self.tracer: Any = None  # an OpenTelemetry tracer when [tracing] is on
        self.spans: dict[int, Any] = {}  # request id -> its handler's span
        tracing = spec.get("tracing")
        if tracing:
            from osk_daemon.observability.tracing import make_provider

            provider = make_provider(
                tracing["exporter"], self.name, tracing.get("file"), tracing["sample_ratio"]
            )
            self.tracer = provider.get_tracer("osk_daemon.worker") if provider else None

    def send(self, kind: Kind, body: bytes = b"", id: int = 0, **header: Any) -> None:
        """Queue a frame; never blocks (the socket's send queue is unbounded)."""
        assert self.sock is not None
        if not self.sock.send((encode_header(kind, id, **header), body)):
            log.warning("could not send a %s frame to the daemon", kind.name)

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

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
        sock = self.sock = LoopSocket(raw, self.on_frames, name="daemon")
        orphans = OrphanWatch(
            raw,
            float(self.spec.get("orphan_timeout", 0)),
            on_orphaned=self.stopping.set,
            on_reconnected=lambda: self.send(Kind.HEARTBEAT),
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
            self.send(Kind.HELLO, hello, target=self.name)
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
                self.send(Kind.HELLO, hello, target=self.name)
            heartbeat = loop.create_task(self.heartbeat_loop(), name="heartbeat")
            heartbeat.add_done_callback(self.on_loop_died)
            if await self.load_and_start():
                self.send(Kind.READY, pack({"methods": sorted(self.methods)}))
                await self.stopping.wait()
                await self.stop_plugin()
            elif not self.stopping.is_set():
                code = 1
            if self.broken:
                code = 1
        finally:
            tasks = [*self.tasks] if heartbeat is None else [heartbeat, *self.tasks]
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
        self.send(Kind.START_FAILED, pack({**exc.to_wire(), "traceback": trace}))
        return False

    async def start_plugin(self) -> None:
        cls = self.plugin_class or self.load_class()
        ctx = Context(
            self.name,
            int(self.spec["instance"]),
            str(self.spec["version"]),
            self.spec.get("config") or {},
            link=self,
        )
        plugin = cls(ctx)
        methods = rpc_methods(plugin)
        if "state" in self.spec:  # handed over by the previous version, over ZeroMQ
            await plugin.import_state(self.spec["state"])
        elif self.spec.get("state_file"):
            saved = _read_state(self.spec["state_file"], self.max_size)
            if saved is not None:
                await plugin.import_state(saved)
        await plugin.start()
        self.plugin, self.methods = plugin, methods

    async def stop_plugin(self) -> None:
        assert self.plugin is not None
        try:
            await self.plugin.stop()
        except Exception:
            log.exception("plugin %r raised in stop()", self.name)
        if self.spec.get("state_file"):
            try:
                _write_state(self.spec["state_file"], await self.plugin.export_state())
            except Exception:
                log.exception("plugin %r: could not save its state", self.name)

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
        interval = float(self.spec["heartbeat_interval"])
        beat = self.beat
        while True:
            if beat is not None:
                write_beat(beat, time.monotonic())  # one store; the daemon reads it
            else:
                self.send(Kind.HEARTBEAT)
            await asyncio.sleep(interval)

    def on_frames(self, sock: LoopSocket, frames: list[bytes]) -> None:
        """One message from the daemon: one ``(header, body)`` pair or a batch of them,
        handled in order; a bad header drops the rest of the message."""
        try:
            check_batch(frames, 0)
        except FrameError as exc:
            log.warning("dropped a bad frame from the daemon: %s", exc)
            return
        for i in range(0, len(frames), 2):
            try:
                header = decode_header(frames[i])
            except FrameError as exc:
                log.warning("dropped a bad frame from the daemon: %s", exc)
                return
            try:
                self.dispatch(header, frames[i + 1])
            except Exception:
                log.exception("failed to handle a %s frame; dropped it", header.kind.name)

    def dispatch(self, header: Header, body: bytes) -> None:
        if header.kind is Kind.REQUEST:
            self.on_request(header, body)
        elif header.kind in (Kind.REPLY, Kind.ERROR):
            fut = self.pending.get(header.id)
            if fut is None or fut.done():
                log.debug("dropped a %s for unknown call id %d", header.kind.name, header.id)
            else:
                fut.set_result((header.kind, body))
        elif header.kind is Kind.HEALTH:
            self.spawn(self.answer_health(header.id))
        elif header.kind is Kind.STOP:
            self.stopping.set()
        elif header.kind is Kind.EVENT and header.method in _DEPENDENCY_EVENTS:
            self.on_dependency_event(header.method, body)
        else:
            log.warning("dropped an unexpected %s frame", header.kind.name)

    def on_dependency_event(self, event: str, body: bytes) -> None:
        """``dependency_down``/``dependency_up`` from the daemon: update the context and
        run the plugin's hook of that name in its own task (errors are logged)."""
        if self.plugin is None:
            return
        try:
            data = unpack(body, 65536)
            dependency, optional = str(data["dependency"]), bool(data.get("optional"))
        except (FrameError, KeyError, TypeError) as exc:
            log.warning("dropped a malformed %s event: %s", event, exc)
            return
        down = self.plugin.ctx.dependencies_down
        if event == "dependency_down":
            down.add(dependency)
        else:
            down.discard(dependency)
        self.spawn(self.run_hook(event, dependency, optional))

    async def run_hook(self, event: str, dependency: str, optional: bool) -> None:
        try:
            result = getattr(self.plugin, event)(dependency, optional)
            if inspect.isawaitable(result):
                await result
        except Exception:
            log.exception("plugin %r raised in %s(%r)", self.name, event, dependency)

    def on_request(self, header: Header, body: bytes) -> None:
        if header.deadline and time.monotonic() > header.deadline:
            log.debug("dropped request %d for %r: deadline passed", header.id, header.method)
            return
        try:
            args = unpack(body, self.max_size)
        except FrameError as exc:
            self.answer(Kind.ERROR, header.id, pack(exc.to_wire()))
            return
        handler = self.find_handler(header.method)
        if handler is None:
            self.answer(Kind.ERROR, header.id, pack(self.not_found(header.method).to_wire()))
            return
        if self.tracer is not None and header.meta and "traceparent" in header.meta:
            from osk_daemon.observability.tracing import handle_span

            self.spans[header.id] = handle_span(self.tracer, header.method, header.meta)
        try:  # a sync handler runs right here; an async one only builds its coroutine
            if type(args) is dict:  # what split_args does with a map, without its tuples
                result = handler(**args)
            else:
                pos, kw = split_args(args)
                result = handler(*pos, **kw)
        except Exception as exc:
            self.reply_error(header, exc)
            return
        if type(result) in _NOT_AWAITABLE or not inspect.isawaitable(result):
            self.reply(header, result)
        else:
            self.spawn(self.finish_request(header, result))

    def find_handler(self, method: str) -> Callable[..., Any] | None:
        if self.plugin is None:
            return None
        if method.startswith(RESERVED_PREFIX):
            reserved: dict[str, Callable[..., Any]] = {
                "osk.export_state": self.plugin.export_state,
                "osk.methods": lambda: sorted(self.methods),
            }
            return reserved.get(method)
        return self.methods.get(method)

    def not_found(self, method: str) -> OskError:
        if self.plugin is None:
            return Unavailable(f"plugin {self.name!r} is still starting; retry after READY")
        have = ", ".join(sorted(self.methods)) or "no methods"
        return MethodNotFound(f"plugin {self.name!r} has no method {method!r} (it has: {have})")

    async def finish_request(self, header: Header, awaitable: Any) -> None:
        try:
            result = await awaitable
        except Exception as exc:
            self.reply_error(header, exc)
        else:
            self.reply(header, result)

    def reply(self, header: Header, result: Any) -> None:
        try:
            body = _enc.body(result)
            if len(body) > self.max_size:
                raise FrameError(
                    f"the result of {header.method!r} is {len(body)} bytes, over the limit "
                    f"of {self.max_size}"
                )
        except Exception as exc:
            self.answer(Kind.ERROR, header.id, error_body(exc))
        else:
            self.answer(Kind.REPLY, header.id, body)

    def answer(self, kind: Kind, id: int, body: bytes) -> None:
        """Post the REPLY or ERROR to request ``id``; it leaves with the other answers of
        this loop pass, in one message (see ``endpoint``)."""
        assert self.sock is not None
        self.sock.post(b"", encode_reply_header(kind, id), body)
        if self.spans:
            span = self.spans.pop(id, None)
            if span is not None:
                if kind is Kind.ERROR:
                    from opentelemetry.trace import Status, StatusCode

                    span.set_status(Status(StatusCode.ERROR))
                span.end()

    def pack_limited(self, value: Any, what: str) -> bytes:
        body = pack(value)
        if len(body) > self.max_size:
            raise FrameError(f"{what} is {len(body)} bytes, over the limit of {self.max_size}")
        return body

    def reply_error(self, header: Header, exc: Exception) -> None:
        log.warning("handler %r raised %s: %s", header.method, type(exc).__name__, exc)
        log.debug("traceback of %r", header.method, exc_info=exc)
        self.answer(Kind.ERROR, header.id, error_body(exc))
        if isinstance(exc, OSError) and exc.errno in _DENIED:
            # what the kernel refused (Landlock EACCES, seccomp EPERM) reaches the daemon's
            # event stream as far as the plugin lets it surface
            report = {"message": f"{header.method}: {exc}", "errno": exc.errno}
            self.send(Kind.EVENT, pack(report), method="sandbox:violation")

    async def answer_health(self, id: int) -> None:
        if self.plugin is None:
            status, detail = "unhealthy", "plugin is still starting"
        else:
            try:
                health = to_health(await self.plugin.health())
                status, detail = health.status.value, health.detail
            except Exception as exc:
                status, detail = "unhealthy", f"health() raised {type(exc).__name__}: {exc}"
        self.send(Kind.HEALTH_REPLY, pack({"status": status, "detail": detail}), id)

    async def call(self, plugin: str, method: str, args: Any, timeout: float | None) -> Any:
        timeout = self.call_timeout if timeout is None else timeout
        body = self.pack_limited(args, f"the arguments for {plugin}.{method}")
        id = next(self.ids)
        fut: asyncio.Future[tuple[Kind, bytes]] = asyncio.get_running_loop().create_future()
        self.pending[id] = fut
        try:
            assert self.sock is not None
            header = _enc.request(id, plugin, method, time.monotonic() + timeout, None)
            self.sock.post(b"", header, body)
            async with asyncio.timeout(timeout + CALL_GRACE):
                kind, reply = await fut
        except TimeoutError:
            raise DeadlineExceeded(
                f"call to {plugin}.{method} got no answer within {timeout:g}s"
            ) from None
        finally:
            self.pending.pop(id, None)
        if kind is Kind.REPLY:
            return unpack(reply, self.max_size)
        raise error_from_wire(unpack(reply, self.max_size))

    def emit(self, event: str, data: Any) -> None:
        self.send(Kind.EVENT, self.pack_limited(data, f"event {event!r}"), method=event)


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
