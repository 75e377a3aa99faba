"""What a plugin knows about its surroundings and how it reaches other plugins.

Why: a plugin should not touch sockets. It gets a ``Context`` with its identity, its
configuration, a logger, and two verbs — ``call`` another plugin and ``emit`` an event —
and the runtime does the messaging.

How: ``Context`` delegates the two verbs to a small ``ContextLink`` seam. The worker
runtime passes its socket-backed link; a Context built without one (in a plugin's own unit
tests) is *detached*: ``call`` raises ``Unavailable`` and ``emit`` records the event in
``Context.emitted`` so tests can assert on it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Protocol

from osk_daemon.errors import Unavailable

__all__ = ["RESERVED_EVENT_PREFIXES", "Context", "ContextLink"]

# Event names the daemon itself publishes; a plugin emitting one could forge a sandbox
# violation or a lifecycle event in the operator's event stream.
RESERVED_EVENT_PREFIXES = ("sandbox:", "plugin:", "kernel:")


class ContextLink(Protocol):
    """The runtime's side of ``Context.call`` and ``Context.emit``."""

    async def call(
        self, plugin: str, method: str, args: Any, timeout: float | None, key: str | None
    ) -> Any: ...

    def emit(self, event: str, data: Any) -> None: ...


class Context:
    """A plugin's identity, configuration, logger and messaging verbs.

    ``name``, ``instance`` and ``version`` identify this process; ``config`` is the
    plugin's own configuration section; ``logger`` is ``osk.plugin.<name>`` and writes to
    stderr, which the daemon captures and tags with plugin and instance.
    """

    def __init__(
        self,
        name: str,
        instance: int = 0,
        version: str = "0.0.0",
        config: Mapping[str, Any] | None = None,
        *,
        link: ContextLink | None = None,
    ) -> None:
        self.name = name
        self.instance = instance
        self.version = version
        self.config: dict[str, Any] = dict(config or {})
        self.logger = logging.getLogger(f"osk.plugin.{name}")
        self.emitted: list[tuple[str, Any]] = []
        self.dependencies_down: set[str] = set()  # kept by the runtime, see Plugin hooks
        self._link = link

    async def call(
        self,
        plugin: str,
        method: str,
        args: Any = None,
        timeout: float | None = None,
        *,
        key: str | None = None,
    ) -> Any:
        """Call ``method`` on another plugin through the daemon and return its result.

        ``args`` follows the request convention: a dict is keyword arguments, a list
        positional arguments, None nothing, any other value one argument. ``timeout``
        defaults to the daemon's ``call_timeout``. ``key`` (a user or session id) sticks
        the call to one version while the callee runs two (A/B, canary). Raises the
        callee's error as an ``OskError`` (``RemoteError`` for a handler exception,
        ``MethodNotFound``, ``Unavailable``, ``DeadlineExceeded``), or TypeError if
        ``args`` cannot be packed.
        """
        if self._link is None:
            raise Unavailable(
                f"plugin {self.name!r} is not attached to a daemon; cannot call {plugin}.{method}"
            )
        return await self._link.call(plugin, method, args, timeout, key)

    def emit(self, event: str, data: Any = None) -> None:
        """Publish ``event`` with ``data`` through the daemon; returns without waiting.

        Raises ValueError if ``event`` starts with a name the daemon reserves for its own
        events (``sandbox:``, ``plugin:``, ``kernel:``), TypeError if ``data`` cannot be
        packed.
        """
        if event.startswith(RESERVED_EVENT_PREFIXES):
            raise ValueError(
                f"plugin {self.name!r} cannot emit {event!r}: event names starting with "
                f"{', '.join(repr(p) for p in RESERVED_EVENT_PREFIXES)} are the daemon's own; "
                "pick another name (e.g. 'myplugin.thing')"
            )
        if self._link is None:
            self.emitted.append((event, data))
            return
        self._link.emit(event, data)

    def __repr__(self) -> str:
        return f"Context(name={self.name!r}, instance={self.instance!r}, version={self.version!r})"
