"""The start gate and the plugin status it is fed: pure, no processes."""

from __future__ import annotations

import pytest

from osk_daemon.errors import OskInternalError
from osk_daemon.supervisor.dependencies import STOPPED
from osk_daemon.supervisor.start_gate import StartGate, plugin_status
from osk_daemon.worker.sdk import HealthStatus as H

pytestmark = pytest.mark.timeout(5)


@pytest.mark.parametrize(
    ("instances", "expected"),
    [
        ([], STOPPED),
        ([STOPPED], STOPPED),
        ([H.FAILED, H.HEALTHY], H.HEALTHY),
        ([H.UNHEALTHY, H.RECOVERING], H.RECOVERING),
        ([H.UNKNOWN, H.FAILED], H.UNKNOWN),
        ([H.UNHEALTHY, H.FAILED, STOPPED], H.UNHEALTHY),
        ([H.DEGRADED, H.RECOVERING], H.DEGRADED),
    ],
)
def test_a_plugin_is_as_available_as_its_best_instance(instances: list, expected: str) -> None:
    assert plugin_status(instances) == expected


def diamond() -> StartGate:
    # app needs auth and store, auth needs store; cache needs nothing
    return StartGate({"store": [], "auth": ["store"], "app": ["auth", "store"], "cache": []})


def test_independent_plugins_start_at_once_and_dependents_wait() -> None:
    gate = diamond()
    assert gate.request("store/0", "store")
    assert gate.request("cache/0", "cache")
    assert not gate.request("auth/0", "auth")
    assert not gate.request("app/0", "app")
    assert not gate.request("app/1", "app")
    assert gate.waiting_for("app") == ("auth", "store")
    assert gate.held("app/1")


def test_release_comes_in_waves_in_request_order() -> None:
    gate = diamond()
    for leaf in ("auth/0", "app/0", "app/1"):
        gate.request(leaf, leaf.split("/")[0])
    assert gate.set_up("store", True) == ["auth/0"]
    assert gate.waiting_for("app") == ("auth",)
    assert gate.set_up("auth", True) == ["app/0", "app/1"]
    assert not gate.held("app/0")
    assert gate.set_up("auth", True) == []  # already up: nothing new


def test_a_dependency_going_down_holds_the_next_start_again() -> None:
    gate = diamond()
    gate.set_up("store", True)
    assert gate.request("auth/0", "auth")
    gate.set_up("store", False)
    assert not gate.request("auth/0", "auth")  # a restart while store is down waits
    assert gate.set_up("store", True) == ["auth/0"]


def test_a_cancelled_leaf_is_not_released() -> None:
    gate = diamond()
    gate.request("auth/0", "auth")
    assert gate.cancel("auth/0")
    assert not gate.cancel("auth/0")
    assert gate.set_up("store", True) == []


def test_unknown_names_are_bugs() -> None:
    with pytest.raises(OskInternalError, match="requires unknown"):
        StartGate({"app": ["ghost"]})
    gate = diamond()
    with pytest.raises(OskInternalError, match="unknown plugin 'ghost'"):
        gate.request("ghost/0", "ghost")
    with pytest.raises(OskInternalError, match="unknown plugin 'ghost'"):
        gate.set_up("ghost", True)
