"""Calling plugins from outside the daemon.

``Client`` is a blocking DEALER connected to the daemon's broker socket. Each call sends a
REQUEST with an absolute deadline; the broker answers every request (with the reply, or
with a ``timeout``/``unavailable`` error), so a call never waits past its deadline plus a
small grace. ``call_many`` pipelines a batch: it sends everything first, in messages of
up to ``SEND_BATCH`` requests (see ``codec``), each as soon as it is packed so the daemon
works on the first while the next is packed, then collects the answers in any order. A
malformed answer is dropped (logged); its call ends at the deadline.

    with Client("ipc:///run/osk/broker.sock") as client:
        client.call("echo", "echo", {"text": "hi"})

Arguments travel as msgpack: a dict becomes keyword arguments, a list positional ones.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Iterable, Sequence
from types import TracebackType
from typing import Any

import zmq
import zmq.backend

from osk_daemon.errors import DeadlineExceeded, FrameError, OskError, error_from_wire
from osk_daemon.ipc.codec import (
    DEFAULT_MAX_MESSAGE_SIZE,
    SEND_BATCH,
    Encoder,
    Kind,
    check_batch,
    decode_header,
    decode_reply_header,
    routing_meta,
    unpack,
)

log = logging.getLogger("osk.client")

_GRACE = 0.5
_NOBLOCK = int(zmq.NOBLOCK)
_SNDMORE = int(zmq.SNDMORE)
_RCVTIMEO = int(zmq.RCVTIMEO)
_send_frame = zmq.backend.Socket.send  # the Cython send, without pyzmq's Python wrapper
_BATCH_FRAMES = 2 * SEND_BATCH


class Client:
    """A blocking RPC client. Not thread-safe: use one per thread."""

    def __init__(
        self,
        endpoint: str,
        *,
        timeout: float = 10.0,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
    ) -> None:
        self.timeout = timeout
        self._max = max_message_size
        self._ctx = zmq.Context()
        self._sock: zmq.Socket[bytes] = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.MAXMSGSIZE, max_message_size + 8192)
        self._sock.setsockopt(zmq.SNDHWM, 0)
        self._sock.setsockopt(zmq.RCVHWM, 0)
        self._sock.connect(endpoint)
        self._ids = itertools.count(1)
        self._enc = Encoder()
        self._rcvtimeo = -1  # ZMQ_RCVTIMEO as last set (ms); -1, the default, waits forever

    def call(
        self,
        plugin: str,
        method: str,
        args: Any = None,
        *,
        timeout: float | None = None,
        version: str | None = None,
        key: str | None = None,
        instance: int | None = None,
    ) -> Any:
        """Call ``plugin.method(args)`` and return its result. ``version`` pins a version,
        ``key`` sticks the call to the version its earlier calls with that key went to
        during an A/B or canary split, ``instance`` prefers that instance.

        Raises the plugin's error (``RemoteError``, ``MethodNotFound``), ``Unavailable``
        or ``DeadlineExceeded``, all ``OskError``s; TypeError (nothing sent) for
        arguments msgpack cannot carry.
        """
        deadline = time.monotonic() + (timeout or self.timeout)
        rid = next(self._ids)
        body = self._enc.body(args)
        meta = routing_meta(version, key, instance)
        header = self._enc.request(rid, plugin, method, deadline, meta)
        _send_frame(self._sock, header, _SNDMORE)
        _send_frame(self._sock, body, 0)
        results: list[Any] = [None]
        self._collect({rid: 0}, results, deadline)
        result = results[0]
        if isinstance(result, OskError):
            raise result
        return result

    def call_many(
        self,
        calls: Iterable[tuple[str, str, Any]],
        *,
        timeout: float | None = None,
        version: str | None = None,
        key: str | None = None,
    ) -> list[Any]:
        """Send all calls at once, then collect; a failed call's slot holds its OskError."""
        deadline = time.monotonic() + (timeout or self.timeout)
        meta = routing_meta(version, key)
        order: dict[int, int] = {}
        request, body = self._enc.request, self._enc.body
        frames: list[bytes] = []
        for slot, (plugin, method, args) in enumerate(calls):
            rid = next(self._ids)
            order[rid] = slot
            frames.append(request(rid, plugin, method, deadline, meta))
            frames.append(body(args))
            if len(frames) == _BATCH_FRAMES:
                self._send_batch(frames)
                frames = []
        if frames:
            self._send_batch(frames)
        results: list[Any] = [None] * len(order)
        self._collect(order, results, deadline)
        return results

    def _collect(self, order: dict[int, int], results: list[Any], deadline: float) -> None:
        """Receive answers until every request id in ``order`` (id -> slot in ``results``)
        has one, or until ``deadline`` plus the grace, when the rest get DeadlineExceeded.

        Waits in a blocking ``recv`` bounded by ZMQ_RCVTIMEO, as a REQ socket would: one
        wake-up per answer, no ZMQ_EVENTS or poll calls around it."""
        sock = self._sock
        recv = sock.recv
        while order:
            remaining = int((deadline + _GRACE - time.monotonic()) * 1000) + 1
            if remaining <= 1:
                error = DeadlineExceeded("no answer from the daemon before the deadline")
                for slot in order.values():
                    results[slot] = error
                return
            # a timeout within half of what is left only costs an extra turn of this loop
            if self._rcvtimeo > remaining or self._rcvtimeo < remaining >> 1:
                sock.setsockopt(_RCVTIMEO, remaining)
                self._rcvtimeo = remaining
            try:
                frame = recv(0, copy=False)
                frames = [frame.bytes]
                while frame.more:  # the rest of a message is there once its first part is
                    frame = recv(_NOBLOCK, copy=False)
                    frames.append(frame.bytes)
            except zmq.Again:
                continue
            try:
                check_batch(frames, 0)
                for i in range(0, len(frames), 2):
                    reply = decode_reply_header(frames[i])
                    if reply is None:
                        header = decode_header(frames[i])
                        reply = header.kind, header.id
                    slot = order.pop(reply[1], -1)
                    if slot < 0:
                        continue  # an answer to an earlier call that already timed out
                    results[slot] = self._result(reply[0], frames[i + 1])
            except FrameError as exc:
                log.warning("dropped a malformed answer from the daemon: %s", exc)

    def _result(self, kind: Kind, body: bytes) -> Any:
        try:
            value = unpack(body, self._max)
        except FrameError as exc:
            return exc
        return error_from_wire(value) if kind is Kind.ERROR else value

    def _send_batch(self, frames: list[bytes]) -> None:
        """Send ``[header, body, ...]`` as one message."""
        sock, send = self._sock, _send_frame
        last = frames.pop()
        for frame in frames:
            send(sock, frame, _SNDMORE)
        send(sock, last, 0)

    def call_batch(self, plugin: str, method: str, batch: Sequence[Any]) -> list[Any]:
        """Shortcut: the same method with many argument sets, pipelined."""
        return self.call_many([(plugin, method, args) for args in batch])

    def close(self) -> None:
        self._sock.close(0)
        self._ctx.term()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
