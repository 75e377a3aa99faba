"""Start plugin processes: the zygote fork-server (fast) or the exec launcher (fallback).

Why two: forking a pre-imported zygote starts a plugin in about a millisecond, but every
child then shares the zygote's interpreter and imports; plugins that need another
interpreter or the strictest sandbox are exec'd instead. Either way the pid returned is the
process that runs the target, it is the daemon's own child (so ``ChildReaper`` reads its
exact status) and it already leads its own session and process group.

How: ``ExecSpawner`` calls ``posix_spawn`` on ``python -P -m osk_daemon.supervisor.launch``
with the request in ``OSK_SPAWN_REQUEST`` (base64 msgpack; the env is the real env),
``setsid`` and default signals. ``ZygoteSpawner`` talks to ``zygote.py`` over a
``SOCK_SEQPACKET`` socketpair: requests carry the stdout/stderr fds as SCM_RIGHTS, replies
``{"id", "pid"}`` or ``{"id", "error"}`` are read with ``loop.add_reader`` and resolve one
future per request. The zygote double-forks, so the daemon must be a child subreaper
(``reaper.become_subreaper``). A dead zygote fails the requests it had not answered, and
the next ``spawn`` starts a new one; a request the dead zygote never saw is retried once.

The zygote keeps ``warm`` pre-forked children (already our children, already session
leaders) and hands each request to one of them, so ``spawn`` returns after one message
round trip. It announces each as ``{"warm": pid}``; ``_WarmChildren`` watches those pids
through the reaper until one is handed out (then it is a plugin like any other) or exits
(they exit on EOF of their socket to the zygote), and ``aclose`` waits for them.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import signal
import socket
import sys
from collections.abc import Sequence
from typing import Any, Protocol

import msgpack

from osk_daemon.errors import OskInternalError, PluginLoadError
from osk_daemon.supervisor.launch import (
    REQUEST_ENV,
    RESET_SIGNALS,
    SpawnRequest,
    encode_env_request,
    request_to_wire,
)
from osk_daemon.supervisor.reaper import ChildReaper, ExitStatus, is_subreaper

__all__ = ["ExecSpawner", "SpawnRequest", "Spawner", "ZygoteSpawner"]

log = logging.getLogger("osk.supervisor.spawner")

LAUNCH_MODULE = "osk_daemon.supervisor.launch"
ZYGOTE_MODULE = "osk_daemon.supervisor.zygote"
_MAX_REPLY = 64 * 1024


class Spawner(Protocol):
    """Starts the process that runs ``req.target``; returns its pid (a child of ours)."""

    async def spawn(self, req: SpawnRequest) -> int: ...

    async def aclose(self) -> None: ...


def _resolved_env(req: SpawnRequest) -> dict[str, str]:
    return dict(req.env) if req.env else dict(os.environ)


def _posix_spawn(argv: list[str], env: dict[str, str], dup2: Sequence[tuple[int, int]]) -> int:
    """posix_spawn with stdin on /dev/null, the given dup2s, its own session, default signals.

    Sources are dup'd to fresh fds first, so overlapping (src, dst) pairs such as a swap of
    1 and 2, or src == dst (where dup2 would keep FD_CLOEXEC), still come out right.
    """
    fresh = [os.dup(src) for src, _ in dup2]
    try:
        actions: list[tuple[Any, ...]] = [
            (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
            *((os.POSIX_SPAWN_DUP2, src, dst) for src, (_, dst) in zip(fresh, dup2, strict=True)),
        ]
        return os.posix_spawn(
            argv[0],
            argv,
            env,
            file_actions=actions,
            setsid=True,
            setsigmask=(),
            setsigdef=RESET_SIGNALS,
        )
    finally:
        for fd in fresh:
            os.close(fd)


class ExecSpawner:
    """Spawns each plugin as a fresh ``python -m osk_daemon.supervisor.launch``."""

    def __init__(self, *, python: str = sys.executable) -> None:
        self._python = python

    async def spawn(self, req: SpawnRequest) -> int:
        """Start the launcher; raises ``PluginLoadError`` if ``posix_spawn`` fails."""
        env = _resolved_env(req)
        env[REQUEST_ENV] = encode_env_request(req)
        argv = [self._python, "-P", "-m", LAUNCH_MODULE]
        try:
            return _posix_spawn(argv, env, [(req.stdout, 1), (req.stderr, 2)])
        except OSError as exc:
            raise PluginLoadError(
                f"could not exec {self._python} for target {req.target!r}: {exc}"
                " (a very large spec or env hits the kernel's argument size limit)"
            ) from exc

    async def aclose(self) -> None:
        """Nothing to release: exec'd plugins are owned by whoever watches their pids."""


class _ZygoteLost(Exception):
    """The zygote went away before answering; the request may be retried."""


class _WarmChildren:
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


class _Zygote:
    """One incarnation of the zygote process and the daemon's end of its socket."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        pid: int,
        sock: socket.socket,
        warm: _WarmChildren,
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
                fut.set_exception(_ZygoteLost(reason))
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
                raise _ZygoteLost("zygote is gone")
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
                raise _ZygoteLost(str(exc)) from exc

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


class ZygoteSpawner:
    """Forks plugin processes from a pre-imported zygote. Build it with ``open``."""

    def __init__(
        self,
        reaper: ChildReaper,
        preload: Sequence[str],
        *,
        sys_path: Sequence[str],
        python: str,
        ready_timeout: float,
        spawn_timeout: float,
        warm: int,
    ) -> None:
        self._reaper = reaper
        self._warm_size = warm
        self._warm = _WarmChildren()
        self._warm_spawns = 0
        self._cold_spawns = 0
        self._preload = tuple(preload)
        self._sys_path = tuple(sys_path)
        self._python = python
        self._ready_timeout = ready_timeout
        self._spawn_timeout = spawn_timeout
        self._ids = itertools.count(1)
        self._lock = asyncio.Lock()
        self._current: _Zygote | None = None
        self._all: set[_Zygote] = set()
        self._closed = False

    @classmethod
    async def open(
        cls,
        reaper: ChildReaper,
        preload: Sequence[str] = ("osk_daemon.worker.runtime",),
        *,
        sys_path: Sequence[str] = (),
        python: str = sys.executable,
        ready_timeout: float = 30.0,
        spawn_timeout: float = 10.0,
        warm: int = 2,
    ) -> ZygoteSpawner:
        """Start the zygote and wait until it has imported ``preload`` (failures are logged).

        The zygote keeps ``warm`` pre-forked children to hand requests to (each costs an idle
        process sharing the zygote's pages); ``warm=0`` double-forks per request instead.
        ``sys_path`` is prepended to the zygote's ``sys.path`` before preloading. Needs an
        installed ``reaper`` and this process to be a child subreaper; raises
        ``OskInternalError`` otherwise and ``PluginLoadError`` if the zygote fails to start.
        """
        if not reaper.installed:
            raise OskInternalError("ZygoteSpawner.open: the ChildReaper is not installed")
        if not is_subreaper():
            raise OskInternalError(
                "ZygoteSpawner.open: this process is not a child subreaper; call"
                " reaper.become_subreaper() first or zygote children would escape it"
            )
        self = cls(
            reaper,
            preload,
            sys_path=sys_path,
            python=python,
            ready_timeout=ready_timeout,
            spawn_timeout=spawn_timeout,
            warm=warm,
        )
        async with self._lock:
            await self._ensure_zygote()
        return self

    @property
    def zygote_pid(self) -> int | None:
        """The pid of the zygote in service, if one is running."""
        z = self._current
        return z.pid if z is not None and z.usable else None

    @property
    def warm_pids(self) -> frozenset[int]:
        """Warm children announced by the zygote, not handed out and not yet exited."""
        return self._warm.pids

    @property
    def spawn_counts(self) -> tuple[int, int]:
        """How many spawns were answered ``(warm, cold)``, over every zygote incarnation."""
        warm = self._warm_spawns + sum(z.warm_spawns for z in self._all)
        cold = self._cold_spawns + sum(z.cold_spawns for z in self._all)
        return warm, cold

    async def spawn(self, req: SpawnRequest) -> int:
        """Fork a plugin process from the zygote; returns its pid.

        Raises ``PluginLoadError`` when the fork failed, the zygote cannot be (re)started, or
        no answer came within ``spawn_timeout`` (the zygote is then killed and replaced).
        """
        message = {"id": 0, **request_to_wire(req, env=_resolved_env(req))}
        for attempt in (1, 2):
            async with self._lock:
                zygote = await self._ensure_zygote()
            req_id = next(self._ids)
            message["id"] = req_id
            data = msgpack.packb(message, use_bin_type=True)
            fut: asyncio.Future[int] = zygote.loop.create_future()
            try:
                await zygote.send(data, [req.stdout, req.stderr])
                # Registered only now: no reply can be read before this task yields again.
                zygote.pending[req_id] = fut
                async with asyncio.timeout(self._spawn_timeout):
                    return await fut
            except _ZygoteLost as exc:
                if attempt == 2:
                    raise PluginLoadError(f"zygote lost while spawning {req.target!r}") from exc
                log.info("zygote lost before answering (%s); retrying once", exc)
            except TimeoutError as exc:
                self._kill(zygote)
                raise PluginLoadError(
                    f"zygote did not answer within {self._spawn_timeout} s for {req.target!r};"
                    " it was killed and will be restarted"
                ) from exc
            finally:
                zygote.pending.pop(req_id, None)
        raise AssertionError("unreachable")

    async def aclose(self, *, grace: float = 5.0) -> None:
        """Close the socket (the zygote exits on EOF), wait for it, SIGKILL after ``grace`` s.

        Then waits the same way for the warm children (they exit on EOF too), so none is
        left behind when this returns.
        """
        self._closed = True
        for zygote in list(self._all):
            zygote.shutdown()
        for zygote in list(self._all):
            try:
                async with asyncio.timeout(grace):
                    await asyncio.shield(zygote.exited)
                    await asyncio.shield(zygote.closed)
            except TimeoutError:
                log.warning("zygote %d did not exit on EOF; killing it", zygote.pid)
                self._kill(zygote)
                try:
                    async with asyncio.timeout(grace):
                        await asyncio.shield(zygote.exited)
                except TimeoutError:
                    log.error("zygote %d was not reaped (is the reaper installed?)", zygote.pid)
            zygote.close("spawner closed")
            self._forget(zygote)
        self._current = None
        await self._warm.wait(self._reaper, grace)

    async def _ensure_zygote(self) -> _Zygote:
        if self._closed:
            raise PluginLoadError("the zygote spawner is closed")
        current = self._current
        if current is not None and current.usable:
            return current
        # A dead incarnation keeps its socket until EOF: its middle processes may still
        # report pids for requests it took before dying. Forget it once both are over.
        for z in list(self._all):
            if z.exited.done() and z.sock.fileno() < 0:
                self._forget(z)
        self._current = await self._start()
        return self._current

    async def _start(self) -> _Zygote:
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            argv = [self._python, "-P", "-m", ZYGOTE_MODULE, "--warm", str(self._warm_size)]
            for path in self._sys_path:
                argv += ["--path", path]
            argv += self._preload
            pid = _posix_spawn(argv, dict(os.environ), [(1, 1), (2, 2), (theirs.fileno(), 3)])
        except OSError as exc:
            ours.close()
            raise PluginLoadError(f"could not start the zygote ({self._python}): {exc}") from exc
        finally:
            theirs.close()
        ours.setblocking(False)
        zygote = _Zygote(loop, pid, ours, self._warm)
        self._all.add(zygote)
        self._reaper.watch(pid, zygote.on_exit)
        try:
            async with asyncio.timeout(self._ready_timeout):
                hello = await zygote.ready
        except (_ZygoteLost, TimeoutError) as exc:
            self._kill(zygote)
            raise PluginLoadError(f"the zygote (pid {pid}) failed to start: {exc!r}") from exc
        for name, error in dict(hello.get("failed") or {}).items():
            log.warning("zygote could not preload %s (%s); plugins will import it", name, error)
        log.info("zygote %d ready, preloaded %s", pid, hello.get("preloaded"))
        return zygote

    def _forget(self, zygote: _Zygote) -> None:
        self._all.discard(zygote)
        self._warm_spawns += zygote.warm_spawns
        self._cold_spawns += zygote.cold_spawns
        zygote.warm_spawns = zygote.cold_spawns = 0

    def _kill(self, zygote: _Zygote) -> None:
        zygote.close("zygote killed")
        if not zygote.exited.done():
            with contextlib.suppress(ProcessLookupError):
                os.kill(zygote.pid, signal.SIGKILL)
