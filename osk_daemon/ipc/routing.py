"""Where the broker can send a plugin's requests: its bound instances, and which one to pick.

Why: the broker's routing decision (which instance of a plugin takes the next request) is a
small policy of its own, kept apart from frame handling so it can be read and changed alone.

How: a ``PluginRoutes`` holds one ``Route`` per bound instance (its routing id, the socket
it came in on, whether it is ready, how many requests it has in flight) plus the queue of
request ids waiting for an instance. ``least_loaded`` picks the ready instance with the
fewest requests in flight, rotating the starting point so ties spread evenly.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from osk_daemon.ipc.endpoint import LoopSocket

__all__ = ["InstanceKey", "PluginRoutes", "Route", "least_loaded"]

InstanceKey = tuple[str, int]


@dataclass(slots=True)
class Route:
    key: InstanceKey
    rid: bytes
    endpoint: LoopSocket
    ready: bool = False
    in_flight: int = 0


@dataclass(slots=True)
class PluginRoutes:
    routes: dict[int, Route] = field(default_factory=dict)
    accepting: bool = True  # starting or running: queue requests rather than refuse them
    queue: deque[int] = field(default_factory=deque)
    rr: int = 0


def least_loaded(entry: PluginRoutes) -> Route | None:
    """The ready instance with the fewest requests in flight; ties rotate."""
    routes = entry.routes
    if len(routes) == 1:
        (only,) = routes.values()
        return only if only.ready else None
    ready = [r for r in routes.values() if r.ready]
    if not ready:
        return None
    entry.rr += 1
    n = len(ready)
    best = ready[entry.rr % n]
    for i in range(1, n):
        r = ready[(entry.rr + i) % n]
        if r.in_flight < best.in_flight:
            best = r
    return best
