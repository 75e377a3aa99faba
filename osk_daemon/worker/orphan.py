"""A plugin process outlives its daemon for a while, waiting to be re-adopted, then stops.

Why: a daemon that crashes or is killed must not take its plugins down with it: the next
daemon re-adopts them (``supervisor.adoption``). But a plugin must not run on forever
without a supervisor either. So the worker stops its plugin cleanly (``stop()`` runs, state
is saved) once the daemon has been gone for ``daemon.orphan_timeout`` seconds.

How: the daemon's end of the worker's DEALER socket is watched through a ZeroMQ socket
monitor (an inproc PAIR read from the event loop): DISCONNECTED arms a timer, and a
thread ``DEADMAN_GRACE`` later in case the loop is stuck (a write to a full output pipe
that no daemon reads blocks it); CONNECTED (a new daemon bound the same endpoint and the
socket reconnected by itself) cancels both and tells the worker, which sends a heartbeat
at once: the new daemon takes the process as adopted on its first frame. Only the
transport is watched, not the daemon's pid: a sandboxed plugin in its own pid namespace
cannot see that pid, and a daemon restarted under systemd has a new one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
from collections.abc import Callable
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

__all__ = ["OrphanWatch"]

log = logging.getLogger("osk.worker")

_EVENTS = zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED
DEADMAN_GRACE = 10.0  # s after orphan_timeout for stop() to finish before the hard exit


def _die() -> None:
    os._exit(1)  # the event loop did not stop the plugin in time: it is stuck


class OrphanWatch:
    """Calls ``on_orphaned`` once the daemon has been away from ``sock`` for ``timeout`` s
    (0: at once), and ``on_reconnected`` when a daemon is back."""

    def __init__(
        self,
        sock: zmq.Socket[Any],
        timeout: float,
        on_orphaned: Callable[[], None],
        on_reconnected: Callable[[], None],
    ) -> None:
        self._sock = sock
        self._timeout = timeout
        self._on_orphaned = on_orphaned
        self._on_reconnected = on_reconnected
        self._mon: zmq.Socket[Any] = sock.get_monitor_socket(_EVENTS)
        self._fd = int(self._mon.getsockopt(zmq.FD))
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._deadman: threading.Timer | None = None
        self.disconnects = 0

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        loop.add_reader(self._fd, self._drain)
        self._drain()  # the fd is edge-triggered: read what came before we watched

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._deadman is not None:
            self._deadman.cancel()
        if self._loop is not None:
            self._loop.remove_reader(self._fd)
        with contextlib.suppress(zmq.ZMQError):
            self._sock.disable_monitor()
        self._mon.close(linger=0)

    def _drain(self) -> None:
        while True:
            try:
                event = recv_monitor_message(self._mon, zmq.NOBLOCK)["event"]
            except zmq.Again:
                return
            except zmq.ZMQError as exc:  # pragma: no cover - the context is going away
                log.debug("socket monitor: %s", exc)
                return
            if event == zmq.EVENT_DISCONNECTED:
                self.disconnects += 1
                if self._timer is None and self._loop is not None:
                    log.warning(
                        "lost the daemon; waiting %gs for a new one to re-adopt this process",
                        self._timeout,
                    )
                    self._timer = self._loop.call_later(self._timeout, self._expired)
                    # if the loop is stuck (a write to a full output pipe no daemon reads
                    # blocks it), nothing above runs: this thread ends the process anyway
                    self._deadman = threading.Timer(self._timeout + DEADMAN_GRACE, _die)
                    self._deadman.daemon = True
                    self._deadman.start()
            elif event == zmq.EVENT_CONNECTED and self.disconnects:
                log.info("connected to the daemon again")
                if self._timer is not None:
                    self._timer.cancel()
                    self._timer = None
                if self._deadman is not None:
                    self._deadman.cancel()
                    self._deadman = None
                self._on_reconnected()

    def _expired(self) -> None:
        self._timer = None
        log.critical(
            "no daemon for %gs (daemon.orphan_timeout): stopping the plugin", self._timeout
        )
        self._on_orphaned()
