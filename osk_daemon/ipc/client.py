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
from typing import Any, cast

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
    unpack,
)

log = logging.getLogger("osk.client")

_GRACE = 0.5
_NOBLOCK = int(zmq.NOBLOCK)
_SNDMORE = int(zmq.SNDMORE)
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)
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

    def call(
        self,
        plugin: str,
        method: str,
        args: Any = None,
        *,
        timeout: float | None = None,
        version: str | None = None,
    ) -> Any:
        """Call ``plugin.method(args)`` and return its result.

        Raises the plugin's error (``RemoteError``, ``MethodNotFound``), ``Unavailable``
        or ``DeadlineExceeded``, all ``OskError``s.
        """
        result = self.call_many([(plugin, method, args)], timeout=timeout, version=version)[0]
        if isinstance(result, OskError):
            raise result
        return result

    def call_many(
        self,
        calls: Iterable[tuple[str, str, Any]],
        *,
        timeout: float | None = None,
        version: str | None = None,
    ) -> list[Any]:
        """Send all calls at once, then collect; a failed call's slot holds its OskError."""
        deadline = time.monotonic() + (timeout or self.timeout)
        meta = {"version": version} if version else None
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
        sock = self._sock
        while order:
            if not cast(int, sock.get(_EVENTS)) & _POLLIN:
                remaining = deadline + _GRACE - time.monotonic()
                if remaining > 0 and zmq.zmq_poll([(sock, _POLLIN)], int(remaining * 1000) + 1):
                    continue
                error = DeadlineExceeded("no answer from the daemon before the deadline")
                for slot in order.values():
                    results[slot] = error
                break
            try:
                frames = self._recv()
            except zmq.Again:
                continue
            try:
                check_batch(frames, 0)
                for i in range(0, len(frames), 2):
                    header = decode_header(frames[i])
                    slot_or_none = order.pop(header.id, None)
                    if slot_or_none is None:
                        continue  # an answer to an earlier call that already timed out
                    results[slot_or_none] = self._result(header.kind, frames[i + 1])
            except FrameError as exc:
                log.warning("dropped a malformed answer from the daemon: %s", exc)
        return results

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

    def _recv(self) -> list[bytes]:
        """One message without blocking (zmq.Again if none waits; ask ZMQ_EVENTS first,
        which is cheaper than that exception)."""
        recv = self._sock.recv
        frame = recv(_NOBLOCK, copy=False)
        parts = [frame.bytes]
        while frame.more:
            frame = recv(_NOBLOCK, copy=False)
            parts.append(frame.bytes)
        return parts

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
