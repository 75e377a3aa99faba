"""A ROUTER socket read from the asyncio loop, without pyzmq's asyncio layer.

ZMQ_FD is edge-triggered: it signals "something changed", not "a message waits". So a
wake-up drains until EAGAIN (in batches, yielding to other callbacks between them), and
every send re-checks ZMQ_EVENTS, because a send can consume the edge of a pending read.
Sending never blocks: a full queue or a vanished peer (ROUTER_MANDATORY) is reported
as ``False`` and the caller decides what that means.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, cast

import zmq

log = logging.getLogger("osk.broker")

_DRAIN_BATCH = 256


class RouterEndpoint:
    def __init__(
        self,
        ctx: zmq.Context[Any],
        address: str,
        on_frames: Callable[[RouterEndpoint, list[bytes]], None],
        *,
        name: str,
        max_message_size: int,
    ) -> None:
        self.name = name
        self.address = address
        self._on_frames = on_frames
        sock: zmq.Socket[bytes] = ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.setsockopt(zmq.MAXMSGSIZE, max_message_size + 8192)
        sock.setsockopt(zmq.SNDHWM, 100_000)
        sock.setsockopt(zmq.RCVHWM, 100_000)
        sock.bind(address)
        self._sock = sock
        self._fd = cast(int, sock.getsockopt(zmq.FD))
        self._loop: asyncio.AbstractEventLoop | None = None
        self._scheduled = False

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        loop.add_reader(self._fd, self._drain)
        self._schedule()

    def close(self) -> None:
        if self._sock.closed:
            return
        if self._loop is not None:
            self._loop.remove_reader(self._fd)
        self._sock.close(0)

    def send(self, rid: bytes, header: bytes, body: bytes) -> bool:
        try:
            self._sock.send_multipart((rid, header, body), zmq.NOBLOCK, copy=len(body) < 65536)
        except zmq.ZMQError as exc:
            log.debug("%s: send to %r failed: %s", self.name, rid, exc)
            return False
        finally:
            if not self._sock.closed and cast(int, self._sock.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
                self._schedule()
        return True

    def _schedule(self) -> None:
        if not self._scheduled and self._loop is not None and not self._sock.closed:
            self._scheduled = True
            self._loop.call_soon(self._drain)

    def _drain(self) -> None:
        self._scheduled = False
        sock = self._sock
        for _ in range(_DRAIN_BATCH):
            if sock.closed:
                return
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            except zmq.ZMQError as exc:
                log.warning("%s: receive failed: %s", self.name, exc)
                return
            self._on_frames(self, frames)
        self._schedule()  # more may be waiting; let other callbacks run first
