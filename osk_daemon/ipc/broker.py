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

Bodies are never unpacked here: the broker only reads headers, and a reply's header is
the codec's 11-byte reply form, read with one ``struct`` call. What becomes of a request
once read — the instance it goes to, its queue and deadline, its one answer and what that
counts as — is the business of ``inflight.InFlight``: the broker hands it every REQUEST,
with the caller's deadline or the default, and every reply of a bound worker. The route
tables it picks instances from (``routing``) are the broker's: what the supervisor says
about instances (spawned, ready, version, draining, gone) changes them here.

Both sockets are read from the asyncio loop (``endpoint.RouterEndpoint``) and share one
``FlushGroup``: what a pass over one socket routes is posted, and leaves as one batch per
peer when the pass ends (see ``endpoint``); requests in a batch that could not be sent
go back to ``InFlight.undeliverable``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import zmq

from osk_daemon.errors import FrameError
from osk_daemon.ipc.codec import (
    Header,
    Kind,
    check_batch,
    decode_header,
    decode_reply_header,
    unpack,
)
from osk_daemon.ipc.endpoint import FlushGroup, LoopSocket, RouterEndpoint
from osk_daemon.ipc.inflight import BrokerStats, InFlight
from osk_daemon.ipc.routing import InstanceKey, PluginRoutes, Route
from osk_daemon.rollout.analysis import Recorder
from osk_daemon.rollout.traffic import TrafficSplit

if TYPE_CHECKING:  # opentelemetry is imported only when tracing is on
    from osk_daemon.observability.tracing import RpcTracer

__all__ = ["Broker", "BrokerStats", "InstanceKey", "WorkerListener"]

log = logging.getLogger("osk.broker")

WorkerListener = Callable[[InstanceKey, Header, bytes], None]

_WORKER_KINDS = frozenset(
    {
        Kind.READY,
        Kind.HEARTBEAT,
        Kind.EVENT,
        Kind.HEALTH_REPLY,
        Kind.HEALTH_REPORT,
        Kind.START_FAILED,
        Kind.STATE,
    }
)
_MAX_STRAYS = 1024


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
        self._listener = listener
        self._max = max_message_size
        self._default_timeout = default_timeout
        self._ctx = ctx or zmq.Context.instance()
        self._plugins: dict[str, PluginRoutes] = {}
        requests = self._requests = InFlight(self._plugins)
        self.stats = requests.stats  # the same object: frames dropped here count there too
        # bound once, so the hot path reaches them with no hop through ``_requests``
        self._accept_request = requests.accept
        self._reply = requests.reply
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
            on_undeliverable=requests.undeliverable,
        )
        self._tokens: dict[str, InstanceKey] = {}
        self._strays: set[bytes] = set()  # unbound peers already told to stop
        self._by_rid: dict[bytes, Route] = {}

    @property
    def tracer(self) -> RpcTracer | None:
        """The RPC tracer, set by the supervisor when tracing is on (spans: ``inflight``)."""
        return self._requests.tracer

    @tracer.setter
    def tracer(self, tracer: RpcTracer | None) -> None:
        self._requests.tracer = tracer

    # ---- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        """Start reading the socket from the running asyncio loop."""
        loop = asyncio.get_running_loop()
        self._requests.start(loop)
        self._clients.start(loop)
        self._workers.start(loop)

    def close(self) -> None:
        """Answer everything pending with ``unavailable`` and close the socket."""
        self._requests.close()
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
            self._requests.flush_queue(key[0])

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
        self._requests.flush_queue(plugin)

    def set_recorder(self, plugin: str, recorder: Recorder | None) -> None:
        """Record every answered call of ``plugin`` (version, latency, ok) into ``recorder``."""
        self._plugins.setdefault(plugin, PluginRoutes()).recorder = recorder

    def drain(self, key: InstanceKey) -> asyncio.Future[None]:
        """Send instance ``key`` no new requests; the future resolves once the requests it
        has in flight are answered (at once if it has none)."""
        return self._requests.drain(self._route_of(key))

    def plugin_metrics(
        self,
    ) -> Iterator[tuple[str, dict[str, int], list[tuple[str, float]], float]]:
        """Per plugin: calls by outcome, latency buckets (cumulative) and latency sum."""
        for plugin, entry in sorted(self._plugins.items()):
            yield plugin, dict(entry.outcomes), entry.latency.cumulative(), entry.latency.sum

    def in_flight(self, key: InstanceKey) -> int:
        """Requests instance ``key`` has been sent and not yet answered."""
        route = self._route_of(key)
        return route.in_flight if route is not None else 0

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
            self._requests.refuse_queued(plugin)

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
        self._requests.fail_route(route, f"{key[0]}/{key[1]} {reason} during the request")

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

    def _route_of(self, key: InstanceKey) -> Route | None:
        entry = self._plugins.get(key[0])
        return entry.routes.get(key[1]) if entry else None
