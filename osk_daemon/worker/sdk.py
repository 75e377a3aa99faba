"""The plugin author's side of the contract: ``Plugin``, ``@rpc`` and health results.

Why: every plugin runs in its own process under ``runtime.run_worker``. The runtime needs
to know three things about a plugin object — which methods callers may invoke, how to map
wire arguments onto them, and what its health answer means — and the author should only
have to write a class. This module holds those rules as plain functions so they can be
tested without a process or a socket.

How: ``@rpc`` tags a function with its public name (an attribute, nothing is wrapped, so
the method stays an ordinary method). ``rpc_methods`` walks the class MRO the way attribute
lookup does — the most derived definition of a name wins, so overriding a method without
``@rpc`` withdraws it — and returns bound methods by public name. ``split_args`` maps the
unpacked request body to ``(*args, **kwargs)``; ``to_health`` turns whatever ``health()``
returned into a ``Health`` with one of the three statuses a plugin may report.
``load_plugin_class`` resolves the configured entry (``module:Class`` or an entry point
in the ``osk.plugins`` group) to a ``Plugin`` subclass.
"""

from __future__ import annotations

import enum
import importlib
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar, overload

from osk_daemon.errors import PluginLoadError

if TYPE_CHECKING:
    from osk_daemon.worker.context import Context

__all__ = [
    "ENTRY_POINT_GROUP",
    "RESERVED_PREFIX",
    "Health",
    "HealthStatus",
    "Plugin",
    "load_plugin_class",
    "rpc",
    "rpc_methods",
    "split_args",
    "to_health",
]

RESERVED_PREFIX = "osk."
ENTRY_POINT_GROUP = "osk.plugins"
_RPC_ATTR = "__osk_rpc__"

F = TypeVar("F", bound=Callable[..., Any])


class HealthStatus(enum.StrEnum):
    """The six ObjectStack health statuses. Plugins report the first three; the daemon
    derives ``failed``, ``recovering`` and ``unknown`` from what it observes."""

    HEALTHY = "healthy"
    DEGRADED = "degraded"
    UNHEALTHY = "unhealthy"
    FAILED = "failed"
    RECOVERING = "recovering"
    UNKNOWN = "unknown"


# What a plugin's own answer becomes on the wire: only the first three travel.
_REPORTABLE: dict[HealthStatus, HealthStatus] = {
    HealthStatus.HEALTHY: HealthStatus.HEALTHY,
    HealthStatus.DEGRADED: HealthStatus.DEGRADED,
    HealthStatus.UNHEALTHY: HealthStatus.UNHEALTHY,
    HealthStatus.FAILED: HealthStatus.UNHEALTHY,
    HealthStatus.RECOVERING: HealthStatus.DEGRADED,
    HealthStatus.UNKNOWN: HealthStatus.UNHEALTHY,
}


@dataclass(frozen=True, slots=True)
class Health:
    """A health answer: a status and a human-readable detail."""

    status: HealthStatus
    detail: str = ""

    @classmethod
    def healthy(cls, detail: str = "") -> Health:
        return cls(HealthStatus.HEALTHY, detail)

    @classmethod
    def degraded(cls, detail: str = "") -> Health:
        return cls(HealthStatus.DEGRADED, detail)

    @classmethod
    def unhealthy(cls, detail: str = "") -> Health:
        return cls(HealthStatus.UNHEALTHY, detail)


class Plugin:
    """Base class of every plugin. Subclass it, mark callable methods with ``@rpc``.

    Lifecycle, all driven by the worker runtime in the plugin's own process:
    ``__init__(ctx)`` -> ``import_state(state)`` (only on a hand-over) -> ``start()`` ->
    requests and health checks -> ``stop()``. Handlers may be sync or async; a sync handler
    runs on the event loop, so one that blocks also stops heartbeats and the daemon will
    treat the plugin as hung — use ``async def`` or ``asyncio.to_thread`` for slow work.
    """

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    async def start(self) -> None:
        """Acquire resources. Raising here reports START_FAILED and ends the process."""

    async def stop(self) -> None:
        """Release resources. Called once on STOP or SIGTERM; exceptions are logged."""

    async def health(self) -> Health | HealthStatus | bool | str:
        """Answer a health check: a ``Health``, a status, a status name or a bool."""
        return HealthStatus.HEALTHY

    async def dependency_down(self, name: str, optional: bool) -> None:
        """``name``, a plugin this one requires (or, if ``optional``, uses when present),
        went down: calls to it now fail (``Unavailable`` at once if it is stopped; while it
        restarts they wait, up to their deadline, for the new instance). Unless the dependency
        is optional or this plugin is ``offline_capable``, the daemon shows this plugin as
        degraded until ``dependency_up``. ``self.ctx.dependencies_down`` is already updated."""

    async def dependency_up(self, name: str, optional: bool) -> None:
        """``name`` is up again (ready and healthy); nothing to do unless you cached its
        absence."""

    async def export_state(self) -> Any:
        """State to hand to the next version on an upgrade (msgpack-able), or None."""
        return None

    async def import_state(self, state: Any) -> None:
        """Take over state exported by the previous version; called before ``start()``."""


@overload
def rpc(func: F, /) -> F: ...


@overload
def rpc(*, name: str | None = None) -> Callable[[F], F]: ...


def rpc(func: F | None = None, /, *, name: str | None = None) -> F | Callable[[F], F]:
    """Expose a method over RPC, as ``@rpc`` or ``@rpc(name="public.name")``.

    The function is returned unchanged apart from a marker attribute. Raises ValueError
    for an empty name or one in the reserved ``osk.`` namespace.
    """

    def mark(f: F) -> F:
        public = name if name is not None else getattr(f, "__name__", "")
        if not public:
            raise ValueError("an rpc method needs a non-empty name")
        if public.startswith(RESERVED_PREFIX):
            raise ValueError(f"rpc name {public!r} uses the reserved prefix {RESERVED_PREFIX!r}")
        setattr(f, _RPC_ATTR, public)
        return f

    if func is not None:
        return mark(func)
    return mark


def _rpc_name(raw: Any) -> str | None:
    marked = getattr(raw, _RPC_ATTR, None)
    if marked is None:  # staticmethod/classmethod wrapping a marked function
        marked = getattr(getattr(raw, "__func__", None), _RPC_ATTR, None)
    return marked if isinstance(marked, str) else None


def rpc_methods(plugin: object) -> dict[str, Callable[..., Any]]:
    """Map public RPC name -> bound method for every ``@rpc`` method of ``plugin``.

    Raises PluginLoadError when two methods claim the same public name.
    """
    seen: set[str] = set()
    found: dict[str, Callable[..., Any]] = {}
    owners: dict[str, str] = {}
    for cls in type(plugin).__mro__:
        for attr, raw in vars(cls).items():
            if attr in seen:
                continue
            seen.add(attr)
            public = _rpc_name(raw)
            if public is None:
                continue
            if public in found:
                raise PluginLoadError(
                    f"{type(plugin).__name__}: methods {owners[public]!r} and {attr!r} "
                    f"are both exposed as rpc {public!r}; give one another name"
                )
            found[public] = getattr(plugin, attr)
            owners[public] = attr
    return found


def split_args(args: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Map an unpacked request body to call arguments.

    A map becomes keyword arguments, an array positional arguments, nil no arguments,
    and any other value the single positional argument. To pass one map or array as a
    single argument, wrap it in an array.
    """
    if args is None:
        return (), {}
    if isinstance(args, dict):
        return (), args
    if isinstance(args, list | tuple):
        return tuple(args), {}
    return (args,), {}


def to_health(result: Any) -> Health:
    """Normalise what ``Plugin.health()`` returned to a reportable ``Health``.

    bool -> healthy/unhealthy; a status or status name -> that status; anything else is
    unhealthy with a detail saying what came back. ``failed``/``unknown`` are reported as
    unhealthy and ``recovering`` as degraded: only the daemon assigns those three.
    """
    if isinstance(result, bool):
        return Health.healthy() if result else Health.unhealthy()
    detail = ""
    if isinstance(result, Health):
        result, detail = result.status, str(result.detail)
    if isinstance(result, str):
        try:
            status = HealthStatus(result)
        except ValueError:
            return Health.unhealthy(f"health() returned an unknown status {result!r}")
        return Health(_REPORTABLE[status], detail)
    return Health.unhealthy(f"health() returned {type(result).__name__}, not a health status")


def load_plugin_class(entry: str, path: list[str]) -> type[Plugin]:
    """Resolve ``module:Class`` (after prepending ``path`` to sys.path) or an entry point
    name in the ``osk.plugins`` group. Raises PluginLoadError, chaining the cause."""
    added = [d for d in reversed(path) if d not in sys.path]
    for directory in added:
        sys.path.insert(0, directory)
    if added:  # finders cached before these dirs were on the path must look again
        importlib.invalidate_caches()
    try:
        if ":" in entry:
            module_name, _, qualname = entry.partition(":")
            obj: Any = importlib.import_module(module_name)
            for part in qualname.split("."):
                obj = getattr(obj, part)
        else:
            from importlib import metadata  # only here: keeps email & co. out of the zygote

            found = metadata.entry_points(group=ENTRY_POINT_GROUP, name=entry)
            if not found:
                raise PluginLoadError(
                    f"no entry point {entry!r} in group {ENTRY_POINT_GROUP!r}; "
                    "use 'module:Class' or install the plugin's distribution"
                )
            obj = next(iter(found)).load()
    except PluginLoadError:
        raise
    except Exception as exc:
        raise PluginLoadError(
            f"cannot load plugin entry {entry!r}: {type(exc).__name__}: {exc}"
        ) from exc
    if not (isinstance(obj, type) and issubclass(obj, Plugin)):
        raise PluginLoadError(
            f"plugin entry {entry!r} is {obj!r}, not a subclass of osk_daemon.worker.Plugin"
        )
    return obj
