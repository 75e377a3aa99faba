"""The broker's requests in flight: each one's record, from the moment it is accepted to
its one answer.

Why: the broker (``ipc.broker``) owns the peers — its two sockets, who may send what,
which routing id is which instance — and what the supervisor tells it about them. A
request's life is another concern, with state of its own: the table of requests in
flight, their deadlines, the queues of those waiting for an instance, and what each answer
counts as (``BrokerStats``, every plugin's outcomes and latency, every instance's calls
and errors, a draining instance's future). ``InFlight`` holds that state; the broker hands
it every request it reads and every reply a bound worker sends.

How (theory of operation):

1. ``accept`` gives a request a broker-wide id and a ``_Pending`` record, which maps the
   id back to the caller's own id and routing id (or, for a call from inside the daemon,
   to its future). A request for a plugin nobody declared, or pinned to a version the
   plugin does not run, is answered at once with ``unavailable``. Otherwise ``_dispatch``
   posts it to the instance ``routing.pick`` chooses, or it waits in its plugin's queue
   for one (``flush_queue``) — unless the plugin accepts nothing (stopped, failed): then
   it is ``unavailable`` too. Every request that was not answered at once has its deadline
   in one ``deadlines.DeadlineTimer``, which answers it with ``timeout`` if it is still in
   flight then, so nothing hangs.
2. ``reply`` forwards a worker's REPLY or ERROR to whoever asked, with the caller's id
   restored; a reply for a request no longer in flight at that instance (answered, timed
   out, or sent again elsewhere) is late and dropped. Bodies are never unpacked.
3. ``fail`` answers a request with an error (``fail_route``: everything an instance that
   is gone had in flight; ``refuse_queued``: the queue of a plugin that stopped
   accepting). ``undeliverable`` takes back the requests of a batch that could
   not be sent: they never left, so they go back to the front of their plugin's queue.
4. Every answer is accounted once: at the instance it was in flight at (``_landed``), in
   its plugin's outcomes (``_count``) and in ``stats``. ``drain`` stops an instance
   taking requests and returns a future that its last request in flight resolves, when
   it lands or turns out never to have left (``_unsent``).

The route tables (``plugins``) belong to the broker, which shares them at construction;
this module reads them and keeps its routes' counters. Loop thread only.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import zmq

from osk_daemon.errors import DeadlineExceeded, OskError, PluginError, Unavailable
from osk_daemon.ipc.codec import Encoder, Kind, encode_reply_header, pack
from osk_daemon.ipc.deadlines import DeadlineTimer
from osk_daemon.ipc.endpoint import LoopSocket
from osk_daemon.ipc.routing import PluginRoutes, Route, has_version, pick

if TYPE_CHECKING:  # opentelemetry is imported only when tracing is on
    from osk_daemon.observability.tracing import RpcTracer

__all__ = ["BrokerStats", "InFlight"]


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


class InFlight:
    """The broker's requests from acceptance to answer. See the module docstring."""

    def __init__(self, plugins: dict[str, PluginRoutes]) -> None:
        self.stats = BrokerStats()
        self.tracer: RpcTracer | None = None
        self._plugins = plugins
        self._enc = Encoder()
        self._pending: dict[int, _Pending] = {}
        self._ids = itertools.count(1)
        self._deadlines = DeadlineTimer(
            self._expired, self._pending.__contains__, self._pending.__len__
        )

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Arm deadline timers on ``loop`` from now on; ``accept`` needs this first."""
        self._deadlines.start(loop)

    def close(self) -> None:
        """Answer everything in flight with ``unavailable``; nothing expires after this."""
        for bid in list(self._pending):
            self.fail(bid, Unavailable("the daemon is shutting down"))
        self._deadlines.close()

    def accept(
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
        """Take a request (from ``caller``, or a local one answered through ``future``):
        send it on, queue it, or answer it at once. O(1) plus the pick of an instance."""
        self.stats.requests += 1
        bid = next(self._ids)
        pending = self._pending[bid] = _Pending(
            caller, caller_id, target, method, deadline, meta, body, future, None, time.monotonic()
        )
        if self.tracer is not None:
            pending.span, pending.meta = self.tracer.begin_call(target, method, meta)
        entry = self._plugins.get(target)
        if entry is None:
            self.fail(bid, Unavailable(f"no plugin named '{target}'"))
            return
        if meta:
            pin = meta.get("version")
            if isinstance(pin, str) and pin and not has_version(entry, pin):
                have = ", ".join(sorted(set(entry.versions.values()))) or "none"
                self.fail(
                    bid, Unavailable(f"plugin '{target}' runs no version {pin} (it runs {have})")
                )
                return
        if not self._dispatch(bid, pending, entry):
            if not entry.accepting:
                self.fail(bid, Unavailable(f"plugin '{target}' is stopped"))
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

    def flush_queue(self, plugin: str) -> None:
        """Send ``plugin``'s queued requests, in order, while an instance is ready."""
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

    def drain(self, route: Route | None) -> asyncio.Future[None]:
        """Send ``route`` no new requests; the future resolves once the requests it has in
        flight are answered (at once if it has none, or if there is no such route)."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if route is None or route.in_flight <= 0:
            future.set_result(None)
            if route is not None:
                route.draining, route.ready = True, False
            return future
        route.draining, route.ready = True, False
        route.drained = future
        return future

    def refuse_queued(self, plugin: str) -> None:
        """``plugin`` accepts nothing now: answer its queued requests with ``unavailable``."""
        entry = self._plugins[plugin]
        while entry.queue:
            self.fail(entry.queue.popleft(), Unavailable(f"plugin '{plugin}' is stopped"))

    def reply(self, route: Route, kind: Kind, bid: int, body: bytes) -> None:
        """A REPLY or ERROR for request ``bid`` from the instance of ``route``."""
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

    def undeliverable(self, rid: bytes, bids: list[int], frames: list[bytes], err: int) -> None:
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
                    self.fail(bid, Unavailable(f"plugin '{plugin}' is stopped"))
                continue
            entry.queue.extendleft(reversed(requeued))
            if gone:
                self.flush_queue(plugin)

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

    def fail(self, bid: int, error: OskError) -> None:
        """Answer request ``bid`` with ``error``, if it is still in flight."""
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

    def fail_route(self, route: Route, message: str) -> None:
        """The instance of ``route`` is gone: answer what it had in flight with
        ``PluginError(message)``. O(requests in flight)."""
        for bid, pending in list(self._pending.items()):
            if pending.route is route:
                self.fail(bid, PluginError(message))

    def _expired(self, bid: int) -> None:
        pending = self._pending[bid]
        self.stats.timeouts += 1
        where = f" (at {pending.route.key[0]}/{pending.route.key[1]})" if pending.route else ""
        self.fail(
            bid,
            DeadlineExceeded(
                f"{pending.target}.{pending.method} got no answer before its deadline{where}"
            ),
        )
