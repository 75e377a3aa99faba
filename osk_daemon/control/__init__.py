"""The control socket: how operators and scripts drive a running daemon.

Why: one local, permission-checked entry point for ``status``, ``start``/``stop``,
``call``, ``logs``, ``events`` and ``shutdown``, spoken by ``oskctl`` and anything that
can write a line of JSON to a UNIX socket.

How: ``protocol`` defines the newline-delimited JSON wire format (sans-I/O, stdlib only);
``peercred`` decides who may connect (``SO_PEERCRED``); ``server`` serves the socket on
anyio and dispatches to a ``CommandHandler`` the daemon provides; ``oskctl`` and ``render``
are the command-line client. The names below are imported lazily, so that ``oskctl``
(which imports this package) pays neither for anyio nor for ``peercred`` at start-up.
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing's constant without importing typing: oskctl starts lean

if TYPE_CHECKING:
    from typing import Any

    from osk_daemon.control.peercred import PeerCred
    from osk_daemon.control.protocol import BadRequest, Forbidden
    from osk_daemon.control.server import CommandHandler, serve_control

__all__ = ["BadRequest", "CommandHandler", "Forbidden", "PeerCred", "serve_control"]

_LAZY = {
    "BadRequest": "protocol",
    "Forbidden": "protocol",
    "PeerCred": "peercred",
    "CommandHandler": "server",
    "serve_control": "server",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib  # here, not at the top: ~1 ms of every oskctl start

        module = importlib.import_module(f"osk_daemon.control.{_LAZY[name]}")
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
