"""The daemon's event stream: lifecycle events as the ObjectStack spec names them.

Every event is a flat dict with ``type`` (``plugin:started``, ``plugin:error``, ...),
``pluginName``, ``timestamp`` (unix ms) and details. The last ``capacity`` events are
kept for ``oskctl events``; followers get a bounded queue each and lose events (counted)
rather than slow the daemon down.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any

log = logging.getLogger("osk.events")


class EventStream:
    def __init__(self, capacity: int = 1000) -> None:
        self._recent: deque[dict[str, Any]] = deque(maxlen=capacity)
        self._followers: set[asyncio.Queue[dict[str, Any]]] = set()
        self.sinks: list[Callable[[dict[str, Any]], None]] = []  # e.g. the PUB socket
        self.dropped = 0

    def publish(self, type_: str, **fields: Any) -> dict[str, Any]:
        event = {"type": type_, "timestamp": int(time.time() * 1000), **fields}
        self._recent.append(event)
        log.debug("event %s", event)
        for sink in self.sinks:
            sink(event)
        for queue in self._followers:
            try:
                queue.put_nowait(event)
            except asyncio.QueueFull:
                self.dropped += 1
        return event

    def recent(self, n: int | None = None) -> list[dict[str, Any]]:
        items = list(self._recent)
        return items if n is None else items[len(items) - n :] if n > 0 else []

    def follow(self, maxsize: int = 1000) -> asyncio.Queue[dict[str, Any]]:
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize)
        self._followers.add(queue)
        return queue

    def unfollow(self, queue: asyncio.Queue[dict[str, Any]]) -> None:
        self._followers.discard(queue)
