"""Where the broker can send a plugin's requests: its bound instances, and which one to pick.

Why: the broker's routing decision (which instance of a plugin takes the next request) is a
small policy of its own, kept apart from frame handling so it can be read and changed alone.

How: a ``PluginRoutes`` holds one ``Route`` per bound instance (its routing id, the socket
it came in on, its version, whether it is ready, how many requests it has in flight) plus
the queue of request ids waiting for an instance. ``least_loaded`` picks the ready instance
with the fewest requests in flight, rotating the starting point so ties spread evenly.

Versions: while a plugin is being swapped, ``split`` (a ``rollout.traffic.TrafficSplit``)
says which version takes a request — by the request's pinned ``version``, its sticky
``key``, or the weights — and ``pick`` takes the least loaded ready instance of that
version. A request whose chosen version has no ready instance goes to another version
rather than fail (a gray release must not drop calls); a *pinned* one waits for its
version, because a pin is a promise. A draining instance is never picked.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from osk_daemon.ipc.endpoint import LoopSocket
from osk_daemon.observability.buckets import Buckets
from osk_daemon.rollout.analysis import Recorder
from osk_daemon.rollout.traffic import TrafficSplit

__all__ = ["InstanceKey", "PluginRoutes", "Route", "least_loaded", "pick"]

InstanceKey = tuple[str, int]


@dataclass(slots=True)
class Route:
    key: InstanceKey
    rid: bytes
    endpoint: LoopSocket
    ready: bool = False
    in_flight: int = 0
    version: str = ""
    calls: int = 0  # answered requests, this life of the instance (for oskctl top)
    errors: int = 0
    draining: bool = False
    drained: asyncio.Future[None] | None = None  # set when a draining route's in_flight is 0


@dataclass(slots=True)
class PluginRoutes:
    routes: dict[int, Route] = field(default_factory=dict)
    accepting: bool = True  # starting or running: queue requests rather than refuse them
    queue: deque[int] = field(default_factory=deque)
    rr: int = 0
    versions: dict[int, str] = field(default_factory=dict)  # instance index -> its version
    split: TrafficSplit | None = None
    recorder: Recorder | None = None
    # for metrics: calls answered by outcome, and their latency, over the daemon's life
    outcomes: dict[str, int] = field(
        default_factory=lambda: {"ok": 0, "error": 0, "timeout": 0, "unavailable": 0}
    )
    latency: Buckets = field(default_factory=Buckets)


def pick(entry: PluginRoutes, meta: dict[str, Any] | None) -> Route | None:
    """The instance for a request with header ``meta`` (``version`` pin, ``key``, and
    ``instance``: that instance if it is ready and of the pinned version, if any)."""
    pin = meta.get("version") if meta else None
    key = meta.get("key") if meta else None
    pin = pin if isinstance(pin, str) and pin else None
    wanted = meta.get("instance") if meta else None
    if isinstance(wanted, int) and not isinstance(wanted, bool):
        route = entry.routes.get(wanted)
        if (
            route is not None
            and route.ready
            and not route.draining
            and (pin is None or route.version == pin)
        ):
            return route
    if pin is None and entry.split is None:
        return least_loaded(entry)
    if pin is not None:
        return least_loaded(entry, pin)
    assert entry.split is not None
    chosen = entry.split.choose(key=str(key) if key is not None else None)
    return least_loaded(entry, chosen) or least_loaded(entry)


def has_version(entry: PluginRoutes, version: str) -> bool:
    """Is an instance of ``version`` running or on its way?"""
    return version in entry.versions.values()


def least_loaded(entry: PluginRoutes, version: str | None = None) -> Route | None:
    """The ready instance (of ``version``, if given) with the fewest requests in flight;
    ties rotate."""
    routes = entry.routes
    if len(routes) == 1 and version is None:
        (only,) = routes.values()
        return only if only.ready else None
    ready = [r for r in routes.values() if r.ready and (version is None or r.version == version)]
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
