"""The daemon's end of the zygote: one incarnation's socket protocol, and its warm children.

Why: ``ZygoteSpawner`` (``spawner``) decides when a zygote is started, replaced, retried
and closed; this module holds what it talks to. Keeping the socket protocol here keeps the
spawner's policy readable and the wire handling in one place.

How: ``Zygote`` owns one zygote process's ``SOCK_SEQPACKET`` socket. ``send`` passes a
request with the stdout/stderr fds as SCM_RIGHTS (waiting for the socket to drain when it
is full); replies are read with ``loop.add_reader`` and decoded here: ``{"ready"}`` once the
preloads are imported, ``{"warm": pid}`` with that pre-forked child's request socket
attached, and ``{"id", "pid"}`` or ``{"id", "error"}`` resolving the future in ``pending``
for that request id. A reply for a request nobody waits for any more gets its child killed.
EOF or a socket error fails everything unanswered with ``ZygoteLost`` (the spawner may
retry). ``WarmChildren`` holds each announced warm child (its pidfd and request socket)
until ``hand`` gives it a request or it exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import signal
import socket
from typing import Any, NamedTuple

import msgpack

from osk_daemon.errors import PluginLoadError
from osk_daemon.supervisor.reaper import ChildReaper, ExitStatus
from osk_daemon.supervisor.runtime_state import parent_of

__all__ = ["WarmChildren", "Zygote", "ZygoteLost"]

log = logging.getLogger("osk.supervisor.spawner")

_MAX_REPLY = 64 * 1024
_PEER_GONE = (errno.EPIPE, errno.ECONNRESET, errno.ECONNREFUSED, errno.ENOTCONN)


def _kill_unowned(pid: int) -> None:
    """The caller of a spawn gave up (cancelled or timed out) before its pid arrived:
    nobody would own this plugin process."""
    log.warning("killing plugin process %d spawned for a cancelled request", pid)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


class ZygoteLost(Exception):
    """The zygote went away before answering; the request may be retried."""


class _Child(NamedTuple):
    pidfd: int
    requests: socket.socket  # our end of its request socket
    exited: asyncio.Future[None]  # done when it exits or is handed a request


class WarmChildren:
    """Warm zygote children announced but not handed out, each held by a pidfd until it exits.

    Not watched through the reaper: a warm child handed out may exit before the spawn's
    caller watches its pid, and its status must then stay in the reaper's stash for that
    caller. The pidfd is opened when the announcement is read; the child is alive then
    unless it died in that instant, and a pid is not reused before the reaper has reaped it.
    """

    def __init__(self) -> None:
        self._live: dict[int, _Child] = {}  # in announcement order
        self._announced = asyncio.Event()  # set and replaced on each announcement

    @property
    def pids(self) -> frozenset[int]:
        return frozenset(self._live)

    def announced(self, loop: asyncio.AbstractEventLoop, pid: int, requests: int) -> None:
        """Hold warm child ``pid`` and ``requests``, our end of its request socket (owned)."""
        sock = socket.socket(fileno=requests)
        if pid in self._live:
            sock.close()
            return
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            sock.close()
            return
        sock.setblocking(False)
        self._live[pid] = _Child(pidfd, sock, loop.create_future())
        loop.add_reader(pidfd, self._forget, loop, pid)
        self._announced.set()
        self._announced = asyncio.Event()

    async def wait_for(self, count: int) -> None:
        """Return once at least ``count`` warm children are held."""
        while len(self._live) < count:
            await self._announced.wait()

    def hand(self, loop: asyncio.AbstractEventLoop, data: bytes, fds: list[int]) -> int | None:
        """Send a spawn request to the oldest warm child; its pid, or None if none took it.

        Costs one ``sendmsg``: the child is already our child and leads its own session. A
        child that died, or whose zygote did, refuses the send and is skipped.
        """
        while self._live:
            pid = next(iter(self._live))
            try:
                socket.send_fds(self._live[pid].requests, [data], fds)
            except OSError as exc:
                self._forget(loop, pid)
                if exc.errno in _PEER_GONE:
                    continue
                log.warning("could not hand a request to warm child %d: %s", pid, exc)
                return None
            self._forget(loop, pid)
            return pid
        return None

    def _forget(self, loop: asyncio.AbstractEventLoop, pid: int) -> None:
        child = self._live.pop(pid, None)
        if child is not None:
            loop.remove_reader(child.pidfd)
            os.close(child.pidfd)
            child.requests.close()  # an idle child exits 0 on this EOF
            if not child.exited.done():
                child.exited.set_result(None)

    async def wait(self, reaper: ChildReaper, grace: float) -> None:
        """Wait up to ``grace`` s for every warm child to exit, SIGKILL and wait again, reap."""
        for kill in (False, True):
            live = dict(self._live)
            if not live:
                break
            for child in live.values():
                child.requests.close()  # EOF: an idle warm child exits 0
            if kill:
                log.warning("warm zygote children %s did not exit on EOF; killing", sorted(live))
                for child in live.values():
                    with contextlib.suppress(ProcessLookupError):
                        signal.pidfd_send_signal(child.pidfd, signal.SIGKILL)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(grace):
                    await asyncio.gather(*(asyncio.shield(c.exited) for c in live.values()))
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
        self.cold_spawns = 0
        self.usable = True
        self.ready: asyncio.Future[dict[str, Any]] = loop.create_future()
        self.exited: asyncio.Future[ExitStatus] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()
        self.pending: dict[int, asyncio.Future[int]] = {}
        self._send_lock = asyncio.Lock()
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
        # One sender at a time: asyncio keeps one writer callback per fd, so two requests
        # waiting for a full socket to drain would replace each other's wake-up and one
        # would wait forever (seen with 64 instances started at once).
        async with self._send_lock:
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
                data, fds, _, _ = socket.recv_fds(self.sock, _MAX_REPLY, 1)
            except BlockingIOError:
                return
            except OSError as exc:
                self.close(f"zygote socket failed: {exc}")
                return
            if not data:
                for fd in fds:
                    os.close(fd)
                self.close("zygote closed its socket (it died or was killed)")
                return
            self._dispatch(data, fds)

    def _dispatch(self, data: bytes, fds: list[int]) -> None:
        try:
            msg = msgpack.unpackb(data, raw=False)
        except Exception:
            msg = None
        if not isinstance(msg, dict):
            log.error("zygote sent an undecodable or non-map message; ignored")
        elif "warm" in msg and "id" not in msg:
            if isinstance(msg["warm"], int) and len(fds) == 1:
                self.warm.announced(self.loop, msg["warm"], fds.pop())
        elif msg.get("ready"):
            if not self.ready.done():
                self.ready.set_result(msg)
        else:
            self._reply(msg)
        for fd in fds:  # none belongs to any other message
            os.close(fd)

    def _reply(self, msg: dict[str, Any]) -> None:
        fut = self.pending.pop(msg.get("id", -1), None)
        pid = msg.get("pid")
        if isinstance(pid, int):
            self.cold_spawns += 1
        if fut is None or fut.done():
            if isinstance(pid, int):
                _kill_unowned(pid)
            return
        if isinstance(pid, int):
            middle = msg.get("middle")
            self._when_ours(fut, pid, middle if isinstance(middle, int) else None)
        else:
            fut.set_exception(PluginLoadError(str(msg.get("error", "zygote: bad reply"))))

    def _when_ours(self, fut: asyncio.Future[int], pid: int, middle: int | None) -> None:
        """Resolve ``fut`` with ``pid`` once the plugin is our child: once its middle
        process (the zygote's child that forked it and reported it) has exited, since
        only then is the plugin re-parented to us, and only then can the reaper watch it."""
        me = os.getpid()
        if middle is None or middle == me or parent_of(pid) == me:
            fut.set_result(pid)
            return
        try:
            pidfd = os.pidfd_open(middle)
        except OSError:  # the middle is gone already
            fut.set_result(pid)
            return
        if parent_of(pid) == me:  # it exited meanwhile (its pid may be another's now)
            os.close(pidfd)
            fut.set_result(pid)
            return

        def middle_gone() -> None:
            self.loop.remove_reader(pidfd)
            os.close(pidfd)
            if not fut.done():
                fut.set_result(pid)
            else:
                _kill_unowned(pid)

        self.loop.add_reader(pidfd, middle_gone)
