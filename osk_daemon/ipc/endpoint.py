"""ZeroMQ sockets read from the asyncio loop, without pyzmq's asyncio layer.

ZMQ_FD is edge-triggered: it signals "something changed", not "a message waits". So a
wake-up drains until EAGAIN (in batches, yielding to other callbacks between them), and
a send made outside a drain schedules one more drain, because a send can consume the
edge of a pending read. Sending never blocks: a full queue or a vanished peer
(ROUTER_MANDATORY) is reported as ``False`` and the caller decides what that means.

This is the hot path of every call, so it avoids pyzmq's conveniences that cost
microseconds per frame: flags are plain ints (enum arithmetic is slow), multipart
messages are sent part by part, and received as zero-copy frames whose ``more`` flag
replaces a ``getsockopt(RCVMORE)`` per part.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Any, cast

import zmq

log = logging.getLogger("osk.ipc")

_DRAIN_BATCH = 256
_NOBLOCK = int(zmq.NOBLOCK)
_MORE_NOBLOCK = int(zmq.SNDMORE) | _NOBLOCK


class LoopSocket:
    """A socket whose incoming messages are handed to ``on_frames`` from the loop."""

    def __init__(
        self,
        sock: zmq.Socket[bytes],
        on_frames: Callable[[LoopSocket, list[bytes]], None],
        *,
        name: str,
    ) -> None:
        self.name = name
        self.sock = sock
        self._on_frames = on_frames
        self._fd = cast(int, sock.getsockopt(zmq.FD))
        self._loop: asyncio.AbstractEventLoop | None = None
        self._scheduled = False
        self._draining = False

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        loop.add_reader(self._fd, self._drain)
        self._schedule()

    def close(self, linger: int = 0) -> None:
        if self.sock.closed:
            return
        if self._loop is not None:
            self._loop.remove_reader(self._fd)
        self.sock.close(linger)

    def send(self, parts: Sequence[bytes]) -> bool:
        """Queue one multipart message; False if it could not be queued."""
        send = self.sock.send
        try:
            last = len(parts) - 1
            for i, part in enumerate(parts):
                send(part, _MORE_NOBLOCK if i < last else _NOBLOCK)
        except zmq.ZMQError as exc:
            log.debug("%s: send failed: %s", self.name, exc)
            return False
        finally:
            if not self._draining:
                self._schedule()  # one cheap recv attempt per loop pass, not per send
        return True

    def _schedule(self) -> None:
        if not self._scheduled and self._loop is not None and not self.sock.closed:
            self._scheduled = True
            self._loop.call_soon(self._drain)

    def _drain(self) -> None:
        self._scheduled = False
        sock = self.sock
        recv = sock.recv
        self._draining = True
        try:
            for _ in range(_DRAIN_BATCH):
                if sock.closed:
                    return
                try:
                    frame = recv(_NOBLOCK, copy=False)
                    parts = [frame.bytes]
                    while frame.more:
                        frame = recv(_NOBLOCK, copy=False)
                        parts.append(frame.bytes)
                except zmq.Again:
                    return
                except zmq.ZMQError as exc:
                    log.warning("%s: receive failed: %s", self.name, exc)
                    return
                self._on_frames(self, parts)
        finally:
            self._draining = False
        self._schedule()  # more may be waiting; let other callbacks run first


class RouterEndpoint(LoopSocket):
    """A bound ROUTER: frames arrive as ``[routing_id, header, body]``."""

    def __init__(
        self,
        ctx: zmq.Context[Any],
        address: str,
        on_frames: Callable[[LoopSocket, list[bytes]], None],
        *,
        name: str,
        max_message_size: int,
    ) -> None:
        sock: zmq.Socket[bytes] = ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.setsockopt(zmq.MAXMSGSIZE, max_message_size + 8192)
        sock.setsockopt(zmq.SNDHWM, 100_000)
        sock.setsockopt(zmq.RCVHWM, 100_000)
        sock.bind(address)
        super().__init__(sock, on_frames, name=name)
        self.address = address

    def send_to(self, rid: bytes, header: bytes, body: bytes) -> bool:
        return self.send((rid, header, body))
