"""The daemon's side of the control protocol: one small function per command.

Each command takes the request's ``args`` and the supervisor and returns a JSON-able
result, or an async iterator for ``-f`` streams. Bad arguments raise ``ControlError``,
which the server turns into ``{"ok": false, "error": ...}``; the daemon carries on.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio

from osk_daemon.control import rollout_commands
from osk_daemon.control.peercred import PeerCred
from osk_daemon.errors import ControlError
from osk_daemon.ipc.codec import pack, routing_meta, unpack
from osk_daemon.observability.notify import service_notifier
from osk_daemon.supervisor.dynamic_load import load_plugin, unload_plugin
from osk_daemon.supervisor.instance import Instance
from osk_daemon.supervisor.lifecycle import State
from osk_daemon.supervisor.reload import reload_config
from osk_daemon.supervisor.runtime import Supervisor

Command = Callable[[Supervisor, dict[str, Any]], Awaitable[Any]]
_OPERATE_TIMEOUT = 60.0


def _str(args: dict[str, Any], key: str, default: str | None = None) -> str:
    value = args.get(key, default)
    if not isinstance(value, str) or not value:
        raise ControlError(f"argument '{key}' must be a non-empty string")
    return value


def _opt_int(args: dict[str, Any], key: str) -> int | None:
    value = args.get(key)
    if value is not None and (type(value) is not int or value < 0):
        raise ControlError(f"argument '{key}' must be a non-negative integer")
    return value


def _opt_float(args: dict[str, Any], key: str) -> float | None:
    value = args.get(key)
    if value is not None and (type(value) not in (int, float) or value <= 0):
        raise ControlError(f"argument '{key}' must be a positive number")
    return None if value is None else float(value)


async def status(sup: Supervisor, args: dict[str, Any]) -> Any:
    plugin = args.get("plugin")
    if plugin is not None and not isinstance(plugin, str):
        raise ControlError("argument 'plugin' must be a string")
    return sup.status(plugin)


def _operate(action: str) -> Command:
    async def command(sup: Supervisor, args: dict[str, Any]) -> Any:
        name = _str(args, "name")
        ids = sup.members.operate(action, name, _opt_int(args, "instance"))
        leaves = sup.members.named(ids)
        generations = {inst.leaf: inst.generation for inst in leaves}

        def settled(inst: Instance) -> bool:
            state = inst.life.state
            if action == "stop":
                return state in (State.UNLOADED, State.FAILED, State.PENDING)
            if action == "restart" and inst.generation == generations[inst.leaf]:
                return False
            return state in (State.READY, State.FAILED)

        with anyio.move_on_after(_OPERATE_TIMEOUT):
            while not all(settled(inst) for inst in leaves):
                await sup.changed()
        return {
            "action": action,
            "instances": [inst.status(sup.tree.restarts(inst.leaf)) for inst in leaves],
        }

    return command


async def call(sup: Supervisor, args: dict[str, Any]) -> Any:
    plugin = _str(args, "plugin")
    method = _str(args, "method")
    version, key, instance = args.get("version"), args.get("key"), args.get("instance")
    meta = routing_meta(
        version if isinstance(version, str) else None,
        key if isinstance(key, str) else None,
        instance if isinstance(instance, int) and not isinstance(instance, bool) else None,
    )
    body = await sup.broker.call(
        plugin, method, pack(args.get("args")), _opt_float(args, "timeout"), meta
    )
    return unpack(body, int(sup.config.daemon.max_message_size))


async def logs(sup: Supervisor, args: dict[str, Any]) -> Any:
    name = _str(args, "name")
    ring = sup.logs.get(name)
    if ring is None:
        raise ControlError(f"no plugin named '{name}'")
    lines = _opt_int(args, "lines")
    tail = [dataclasses.asdict(line) for line in ring.tail(100 if lines is None else lines)]
    if not args.get("follow"):
        return tail

    async def stream() -> AsyncIterator[Any]:
        queue = ring.subscribe()
        try:
            for item in tail:
                yield item
            while True:
                yield dataclasses.asdict(await queue.get())
        finally:
            ring.unsubscribe(queue)

    return stream()


async def events(sup: Supervisor, args: dict[str, Any]) -> Any:
    recent = sup.events.recent(_opt_int(args, "lines"))
    if not args.get("follow"):
        return recent

    async def stream() -> AsyncIterator[Any]:
        queue: asyncio.Queue[dict[str, Any]] = sup.events.follow()
        try:
            for item in recent:
                yield item
            while True:
                yield await queue.get()
        finally:
            sup.events.unfollow(queue)

    return stream()


async def graph(sup: Supervisor, args: dict[str, Any]) -> Any:
    return sup.deps.graph()


async def updates(sup: Supervisor, args: dict[str, Any]) -> Any:
    return sup.updates.listing(datetime.datetime.now())


async def reload(sup: Supervisor, args: dict[str, Any]) -> Any:
    with service_notifier().reload_cycle():  # RELOADING=1 ... READY=1 for systemd
        return await reload_config(sup)


async def load(sup: Supervisor, args: dict[str, Any]) -> Any:
    return load_plugin(sup, _str(args, "path"))


async def unload(sup: Supervisor, args: dict[str, Any]) -> Any:
    return await unload_plugin(
        sup,
        _str(args, "name"),
        _str(args, "strategy", "graceful"),
        _str(args, "dependents", "block"),
    )


COMMANDS: dict[str, Command] = {
    "graph": graph,
    "deploy": rollout_commands.deploy,
    "rollout": rollout_commands.rollout,
    "reload": reload,
    "updates": updates,
    "load": load,
    "unload": unload,
    "status": status,
    "start": _operate("start"),
    "stop": _operate("stop"),
    "restart": _operate("restart"),
    "call": call,
    "logs": logs,
    "events": events,
}


class DaemonCommands:
    """The ``CommandHandler`` the control server calls."""

    def __init__(
        self,
        supervisor: Supervisor,
        request_shutdown: Callable[[], None],
        request_reexec: Callable[[], None] | None = None,
    ) -> None:
        self._sup = supervisor
        self._shutdown = request_shutdown
        self._reexec = request_reexec

    async def handle(self, cmd: str, args: dict[str, Any], peer: PeerCred) -> Any:
        if cmd == "shutdown":
            self._shutdown()
            return {"message": "shutting down"}
        if cmd == "reexec" and self._reexec is not None:
            if self._sup.shutting_down:
                raise ControlError("the daemon is shutting down; nothing to re-execute")
            if self._sup.config.daemon.orphan_timeout == 0:
                raise ControlError(
                    "daemon.orphan_timeout = 0 ties the plugins to the daemon: they would "
                    "all restart; set it above 0 (default 30) to re-execute without that"
                )
            self._reexec()
            return {"message": "re-executing; plugins keep running", "pid": os.getpid()}
        command = COMMANDS.get(cmd)
        if command is None:
            known = ", ".join(sorted([*COMMANDS, "shutdown", "reexec"]))
            raise ControlError(f"unknown command '{cmd}' (known: {known})")
        return await command(self._sup, args)
