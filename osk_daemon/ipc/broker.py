"""The daemon's broker: one ROUTER socket that every worker and outside caller talks to.

Theory of operation
-------------------
Two ROUTER sockets. Callers (outside clients; ``oskctl call`` comes in through the
control socket instead) use the client endpoint, which is 0600 like the control socket;
they may only send REQUESTs. Workers use the worker endpoint, which sandboxed plugins
running as another uid must be able to reach, so it is world-connectable (0666 in a
0711 runtime dir) and trusts nobody by default: a worker connects a DEALER and says
HELLO with the one-time token the daemon gave its process at spawn; only then is its
routing id bound to an instance ``(plugin, index)``, and only then are its REPLYs,
heartbeats and REQUESTs (calls to other plugins) accepted. A worker's routing id is its
token, so a daemon restarted over live plugins binds them before they reconnect
(``adopt``); any other peer that talks before saying HELLO is told to STOP.

A REQUEST gets a broker-wide id; the table ``_pending`` maps it back to the caller's own
id and routing id, so replies from a worker are forwarded to whoever asked, with the
caller's id restored. Bodies are never unpacked here: the broker only reads headers, and
a reply's header is the codec's 11-byte reply form, read with one ``struct`` call.

Requests go to the ready instance with the fewest requests in flight (``routing``).
While a plugin is starting or restarting (no instance ready yet but one on its way)
requests wait in a queue until their deadline; a plugin that is stopped, failed or unknown
is answered at once with ``unavailable``. Every request has a deadline (the caller's, or
the default); one heap and one timer (``deadlines.DeadlineTimer``) answer expired requests
with ``timeout``, so nothing hangs. When an instance is lost, its in-flight requests are
answered with an error at once.

Both sockets are read from the asyncio loop (``endpoint.RouterEndpoint``) and share one
``FlushGroup``: what a pass over one socket routes is posted, and leaves as one batch per
peer when the pass ends (see ``endpoint``). Requests in a batch that could not be sent
(the worker's socket is gone) never left: they are queued again, like requests that
found no instance ready.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import zmq

from osk_daemon.errors import (
    DeadlineExceeded,
    FrameError,
    OskError,
    PluginError,
    Unavailable,
)
from osk_daemon.ipc.codec import (
    Encoder,
    Header,
    Kind,
    check_batch,
    decode_header,
    decode_reply_header,
    encode_reply_header,
    pack,
    unpack,
)
from osk_daemon.ipc.deadlines import DeadlineTimer
from osk_daemon.ipc.endpoint import FlushGroup, LoopSocket, RouterEndpoint
from osk_daemon.ipc.routing import InstanceKey, PluginRoutes, Route, has_version, pick
from osk_daemon.rollout.analysis import Recorder
from osk_daemon.rollout.traffic import TrafficSplit

if TYPE_CHECKING:  # opentelemetry is imported only when tracing is on
    from osk_daemon.observability.tracing import RpcTracer

__all__ = ["Broker", "BrokerStats", "InstanceKey", "WorkerListener"]

log = logging.getLogger("osk.broker")

WorkerListener = Callable[[InstanceKey, Header, bytes], None]

_WORKER_KINDS = frozenset(
    {Kind.READY, Kind.HEARTBEAT, Kind.EVENT, Kind.HEALTH_REPLY, Kind.START_FAILED}
)
_MAX_STRAYS = 1024


@dataclass(slots=True)
class _Pending:
    caller: tuple[LoopSocket, bytes] | None  # None: a local call, through ``future``
    caller_id: int
    target: str
    method: str
    deadline: float
    meta: dict[str, Any] | None
    body: bytes
    future: asyncio.Future[tuple[Kind, bytes]] | None = None
    route: Route | None = None
    started: float = 0.0  # monotonic, when it arrived (latency for rollout analysis)
    span: Any = None  # its tracing span, when tracing is on


@dataclass
class BrokerStats:
    requests: int = 0
    replies: int = 0
    timeouts: int = 0
    unavailable: int = 0
    dropped_malformed: int = 0
    dropped_unauthenticated: int = 0
    late_replies: int = 0


class Broker:
    """Route frames between callers and plugin instances. See the module docstring."""

    def __init__(
        self,
        client_endpoint: str,
        worker_endpoint: str,
        listener: WorkerListener,
        *,
        max_message_size: int,
        default_timeout: float = 10.0,
        ctx: zmq.Context[Any] | None = None,
    ) -> None:
        self.stats = BrokerStats()
        self.tracer: RpcTracer | None = None  # set by the supervisor when tracing is on
        self._listener = listener
        self._max = max_message_size
        self._default_timeout = default_timeout
        self._ctx = ctx or zmq.Context.instance()
        self._enc = Encoder()
        group = self._group = FlushGroup()
        self._clients = RouterEndpoint(
            self._ctx,
            client_endpoint,
            self._on_client,
            name="clients",
            max_message_size=max_message_size,
            group=group,
        )
        self._workers = RouterEndpoint(
            self._ctx,
            worker_endpoint,
            self._on_worker,
            name="workers",
            max_message_size=max_message_size,
            group=group,
            on_undeliverable=self._undeliverable,
        )
        self._tokens: dict[str, InstanceKey] = {}
        self._strays: set[bytes] = set()  # unbound peers already told to stop
        self._by_rid: dict[bytes, Route] = {}
        self._plugins: dict[str, PluginRoutes] = {}
        self._pending: dict[int, _Pending] = {}
        self._ids = itertools.count(1)
        self._deadlines = DeadlineTimer(
            self._expired, self._pending.__contains__, self._pending.__len__
        )

    # ---- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        """Start reading the socket from the running asyncio loop."""
        loop = asyncio.get_running_loop()
        self._deadlines.start(loop)
        self._clients.start(loop)
        self._workers.start(loop)

    def close(self) -> None:
        """Answer everything pending with ``unavailable`` and close the socket."""
        for bid in list(self._pending):
            self._fail(bid, Unavailable("the daemon is shutting down"))
        self._deadlines.close()
        self._clients.close()
        self._workers.close()

    # ---- what the supervisor tells the broker -----------------------------------------

    def declare(self, plugin: str) -> None:
        """Make ``plugin`` known so requests to it queue instead of failing."""
        self._plugins.setdefault(plugin, PluginRoutes())

    def expect(self, token: str, key: InstanceKey) -> None:
        """A process for ``key`` was spawned with ``token``; its HELLO will bind it."""
        self._tokens[token] = key

    def adopt(self, key: InstanceKey, token: str) -> None:
        """Bind ``key`` to a process a previous daemon started. Its worker uses ``token``
        as its routing id, so its frames are known as soon as it reconnects; it takes
        requests once the supervisor calls ``set_ready``."""
        entry = self._plugins.setdefault(key[0], PluginRoutes())
        old = entry.routes.get(key[1])
        if old is not None:
            self._by_rid.pop(old.rid, None)
        rid = token.encode()
        route = Route(key, rid, self._workers, version=entry.versions.get(key[1], ""))
        entry.routes[key[1]] = route
        self._by_rid[rid] = route

    def set_ready(self, key: InstanceKey, ready: bool) -> None:
        route = self._route_of(key)
        if route is None:
            return
        route.ready = ready and not route.draining
        if route.ready:
            self._flush_queue(key[0])

    # ---- versions (rollouts) ------------------------------------------------------------

    def set_version(self, key: InstanceKey, version: str) -> None:
        """Instance ``key`` runs ``version`` (known before its process says HELLO)."""
        entry = self._plugins.setdefault(key[0], PluginRoutes())
        entry.versions[key[1]] = version
        route = entry.routes.get(key[1])
        if route is not None:
            route.version = version

    def set_split(
        self, plugin: str, weights: dict[str, int] | None, order: list[str] | None = None
    ) -> None:
        """Send ``plugin``'s requests by version weights; None: to any ready instance."""
        entry = self._plugins.setdefault(plugin, PluginRoutes())
        entry.split = None if weights is None else TrafficSplit(weights, order)
        self._flush_queue(plugin)

    def set_recorder(self, plugin: str, recorder: Recorder | None) -> None:
        """Record every answered call of ``plugin`` (version, latency, ok) into ``recorder``."""
        self._plugins.setdefault(plugin, PluginRoutes()).recorder = recorder

    def drain(self, key: InstanceKey) -> asyncio.Future[None]:
        """Send instance ``key`` no new requests; the future resolves once the requests it
        has in flight are answered (at once if it has none)."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        route = self._route_of(key)
        if route is None or route.in_flight <= 0:
            future.set_result(None)
            if route is not None:
                route.draining, route.ready = True, False
            return future
        route.draining, route.ready = True, False
        route.drained = future
        return future

    def plugin_metrics(
        self,
    ) -> Iterator[tuple[str, dict[str, int], list[tuple[str, float]], float]]:
        """Per plugin: calls by outcome, latency buckets (cumulative) and latency sum."""
        for plugin, entry in sorted(self._plugins.items()):
            yield plugin, dict(entry.outcomes), entry.latency.cumulative(), entry.latency.sum

    def counts(self, key: InstanceKey) -> tuple[int, int]:
        """(answered calls, errors) of instance ``key`` in its current life."""
        route = self._route_of(key)
        return (route.calls, route.errors) if route is not None else (0, 0)

    def forget(self, key: InstanceKey) -> None:
        """The instance is gone for good (not restarting): drop its route and version."""
        self.detach(key, "was removed")
        entry = self._plugins.get(key[0])
        if entry is not None:
            entry.versions.pop(key[1], None)

    def set_accepting(self, plugin: str, accepting: bool) -> None:
        """False: no instance of ``plugin`` is running or on its way; refuse at once."""
        entry = self._plugins.setdefault(plugin, PluginRoutes())
        entry.accepting = accepting
        if not accepting:
            while entry.queue:
                self._fail(entry.queue.popleft(), Unavailable(f"plugin '{plugin}' is stopped"))

    def detach(self, key: InstanceKey, reason: str) -> None:
        """The instance is gone: unbind it and fail its in-flight requests."""
        for token, k in list(self._tokens.items()):
            if k == key:
                del self._tokens[token]
        entry = self._plugins.get(key[0])
        route = entry.routes.pop(key[1], None) if entry else None
        if route is None:
            return
        self._by_rid.pop(route.rid, None)
        for bid, pending in list(self._pending.items()):
            if pending.route is route:
                self._fail(bid, PluginError(f"{key[0]}/{key[1]} {reason} during the request"))

    def send_to(self, key: InstanceKey, header: Header, body: bytes = b"") -> bool:
        """Send a control frame (HEALTH, STOP) to one instance; False if it is not bound."""
        route = self._route_of(key)
        if route is None:
            return False
        return route.endpoint.send((route.rid, header.encode(), body))

    def post_to(self, key: InstanceKey, header: Header, body: bytes = b"") -> bool:
        """``send_to``, but the frame leaves with what else this loop pass posts (health
        probes due at one grid point: one flush, one ZMQ_EVENTS check, not one per probe,
        which at 500 instances was a fifth of an idle daemon's CPU)."""
        route = self._route_of(key)
        if route is None:
            return False
        route.endpoint.post(route.rid, header.encode(), body)
        return True

    # ---- local calls (oskctl call, health of the daemon itself) ------------------------

    async def call(
        self,
        plugin: str,
        method: str,
        body: bytes,
        timeout: float | None = None,
        meta: dict[str, Any] | None = None,
    ) -> bytes:
        """Route a request from inside the daemon; returns the reply body or raises."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[tuple[Kind, bytes]] = loop.create_future()
        deadline = time.monotonic() + (timeout or self._default_timeout)
        self._accept_request(None, 0, plugin, method, deadline, meta, body, future)
        kind, reply = await future
        if kind is Kind.ERROR:
            from osk_daemon.errors import error_from_wire

            raise error_from_wire(unpack(reply, self._max))
        return reply

    # ---- frames in ---------------------------------------------------------------------

    def _malformed(self, exc: FrameError) -> None:
        self.stats.dropped_malformed += 1
        log.warning(
            "dropped a malformed frame (%d dropped so far): %s", self.stats.dropped_malformed, exc
        )

    def _on_client(self, ep: LoopSocket, frames: list[bytes]) -> None:
        """``[routing id, (header, body)...]`` from a caller: REQUESTs only. A malformed
        pair drops the rest of its message."""
        try:
            check_batch(frames, 1)
        except FrameError as exc:
            self._malformed(exc)
            return
        caller = (ep, frames[0])
        limit = self._max
        for i in range(1, len(frames), 2):
            body = frames[i + 1]
            try:
                header = decode_header(frames[i])
                if len(body) > limit:
                    raise FrameError(f"body of {len(body)} bytes exceeds {limit}")
            except FrameError as exc:
                self._malformed(exc)
                return
            kind, id_, target, method, deadline, meta = header
            if kind is not Kind.REQUEST:
                self.stats.dropped_malformed += 1
                log.warning(
                    "dropped %s on the client socket: callers may only send REQUEST",
                    kind.name,
                )
                continue
            if not deadline:
                deadline = time.monotonic() + self._default_timeout
            self._accept_request(caller, id_, target, method, deadline, meta, body, None)

    def _on_worker(self, ep: LoopSocket, frames: list[bytes]) -> None:
        """``[routing id, (header, body)...]`` from a worker; only HELLO before it is bound.
        Replies come in the reply form and take the short path."""
        try:
            check_batch(frames, 1)
        except FrameError as exc:
            self._malformed(exc)
            return
        rid = frames[0]
        route = self._by_rid.get(rid)
        limit = self._max
        for i in range(1, len(frames), 2):
            raw, body = frames[i], frames[i + 1]
            try:
                if len(body) > limit:
                    raise FrameError(f"body of {len(body)} bytes exceeds {limit}")
                reply = decode_reply_header(raw)
                header = decode_header(raw) if reply is None else None
            except FrameError as exc:
                self._malformed(exc)
                return
            if header is None:
                assert reply is not None
                if route is None:
                    self._unauthenticated(reply[0], ep, rid)
                else:
                    self._reply(route, reply[0], reply[1], body)
                continue
            kind = header.kind
            if kind is Kind.HELLO:
                self._hello(ep, rid, header, body)
                route = self._by_rid.get(rid)
            elif route is None:
                self._unauthenticated(kind, ep, rid)
            elif kind is Kind.REQUEST:
                self._request((ep, rid), header, body)
            elif kind is Kind.REPLY or kind is Kind.ERROR:
                self._reply(route, kind, header.id, body)
            elif kind in _WORKER_KINDS:
                self._tell(route.key, header, body)
            else:
                self.stats.dropped_malformed += 1
                log.warning("dropped %s: not a kind a worker may send", kind.name)

    def _unauthenticated(self, kind: Kind, ep: LoopSocket, rid: bytes) -> None:
        """A frame from a peer that is not bound. A worker that never said HELLO here is
        a stray (a plugin a previous daemon started and this one does not adopt, or one
        whose life already ended): it is told to STOP, once."""
        self.stats.dropped_unauthenticated += 1
        if rid in self._strays:
            return
        if len(self._strays) >= _MAX_STRAYS:
            self._strays.clear()
        self._strays.add(rid)
        log.warning("dropped %s from a peer that never said HELLO; told it to stop", kind.name)
        ep.send((rid, Header(Kind.STOP).encode(), b""))

    def _request(self, caller: tuple[LoopSocket, bytes], header: Header, body: bytes) -> None:
        deadline = header.deadline or time.monotonic() + self._default_timeout
        self._accept_request(
            caller, header.id, header.target, header.method, deadline, header.meta, body, None
        )

    def _hello(self, ep: LoopSocket, rid: bytes, header: Header, body: bytes) -> None:
        try:
            info = unpack(body, 4096)
            key = self._tokens.pop(str(info["token"])) if isinstance(info, dict) else None
        except (FrameError, KeyError):
            key = None
        if key is None:
            self.stats.dropped_unauthenticated += 1
            log.warning("refused a HELLO with a missing or unknown token")
            return
        entry = self._plugins.setdefault(key[0], PluginRoutes())
        old = entry.routes.get(key[1])
        if old is not None:
            self._by_rid.pop(old.rid, None)
        route = Route(key, rid, ep, version=entry.versions.get(key[1], ""))
        entry.routes[key[1]] = route
        self._by_rid[rid] = route
        self._tell(key, header, body)

    def _tell(self, key: InstanceKey, header: Header, body: bytes) -> None:
        """Hand a worker's frame to the supervisor. What was routed so far leaves first:
        a READY or HELLO may cost it milliseconds of bookkeeping (a rollout's next step),
        which the calls and replies read before it need not wait for."""
        self._group.flush()
        self._listener(key, header, body)

    # ---- requests and replies ---------------------------------------------------------

    def _accept_request(
        self,
        caller: tuple[LoopSocket, bytes] | None,
        caller_id: int,
        target: str,
        method: str,
        deadline: float,
        meta: dict[str, Any] | None,
        body: bytes,
        future: asyncio.Future[tuple[Kind, bytes]] | None,
    ) -> None:
        self.stats.requests += 1
        bid = next(self._ids)
        pending = self._pending[bid] = _Pending(
            caller, caller_id, target, method, deadline, meta, body, future, None, time.monotonic()
        )
        if self.tracer is not None:
            pending.span, pending.meta = self.tracer.begin_call(target, method, meta)
        entry = self._plugins.get(target)
        if entry is None:
            self._fail(bid, Unavailable(f"no plugin named '{target}'"))
            return
        if meta:
            pin = meta.get("version")
            if isinstance(pin, str) and pin and not has_version(entry, pin):
                have = ", ".join(sorted(set(entry.versions.values()))) or "none"
                self._fail(
                    bid, Unavailable(f"plugin '{target}' runs no version {pin} (it runs {have})")
                )
                return
        if not self._dispatch(bid, pending, entry):
            if not entry.accepting:
                self._fail(bid, Unavailable(f"plugin '{target}' is stopped"))
                return
            entry.queue.append(bid)
        self._deadlines.add(deadline, bid)

    def _dispatch(self, bid: int, pending: _Pending, entry: PluginRoutes) -> bool:
        route = pick(entry, pending.meta)
        if route is None:
            return False
        header = self._enc.request(
            bid, pending.target, pending.method, pending.deadline, pending.meta
        )
        route.endpoint.post(route.rid, header, pending.body, bid)
        pending.route = route
        pending.body = b""  # the worker has it now; do not keep large bodies alive
        route.in_flight += 1
        return True

    def _flush_queue(self, plugin: str) -> None:
        entry = self._plugins[plugin]
        while entry.queue:
            bid = entry.queue[0]
            pending = self._pending.get(bid)
            if pending is None:
                entry.queue.popleft()
                continue
            if not self._dispatch(bid, pending, entry):
                return
            entry.queue.popleft()

    def _reply(self, route: Route, kind: Kind, bid: int, body: bytes) -> None:
        pending = self._pending.get(bid)
        if pending is None or pending.route is not route:
            self.stats.late_replies += 1
            return
        del self._pending[bid]
        ok = kind is Kind.REPLY
        self._count(pending.target, "ok" if ok else "error")
        self._landed(route, pending, ok)
        self.stats.replies += 1
        self._answer(pending, kind, body)

    def _undeliverable(self, rid: bytes, bids: list[int], frames: list[bytes], err: int) -> None:
        """A batch could not be sent to ``rid``: its requests never left, so they go back
        to the front of their plugin's queue, as if no instance had been ready. A peer
        that is gone (EHOSTUNREACH: the process died, the supervisor does not know yet)
        takes no more requests, and the queue is offered to the other instances; a full
        one (EAGAIN) keeps its place and the requests wait for the next ready instance."""
        gone = err == zmq.EHOSTUNREACH
        back: dict[str, list[int]] = {}
        for i, bid in enumerate(bids):
            pending = self._pending.get(bid) if bid else None
            route = pending.route if pending is not None else None
            if pending is None or route is None or route.rid != rid:
                continue
            if gone:
                route.ready = False
            pending.route, pending.body = None, frames[2 * i + 1]
            self._unsent(route)
            back.setdefault(route.key[0], []).append(bid)
        for plugin, requeued in back.items():
            entry = self._plugins[plugin]
            if not entry.accepting:
                for bid in requeued:
                    self._fail(bid, Unavailable(f"plugin '{plugin}' is stopped"))
                continue
            entry.queue.extendleft(reversed(requeued))
            if gone:
                self._flush_queue(plugin)

    def _unsent(self, route: Route) -> None:
        """A request ``route`` was given did not leave: it is not in flight there."""
        route.in_flight -= 1
        if route.drained is not None and route.in_flight <= 0:
            if not route.drained.done():
                route.drained.set_result(None)
            route.drained = None

    def _landed(self, route: Route, pending: _Pending, ok: bool) -> None:
        """A request ``route`` had in flight is over: account for it."""
        route.in_flight -= 1
        route.calls += 1
        if not ok:
            route.errors += 1
        entry = self._plugins.get(route.key[0])
        if entry is not None:
            now = time.monotonic()
            entry.latency.observe(now - pending.started)
            if entry.recorder is not None:
                entry.recorder.record(route.version, now, now - pending.started, ok)
        if route.drained is not None and route.in_flight <= 0:
            if not route.drained.done():
                route.drained.set_result(None)
            route.drained = None

    def _count(self, plugin: str, outcome: str) -> None:
        """One answered call of ``plugin`` by outcome (ok, error, timeout, unavailable)."""
        entry = self._plugins.get(plugin)
        if entry is not None:
            entry.outcomes[outcome] += 1

    def _answer(self, pending: _Pending, kind: Kind, body: bytes) -> None:
        if pending.span is not None:
            where = f"{pending.route.key[0]}/{pending.route.key[1]}" if pending.route else ""
            pending.span, span = None, pending.span
            assert self.tracer is not None
            self.tracer.end_call(span, kind is Kind.REPLY, where)
        if pending.future is not None:
            if not pending.future.done():
                pending.future.set_result((kind, body))
        elif pending.caller is not None:
            ep, rid = pending.caller
            ep.post(rid, encode_reply_header(kind, pending.caller_id), body)

    def _fail(self, bid: int, error: OskError) -> None:
        pending = self._pending.pop(bid, None)
        if pending is None:
            return
        if isinstance(error, Unavailable):
            self.stats.unavailable += 1
        if pending.route is not None:
            self._landed(pending.route, pending, ok=False)
        if isinstance(error, Unavailable):
            self._count(pending.target, "unavailable")
        elif isinstance(error, DeadlineExceeded):
            self._count(pending.target, "timeout")
        else:
            self._count(pending.target, "error")
        self._answer(pending, Kind.ERROR, pack(error.to_wire()))

    # ---- deadlines --------------------------------------------------------------------

    def _expired(self, bid: int) -> None:
        pending = self._pending[bid]
        self.stats.timeouts += 1
        where = f" (at {pending.route.key[0]}/{pending.route.key[1]})" if pending.route else ""
        self._fail(
            bid,
            DeadlineExceeded(
                f"{pending.target}.{pending.method} got no answer before its deadline{where}"
            ),
        )

    def _route_of(self, key: InstanceKey) -> Route | None:
        entry = self._plugins.get(key[0])
        return entry.routes.get(key[1]) if entry else None
