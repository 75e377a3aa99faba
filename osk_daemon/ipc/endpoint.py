"""ZeroMQ sockets read from the asyncio loop, without pyzmq's asyncio layer.

Receiving: ZMQ_FD is edge-triggered: it signals "something changed", not "a message
waits". So a wake-up drains while ZMQ_EVENTS says a message waits (at most
``_DRAIN_FRAMES`` frames per pass, yielding to other callbacks between passes; asking
ZMQ_EVENTS costs a quarter of the EAGAIN exception a blind ``recv`` would raise, but the
first ``recv`` of a pass does not ask: the fd fired or ZMQ_EVENTS said so, and a message
is nearly always there, so asking would only add a call per message), and
after every send ZMQ_EVENTS is read again and a drain scheduled if a message waits,
because a send can consume the edge of a pending read. Each message is handed over whole
(``on_frames(socket, frames)``); it may be a batch of pairs (see ``codec``).

Sending: ``post`` queues one ``(header, body)`` pair for a peer; everything posted during
one loop pass leaves as one ZeroMQ message per peer when the pass ends (a peer's batch
leaves as soon as it holds ``SEND_BATCH`` pairs, so the next stage starts early). That
is where the throughput comes from: ZeroMQ flushes a pipe, and wakes its I/O thread with
a syscall, once per message, whatever the number of frames. The pass ends when a drain
of any socket of the same ``FlushGroup`` returns (the broker's two sockets share one, so
requests read from callers are on their way to the workers as soon as the read is done),
or, for posts made outside a drain (timers, tasks), in a callback scheduled with
``call_soon``. ``send`` sends one message at once (control frames), after what was posted
before it. Sending never blocks: a full queue or a vanished peer (ROUTER_MANDATORY) is
reported as ``False`` by ``send``, and for a posted batch to ``on_undeliverable(peer,
tags, frames, errno)``: the tag given to ``post`` for each pair (0 for none) and the
batch's frames, so that what did not leave can be sent again.

This is the hot path of every call, so it avoids pyzmq's conveniences that cost
microseconds per frame: flags are plain ints (enum arithmetic is slow), frames are sent
with the Cython ``Socket.send`` (pyzmq's Python wrapper only adds DRAFT-socket options),
and received as zero-copy frames whose ``more`` flag replaces a ``getsockopt(RCVMORE)``.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable, Sequence
from typing import Any, cast

import zmq
import zmq.backend

from osk_daemon.ipc.codec import SEND_BATCH

log = logging.getLogger("osk.ipc")

_DRAIN_FRAMES = 4 * SEND_BATCH  # about two full batches per pass
_BATCH_FRAMES = 2 * SEND_BATCH
_NOBLOCK = int(zmq.NOBLOCK)
_MORE_NOBLOCK = int(zmq.SNDMORE) | _NOBLOCK
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)
_send_frame: Callable[[zmq.Socket[bytes], bytes, int], Any] = zmq.backend.Socket.send

Undeliverable = Callable[[bytes, list[int], list[bytes], int], None]


class FlushGroup:
    """Sockets whose posted pairs leave together at the end of a loop pass."""

    def __init__(self) -> None:
        self._dirty: list[LoopSocket] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._draining = False  # a member's drain runs and flushes when it ends
        self._scheduled = False

    def _mark(self, sock: LoopSocket) -> None:
        self._dirty.append(sock)
        if not self._draining and not self._scheduled and self._loop is not None:
            self._scheduled = True
            self._loop.call_soon(self.flush)

    def flush(self) -> None:
        """Send everything posted on the group's sockets."""
        self._scheduled = False
        while self._dirty:
            dirty, self._dirty = self._dirty, []
            for sock in dirty:
                sock.flush()


class LoopSocket:
    """A socket whose incoming messages are handed to ``on_frames`` from the loop."""

    def __init__(
        self,
        sock: zmq.Socket[bytes],
        on_frames: Callable[[LoopSocket, list[bytes]], None],
        *,
        name: str,
        group: FlushGroup | None = None,
        on_undeliverable: Undeliverable | None = None,
    ) -> None:
        self.name = name
        self.sock = sock
        self._on_frames = on_frames
        self._on_undeliverable = on_undeliverable
        self._fd = cast(int, sock.getsockopt(zmq.FD))
        self._routed = sock.getsockopt(zmq.TYPE) == zmq.ROUTER
        self._group = group if group is not None else FlushGroup()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._scheduled = False
        self._draining = False
        self._out: dict[bytes, list[bytes]] = {}  # peer (b"" on a DEALER) -> frames
        self._tags: dict[bytes, list[int]] = {}
        self._dirty = False

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._group._loop = loop
        loop.add_reader(self._fd, self._drain)
        self._schedule()
        if self._dirty:
            self._group._mark(self)

    def close(self, linger: int = 0) -> None:
        """Send what was posted, then close (``linger`` ms to let queued frames leave)."""
        if self.sock.closed:
            return
        self._send_posted()
        if self._loop is not None:
            self._loop.remove_reader(self._fd)
        self.sock.close(linger)

    # ---- sending -----------------------------------------------------------------------

    def post(self, peer: bytes, header: bytes, body: bytes, tag: int = 0) -> None:
        """Queue one pair for ``peer`` (its routing id on a ROUTER, b"" on a DEALER) to
        leave at the end of this loop pass; ``tag`` comes back to ``on_undeliverable`` if
        it cannot. Cost: two list appends (three with ``on_undeliverable``)."""
        frames = self._out.get(peer)
        if frames is None:
            frames = self._out[peer] = []
            if not self._dirty:
                self._dirty = True
                self._group._mark(self)
        frames.append(header)
        frames.append(body)
        if self._on_undeliverable is not None:
            tags = self._tags.get(peer)
            if tags is None:
                self._tags[peer] = [tag]
            else:
                tags.append(tag)
        if len(frames) >= _BATCH_FRAMES:
            del self._out[peer]
            self._send_batch(peer, frames, self._tags.pop(peer, None))

    def send(self, parts: Sequence[bytes]) -> bool:
        """Send one multipart message now, after anything posted; False if it could not
        be queued."""
        self._send_posted()
        send = self.sock.send
        try:
            last = len(parts) - 1
            for i, part in enumerate(parts):
                send(part, _MORE_NOBLOCK if i < last else _NOBLOCK)
        except zmq.ZMQError as exc:
            log.debug("%s: send failed: %s", self.name, exc)
            return False
        finally:
            self._check_readable()
        return True

    def flush(self) -> None:
        """Send what was posted, one message per peer."""
        self._send_posted()
        self._check_readable()

    def _send_posted(self) -> None:
        self._dirty = False
        if not self._out:
            return
        out, self._out = self._out, {}
        tags = self._tags
        for peer, frames in out.items():
            self._send_batch(peer, frames, tags.pop(peer, None) if tags else None)

    def _send_batch(self, peer: bytes, frames: list[bytes], tags: list[int] | None) -> None:
        sock = self.sock
        if sock.closed:
            return
        send = _send_frame
        try:
            # ROUTER_MANDATORY and the high-water mark are checked on the first frame
            # only; once that is accepted, ZeroMQ takes the rest of the message
            if self._routed:
                send(sock, peer, _MORE_NOBLOCK)
            for frame in itertools.islice(frames, len(frames) - 1):
                send(sock, frame, _MORE_NOBLOCK)
            send(sock, frames[-1], _NOBLOCK)
        except zmq.ZMQError as exc:
            log.debug("%s: a batch of %d could not be sent: %s", self.name, len(frames), exc)
            if self._on_undeliverable is not None and tags:
                self._on_undeliverable(peer, tags, frames, exc.errno or 0)

    # ---- receiving ---------------------------------------------------------------------

    def _check_readable(self) -> None:
        if self._draining or self._scheduled or self.sock.closed:
            return
        if cast(int, self.sock.getsockopt(_EVENTS)) & _POLLIN:
            self._schedule()

    def _schedule(self) -> None:
        if not self._scheduled and self._loop is not None and not self.sock.closed:
            self._scheduled = True
            self._loop.call_soon(self._drain)

    def _drain(self) -> None:
        self._scheduled = False
        sock = self.sock
        recv = sock.recv
        events = sock.get
        group = self._group
        outer = group._draining
        group._draining = self._draining = True
        try:
            budget = _DRAIN_FRAMES
            # called because the fd fired or ZMQ_EVENTS said so: a message is almost
            # always there, so the first recv does not ask first
            asked = True
            while budget > 0:
                if sock.closed:
                    return
                try:
                    if not asked and not cast(int, events(_EVENTS)) & _POLLIN:
                        break
                    asked = False
                    frame = recv(_NOBLOCK, copy=False)
                    parts = [frame.bytes]
                    while frame.more:
                        frame = recv(_NOBLOCK, copy=False)
                        parts.append(frame.bytes)
                except zmq.Again:
                    break
                except zmq.ZMQError as exc:
                    log.warning("%s: receive failed: %s", self.name, exc)
                    break
                budget -= len(parts)
                self._on_frames(self, parts)
            else:
                self._schedule()  # more may be waiting; let other callbacks run first
        finally:
            self._draining = False
            group._draining = outer
            if not outer:
                group.flush()


class RouterEndpoint(LoopSocket):
    """A bound ROUTER: frames arrive as ``[routing_id, header, body, ...]``."""

    def __init__(
        self,
        ctx: zmq.Context[Any],
        address: str,
        on_frames: Callable[[LoopSocket, list[bytes]], None],
        *,
        name: str,
        max_message_size: int,
        group: FlushGroup | None = None,
        on_undeliverable: Undeliverable | None = None,
    ) -> None:
        sock: zmq.Socket[bytes] = ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.setsockopt(zmq.MAXMSGSIZE, max_message_size + 8192)
        sock.setsockopt(zmq.SNDHWM, 100_000)
        sock.setsockopt(zmq.RCVHWM, 100_000)
        sock.bind(address)
        super().__init__(sock, on_frames, name=name, group=group, on_undeliverable=on_undeliverable)
        self.address = address

    def send_to(self, rid: bytes, header: bytes, body: bytes) -> bool:
        return self.send((rid, header, body))
