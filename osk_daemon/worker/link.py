"""The plugin process's end of its conversation with the daemon, once the socket is up.

Why: the worker runtime (``worker.runtime``) owns the process — its socket, signals,
heartbeats, the plugin's start and stop, a standby's wait for its go. What crosses the wire
for the running plugin is another concern with its own state: which requests are in
flight, which of our own calls wait for an answer, which spans are open. ``DaemonLink``
holds that state and is the plugin's ``ContextLink`` (``worker.context``), so the plugin's
``ctx.call`` and ``ctx.emit`` go out through the same object that answers requests.

How (theory of operation):

1. ``on_frames`` is the socket's callback: one message is one ``(header, body)`` pair or
   a batch of them, handled in order; a bad header drops the rest of the message, and a
   frame whose handling raised is logged and dropped.
2. REQUEST: a request past its deadline is dropped unanswered; otherwise its handler (an
   ``@rpc`` method, or a reserved ``osk.*`` one) runs inline when it is sync, or as a task
   when it returns an awaitable, and the request gets exactly one REPLY or ERROR. Answers
   are posted, so the answers of one loop pass leave in one message (``ipc.endpoint``).
   Before the plugin has started, every request gets ``Unavailable``. An ``OSError`` the
   kernel refused (``EACCES``, ``EPERM``, ``ENETUNREACH``) is also reported as a
   ``sandbox:violation`` event.
3. REPLY and ERROR resolve our own outgoing ``call`` futures by id; a late or unknown one
   is dropped. HEALTH runs ``health()`` in a task (and first calls ``on_probe``, once: the
   daemon probes, so the worker's own checks stop); ``dependency_down``/``dependency_up``
   events update the context and run the plugin's hook of that name in a task. STOP calls
   ``on_stop``.
4. Every task started here is in ``tasks``, which the runtime cancels at shutdown.
"""

from __future__ import annotations

import asyncio
import errno
import inspect
import itertools
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

from osk_daemon.errors import (
    DeadlineExceeded,
    FrameError,
    MethodNotFound,
    OskError,
    RemoteError,
    Unavailable,
    error_from_wire,
)
from osk_daemon.ipc.codec import (
    Encoder,
    Header,
    Kind,
    check_batch,
    decode_header,
    encode_header,
    encode_reply_header,
    pack,
    routing_meta,
    unpack,
)
from osk_daemon.ipc.endpoint import LoopSocket
from osk_daemon.worker.sdk import RESERVED_PREFIX, Plugin, split_args, to_health

__all__ = ["CALL_GRACE", "DaemonLink", "error_body"]

CALL_GRACE = 0.5  # seconds past a call's deadline before giving up locally

log = logging.getLogger("osk.worker")

_DEPENDENCY_EVENTS = frozenset({"dependency_down", "dependency_up"})
_enc = Encoder()  # the loop thread's (requests and replies are packed only there)
_NOT_AWAITABLE = frozenset({type(None), bool, int, float, str, bytes, list, dict, tuple})
_DENIED = frozenset({errno.EACCES, errno.EPERM, errno.ENETUNREACH})


def error_body(exc: BaseException) -> bytes:
    """The ERROR body for an exception raised by a handler."""
    err = exc if isinstance(exc, OskError) else RemoteError(str(exc), type(exc).__name__)
    return pack(err.to_wire())


class DaemonLink:
    """The running plugin's messaging state: its socket, handlers, tasks, calls and spans.

    ``sock`` is set by the runtime once it is connected; ``plugin`` and ``methods`` once
    the plugin has started (until then requests are answered with ``Unavailable``).
    ``on_stop`` is called for a STOP frame. ``tracer`` is an OpenTelemetry tracer, or None.
    """

    def __init__(
        self,
        name: str,
        max_size: int,
        call_timeout: float,
        on_stop: Callable[[], None],
        tracer: Any = None,
    ) -> None:
        self.name = name
        self.max_size = max_size
        self.call_timeout = call_timeout
        self.on_stop = on_stop
        self.sock: LoopSocket | None = None
        self.plugin: Plugin | None = None
        self.methods: dict[str, Callable[..., Any]] = {}
        self.tasks: set[asyncio.Task[Any]] = set()
        self.pending: dict[int, asyncio.Future[tuple[Kind, bytes]]] = {}
        self.ids = itertools.count(1)
        self.tracer = tracer
        self.spans: dict[int, Any] = {}  # request id -> its handler's span
        self.on_probe: Callable[[], object] | None = None  # set while we check ourselves
        self.state_answer: asyncio.Future[bytes] | None = None  # while we ask for a hand-over

    def send(self, kind: Kind, body: bytes = b"", id: int = 0, **header: Any) -> None:
        """Queue a frame; never blocks (the socket's send queue is unbounded)."""
        assert self.sock is not None
        if not self.sock.send((encode_header(kind, id, **header), body)):
            log.warning("could not send a %s frame to the daemon", kind.name)

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

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
            if self.on_probe is not None:  # the daemon probes again: our own checks stop
                self.on_probe()
                self.on_probe = None
            self.spawn(self.answer_health(header.id))
        elif header.kind is Kind.STOP:
            self.on_stop()
        elif header.kind is Kind.EVENT and header.method in _DEPENDENCY_EVENTS:
            self.on_dependency_event(header.method, body)
        elif header.kind is Kind.STATE:
            answer = self.state_answer
            if answer is None or answer.done():
                log.warning("dropped a hand-over state nobody asked for")
            else:
                answer.set_result(body)
        else:
            log.warning("dropped an unexpected %s frame", header.kind.name)

    async def ask_state(self, timeout: float) -> bytes:
        """The hand-over state the daemon sends for our STATE frame (``supervisor.handover``),
        packed; b"" for none, or when no answer came within ``timeout`` seconds."""
        answer = self.state_answer = asyncio.get_running_loop().create_future()
        self.send(Kind.STATE)
        try:
            return await asyncio.wait_for(answer, timeout)
        except TimeoutError:
            log.warning("no hand-over state from the daemon in %gs; starting without it", timeout)
            return b""
        finally:
            self.state_answer = None

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

    async def check_health(self) -> tuple[str, str]:
        """The plugin's ``health()`` as ``(status, detail)``; what it raised is unhealthy."""
        if self.plugin is None:
            return "unhealthy", "plugin is still starting"
        try:
            health = to_health(await self.plugin.health())
        except Exception as exc:
            return "unhealthy", f"health() raised {type(exc).__name__}: {exc}"
        return health.status.value, health.detail

    async def answer_health(self, id: int) -> None:
        status, detail = await self.check_health()
        self.send(Kind.HEALTH_REPLY, pack({"status": status, "detail": detail}), id)

    async def call(
        self, plugin: str, method: str, args: Any, timeout: float | None, key: str | None = None
    ) -> Any:
        timeout = self.call_timeout if timeout is None else timeout
        body = self.pack_limited(args, f"the arguments for {plugin}.{method}")
        id = next(self.ids)
        fut: asyncio.Future[tuple[Kind, bytes]] = asyncio.get_running_loop().create_future()
        self.pending[id] = fut
        try:
            assert self.sock is not None
            meta = routing_meta(key=key)
            header = _enc.request(id, plugin, method, time.monotonic() + timeout, meta)
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
