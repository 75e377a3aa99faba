"""The event stream on a ZeroMQ PUB socket, for tools that subscribe by topic.

Every event the daemon publishes (``oskctl events``) also leaves on
``ipc://<runtime_dir>/events.sock`` as two frames: the event type as the topic
(``plugin:oom``, ``rollout:rolled-back``; a SUB socket subscribes to a prefix such as
``plugin:`` or ``rollout:``) and the event as JSON. The socket file is 0600, like the
control socket. A slow subscriber never slows the daemon: sends do not block, and what
does not fit the high-water mark is dropped and counted.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import zmq

log = logging.getLogger("osk.events")

__all__ = ["EventPublisher"]

_HWM = 10_000


class EventPublisher:
    def __init__(self, ctx: zmq.Context[Any], path: Path) -> None:
        self.endpoint = f"ipc://{path}"
        self.dropped = 0
        self._sock: zmq.Socket[bytes] = ctx.socket(zmq.PUB)
        self._sock.setsockopt(zmq.SNDHWM, _HWM)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.bind(self.endpoint)
        path.chmod(0o600)

    def __call__(self, event: dict[str, Any]) -> None:
        try:
            self._sock.send_multipart(
                [str(event.get("type", "")).encode(), json.dumps(event, default=str).encode()],
                zmq.NOBLOCK,
            )
        except zmq.Again:
            self.dropped += 1
        except zmq.ZMQError as exc:  # closed during shutdown, or worse: never fatal
            log.debug("event not published on %s: %s", self.endpoint, exc)

    def close(self) -> None:
        self._sock.close(linger=0)
