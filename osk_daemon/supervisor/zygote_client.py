"""The daemon's end of the zygote: one incarnation's socket protocol, and its warm children.

Why: ``ZygoteSpawner`` (``spawner``) decides when a zygote is started, replaced, retried
and closed; this module holds what it talks to. Keeping the socket protocol here keeps the
spawner's policy readable and the wire handling in one place.

How: ``Zygote`` owns one zygote process's ``SOCK_SEQPACKET`` socket. ``send`` passes a
request with the stdout/stderr fds as SCM_RIGHTS (waiting for the socket to drain when it
is full); replies are read with ``loop.add_reader`` and decoded here: ``{"ready"}`` once the
preloads are imported, ``{"warm": pid}`` for each pre-forked child, and ``{"id", "pid"}``
or ``{"id", "error"}`` resolving the future in ``pending`` for that request id. A reply for
a request nobody waits for any more gets its child killed. EOF or a socket error fails
everything unanswered with ``ZygoteLost`` (the spawner may retry). ``WarmChildren`` tracks
the announced warm pids by pidfd until they are handed out or exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
from typing import Any

import msgpack

from osk_daemon.errors import PluginLoadError
from osk_daemon.supervisor.reaper import ChildReaper, ExitStatus

__all__ = ["WarmChildren", "Zygote", "ZygoteLost"]

log = logging.getLogger("osk.supervisor.spawner")

_MAX_REPLY = 64 * 1024


class ZygoteLost(Exception):
    """The zygote went away before answering; the request may be retried."""


class WarmChildren:
    """Warm zygote children announced but not handed out, each held by a pidfd until it exits.

    Not watched through the reaper: a warm child handed out may exit before its pid reply is
    read, and its status must then stay in the reaper's stash for the spawn's caller. The
    pidfd is opened when the announcement is read; the child is alive then unless it died
    in that instant, and a pid is not reused before the reaper has reaped it.
    """

    def __init__(self) -> None:
        self._live: dict[int, tuple[int, asyncio.Future[None]]] = {}  # pid -> (pidfd, exited)

    @property
    def pids(self) -> frozenset[int]:
        return frozenset(self._live)

    def announced(self, loop: asyncio.AbstractEventLoop, pid: int) -> None:
        if pid in self._live:
            return
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            return
        self._live[pid] = (pidfd, loop.create_future())
        loop.add_reader(pidfd, self._forget, loop, pid)

    def handed_out(self, loop: asyncio.AbstractEventLoop, pid: int) -> None:
        self._forget(loop, pid)

    def _forget(self, loop: asyncio.AbstractEventLoop, pid: int) -> None:
        entry = self._live.pop(pid, None)
        if entry is not None:
            pidfd, exited = entry
            loop.remove_reader(pidfd)
            os.close(pidfd)
            if not exited.done():
                exited.set_result(None)

    async def wait(self, reaper: ChildReaper, grace: float) -> None:
        """Wait up to ``grace`` s for every warm child to exit, SIGKILL and wait again, reap."""
        for kill in (False, True):
            live = dict(self._live)
            if not live:
                break
            if kill:
                log.warning("warm zygote children %s did not exit on EOF; killing", sorted(live))
                for pidfd, _ in live.values():
                    with contextlib.suppress(ProcessLookupError):
                        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(grace):
                    await asyncio.gather(*(asyncio.shield(fut) for _, fut in live.values()))
        if self._live:
            log.error("warm zygote children %s did not exit", sorted(self._live))
        reaper.reap()  # they are our children: none is left as a zombie once this returns


class Zygote:
    """One incarnation of the zygote process and the daemon's end of its socket."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        pid: int,
        sock: socket.socket,
        warm: WarmChildren,
    ) -> None:
        self.loop = loop
        self.pid = pid
        self.sock = sock
        self.warm = warm
        self.warm_spawns = 0
        self.cold_spawns = 0
        self.usable = True
        self.ready: asyncio.Future[dict[str, Any]] = loop.create_future()
        self.exited: asyncio.Future[ExitStatus] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()
        self.pending: dict[int, asyncio.Future[int]] = {}
        loop.add_reader(sock.fileno(), self._on_readable)

    def on_exit(self, status: ExitStatus) -> None:
        if self.usable:
            log.warning("zygote exited unexpectedly: %s; it restarts on the next spawn", status)
        self.usable = False  # unanswered requests fail on EOF, once every A has gone too
        if not self.exited.done():
            self.exited.set_result(status)

    def close(self, reason: str) -> None:
        """Stop using this incarnation and fail what it had not answered. Idempotent."""
        self.usable = False
        if self.sock.fileno() >= 0:
            self.loop.remove_reader(self.sock.fileno())
            self.sock.close()
        futures: list[asyncio.Future[Any]] = [self.ready, *self.pending.values()]
        for fut in futures:
            if not fut.done():
                fut.set_exception(ZygoteLost(reason))
        self.pending.clear()
        if not self.closed.done():
            self.closed.set_result(None)

    def shutdown(self) -> None:
        """Send EOF but keep reading: the warm pids it announces until it exits are seen."""
        self.usable = False
        if self.sock.fileno() >= 0:
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_WR)

    async def send(self, data: bytes, fds: list[int]) -> None:
        while True:
            if not self.usable:
                raise ZygoteLost("zygote is gone")
            try:
                socket.send_fds(self.sock, [data], fds)
                return
            except BlockingIOError:
                writable = self.loop.create_future()
                self.loop.add_writer(self.sock.fileno(), writable.set_result, None)
                try:
                    await writable
                finally:
                    self.loop.remove_writer(self.sock.fileno())
            except OSError as exc:
                self.close(f"zygote socket failed: {exc}")
                raise ZygoteLost(str(exc)) from exc

    def _on_readable(self) -> None:
        while self.sock.fileno() >= 0:
            try:
                data = self.sock.recv(_MAX_REPLY)
            except BlockingIOError:
                return
            except OSError as exc:
                self.close(f"zygote socket failed: {exc}")
                return
            if not data:
                self.close("zygote closed its socket (it died or was killed)")
                return
            self._dispatch(data)

    def _dispatch(self, data: bytes) -> None:
        try:
            msg = msgpack.unpackb(data, raw=False)
        except Exception:
            log.error("zygote sent an undecodable message (%d bytes); ignored", len(data))
            return
        if not isinstance(msg, dict):
            log.error("zygote sent a non-map message; ignored")
        elif msg.get("ready"):
            if not self.ready.done():
                self.ready.set_result(msg)
        elif "warm" in msg and "id" not in msg:
            if isinstance(msg["warm"], int):
                self.warm.announced(self.loop, msg["warm"])
        else:
            self._reply(msg)

    def _reply(self, msg: dict[str, Any]) -> None:
        fut = self.pending.pop(msg.get("id", -1), None)
        pid = msg.get("pid")
        if isinstance(pid, int):
            self.warm.handed_out(self.loop, pid)
            if msg.get("warm"):
                self.warm_spawns += 1
            else:
                self.cold_spawns += 1
        if fut is None or fut.done():
            if isinstance(pid, int):
                # The caller gave up (cancelled or timed out): nobody would own this child.
                log.warning("killing plugin process %d spawned for a cancelled request", pid)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)
            return
        if isinstance(pid, int):
            fut.set_result(pid)
        else:
            fut.set_exception(PluginLoadError(str(msg.get("error", "zygote: bad reply"))))
