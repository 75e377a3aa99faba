"""The plugin SDK's pure rules: rpc discovery, argument mapping, health normalisation."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from osk_daemon.errors import PluginLoadError, Unavailable
from osk_daemon.worker import Context, Health, HealthStatus, Plugin, rpc
from osk_daemon.worker.sdk import load_plugin_class, rpc_methods, split_args, to_health

pytestmark = pytest.mark.timeout(30)


class Base(Plugin):
    @rpc
    def ping(self) -> str:
        return "pong"

    @rpc(name="math.add")
    def add(self, a: int, b: int) -> int:
        return a + b

    @rpc()
    async def later(self) -> int:
        return 1

    @rpc
    @staticmethod
    def static() -> str:
        return "static"

    def private(self) -> None:
        """Not marked, so not callable over RPC."""


class Child(Base):
    def ping(self) -> str:  # overridden without @rpc: withdrawn
        return "child"

    @rpc
    def extra(self) -> None:
        pass


def make(cls: type[Plugin]) -> Plugin:
    return cls(Context("demo"))


def test_rpc_discovery_returns_bound_methods_by_public_name() -> None:
    plugin = make(Base)
    methods = rpc_methods(plugin)
    assert sorted(methods) == ["later", "math.add", "ping", "static"]
    assert methods["ping"]() == "pong"
    assert methods["math.add"](2, 3) == 5
    assert methods["static"]() == "static"


def test_override_without_rpc_withdraws_the_method() -> None:
    assert sorted(rpc_methods(make(Child))) == ["extra", "later", "math.add", "static"]


def test_plain_plugin_has_no_methods() -> None:
    assert rpc_methods(make(Plugin)) == {}


def test_duplicate_public_names_are_rejected() -> None:
    class Clash(Plugin):
        @rpc(name="x")
        def one(self) -> None:
            pass

        @rpc(name="x")
        def two(self) -> None:
            pass

    with pytest.raises(PluginLoadError, match="'x'"):
        rpc_methods(make(Clash))


@pytest.mark.parametrize("name", ["osk.export_state", ""])
def test_reserved_or_empty_names_are_refused(name: str) -> None:
    with pytest.raises(ValueError):
        rpc(name=name)(lambda: None)


def test_rpc_returns_the_function_unchanged() -> None:
    def f() -> int:
        return 1

    assert rpc(f) is f
    assert rpc(name="g")(f) is f


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (None, ((), {})),
        ({"a": 1}, ((), {"a": 1})),
        ([1, 2], ((1, 2), {})),
        ([], ((), {})),
        ([{"a": 1}], (({"a": 1},), {})),
        (5, ((5,), {})),
        ("s", (("s",), {})),
        (b"raw", ((b"raw",), {})),
    ],
)
def test_split_args(args: Any, expected: tuple[tuple[Any, ...], dict[str, Any]]) -> None:
    assert split_args(args) == expected


@pytest.mark.parametrize(
    ("result", "status", "detail"),
    [
        (True, HealthStatus.HEALTHY, ""),
        (False, HealthStatus.UNHEALTHY, ""),
        (HealthStatus.DEGRADED, HealthStatus.DEGRADED, ""),
        ("healthy", HealthStatus.HEALTHY, ""),
        ("unhealthy", HealthStatus.UNHEALTHY, ""),
        (Health.degraded("slow disk"), HealthStatus.DEGRADED, "slow disk"),
        (Health.healthy(), HealthStatus.HEALTHY, ""),
        (Health(HealthStatus.FAILED, "gone"), HealthStatus.UNHEALTHY, "gone"),
        (HealthStatus.RECOVERING, HealthStatus.DEGRADED, ""),
        (HealthStatus.UNKNOWN, HealthStatus.UNHEALTHY, ""),
    ],
)
def test_to_health(result: Any, status: HealthStatus, detail: str) -> None:
    assert to_health(result) == Health(status, detail)


@pytest.mark.parametrize("result", ["fine", None, 3, {"status": "healthy"}])
def test_to_health_rejects_unknown_answers(result: Any) -> None:
    health = to_health(result)
    assert health.status is HealthStatus.UNHEALTHY
    assert "health() returned" in health.detail


def test_health_status_has_the_six_objectstack_statuses() -> None:
    assert [s.value for s in HealthStatus] == [
        "healthy",
        "degraded",
        "unhealthy",
        "failed",
        "recovering",
        "unknown",
    ]
    assert Health.unhealthy("x") == Health(HealthStatus.UNHEALTHY, "x")


@pytest.mark.anyio
async def test_plugin_defaults() -> None:
    plugin = make(Plugin)
    await plugin.start()
    await plugin.import_state({"a": 1})
    assert await plugin.export_state() is None
    assert to_health(await plugin.health()) == Health.healthy()
    await plugin.stop()


@pytest.mark.anyio
async def test_detached_context() -> None:
    ctx = Context("demo", 2, "1.0", {"k": "v"})
    assert ctx.logger is logging.getLogger("osk.plugin.demo")
    assert (ctx.instance, ctx.version, ctx.config) == (2, "1.0", {"k": "v"})
    ctx.emit("thing", {"a": 1})
    assert ctx.emitted == [("thing", {"a": 1})]
    with pytest.raises(Unavailable, match=r"other\.m"):
        await ctx.call("other", "m")


@pytest.mark.parametrize("event", ["sandbox:violation", "plugin:oom", "kernel:shutdown"])
def test_emit_refuses_the_daemons_own_event_names(event: str) -> None:
    ctx = Context("demo")
    with pytest.raises(ValueError, match=f"cannot emit '{event}'"):
        ctx.emit(event, {"forged": True})
    assert ctx.emitted == []
    ctx.emit("demo.sandbox:ok")  # the prefix only counts at the start
    assert ctx.emitted == [("demo.sandbox:ok", None)]


def test_load_plugin_class_rejects_non_plugins() -> None:
    with pytest.raises(PluginLoadError, match="not a subclass"):
        load_plugin_class("logging:Logger", [])
    with pytest.raises(PluginLoadError, match="ModuleNotFoundError"):
        load_plugin_class("osk_no_such_module:X", [])
    assert load_plugin_class(f"{__name__}:Base", []) is Base
