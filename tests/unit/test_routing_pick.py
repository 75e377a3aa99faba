"""``ipc.routing.pick``: the instance a request goes to, from its header's routing fields."""

from __future__ import annotations

from typing import Any, cast

import pytest

from osk_daemon.ipc.codec import routing_meta
from osk_daemon.ipc.routing import PluginRoutes, Route, pick

pytestmark = pytest.mark.timeout(10)


def routes(*versions: str) -> PluginRoutes:
    entry = PluginRoutes()
    for index, version in enumerate(versions):
        entry.routes[index] = Route(
            ("p", index), b"r%d" % index, cast(Any, None), ready=True, version=version
        )
    return entry


def picked(entry: PluginRoutes, meta: dict[str, Any]) -> int:
    route = pick(entry, meta)
    assert route is not None
    return route.key[1]


def test_an_instance_preference_is_kept_when_it_can_be() -> None:
    entry = routes("1.0.0", "1.0.0", "2.0.0")
    assert [picked(entry, {"instance": 1}) for _ in range(5)] == [1] * 5
    # not of the pinned version, draining, gone or not an int: the pin decides
    assert picked(entry, {"instance": 2, "version": "1.0.0"}) in (0, 1)
    entry.routes[1].draining, entry.routes[1].ready = True, False  # as InFlight.drain does
    assert picked(entry, {"instance": 1, "version": "1.0.0"}) == 0
    assert picked(entry, {"instance": 9, "version": "2.0.0"}) == 2
    assert picked(entry, {"instance": True, "version": "2.0.0"}) == 2


def test_routing_meta_carries_only_what_is_given() -> None:
    assert routing_meta() is None
    assert routing_meta("2.0.0") == {"version": "2.0.0"}
    assert routing_meta(key="user-7", instance=0) == {"key": "user-7", "instance": 0}
