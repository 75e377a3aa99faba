"""Start plugin processes: the zygote fork-server (fast) or the exec launcher (fallback).

Why two: forking a pre-imported zygote starts a plugin in about a millisecond, but every
child then shares the zygote's interpreter and imports; plugins that need another
interpreter or the strictest sandbox are exec'd instead. Either way the pid returned is the
process that runs the target, it is the daemon's own child (so ``ChildReaper`` reads its
exact status) and it already leads its own session and process group.

How: ``ExecSpawner`` calls ``posix_spawn`` on ``python -P -m osk_daemon.supervisor.launch``
with the request in ``OSK_SPAWN_REQUEST`` (base64 msgpack; the env is the real env),
``setsid`` and default signals. ``ZygoteSpawner`` talks to ``zygote.py`` over a
``SOCK_SEQPACKET`` socketpair (the daemon's end is ``zygote_client.Zygote``): requests
carry the stdout/stderr fds as SCM_RIGHTS, replies ``{"id", "pid"}`` or ``{"id", "error"}``
are read with ``loop.add_reader`` and resolve one future per request. The zygote
double-forks, so the daemon must be a child subreaper (``reaper.become_subreaper``). A
dead zygote fails the requests it had not answered, and the next ``spawn`` starts a new
one; a request the dead zygote never saw is retried once.

The zygote keeps ``warm`` pre-forked children (already our children, already session
leaders) and announces each as ``{"warm": pid}`` with a socket to it; ``spawn`` sends the
request straight to one of them and returns its pid at once, without waking the zygote.
``WarmChildren`` watches those pids by pidfd until one is handed a request (then it is a
plugin like any other) or exits (on EOF of its socket to us or to the zygote), and
``aclose`` waits for them. With no warm child ready, the request goes to the zygote.
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
    EXEC_BEAT_FD,
    EXEC_GO_FD,
    REQUEST_ENV,
    RESET_SIGNALS,
    SpawnRequest,
    encode_env_request,
    request_fds,
    request_from_wire,
    request_to_wire,
)
from osk_daemon.supervisor.reaper import ChildReaper, is_subreaper
from osk_daemon.supervisor.zygote_client import WarmChildren, Zygote, ZygoteLost

__all__ = ["ExecSpawner", "SpawnRequest", "Spawner", "ZygoteSpawner"]

log = logging.getLogger("osk.supervisor.spawner")

LAUNCH_MODULE = "osk_daemon.supervisor.launch"
ZYGOTE_MODULE = "osk_daemon.supervisor.zygote"
WORKER_WARM_UP = "osk_daemon.worker.runtime:warm_up"
SPAWN_WINDOW = 8  # cold spawns sent to the zygote at once (it forks them one by one)


class Spawner(Protocol):
    """Starts the process that runs ``req.target``; returns its pid (a child of ours)."""

    def spawn_now(self, req: SpawnRequest) -> int | None:
        """Start it without waiting if that is possible: the pid, or None (then ``spawn``)."""
        ...

    async def spawn(self, req: SpawnRequest, *, warm: bool = True) -> int:
        """Start it; ``warm=False``: not from a warm zygote child (kept for restarts)."""
        ...

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

    def spawn_now(self, req: SpawnRequest) -> int:
        """The same as ``spawn``: ``posix_spawn`` does not wait for the child."""
        return self._start(req)

    async def spawn(self, req: SpawnRequest, *, warm: bool = True) -> int:
        """Start the launcher; raises ``PluginLoadError`` if ``posix_spawn`` fails."""
        return self._start(req)

    def _start(self, req: SpawnRequest) -> int:
        env = _resolved_env(req)
        env[REQUEST_ENV] = encode_env_request(req)
        argv = [self._python, "-P", "-m", LAUNCH_MODULE]
        try:
            dup2 = [(req.stdout, 1), (req.stderr, 2)]
            if req.beat is not None:
                dup2.append((req.beat, EXEC_BEAT_FD))
            if req.go is not None:
                dup2.append((req.go, EXEC_GO_FD))
            return _posix_spawn(argv, env, dup2)
        except OSError as exc:
            raise PluginLoadError(
                f"could not exec {self._python} for target {req.target!r}: {exc}"
                " (a very large spec or env hits the kernel's argument size limit)"
            ) from exc

    async def aclose(self) -> None:
        """Nothing to release: exec'd plugins are owned by whoever watches their pids."""


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
        warm_up: str | None,
    ) -> None:
        self._reaper = reaper
        self._warm_size = warm
        self._warm_up = warm_up
        self._warm = WarmChildren()
        self._warm_spawns = 0
        self._cold_spawns = 0
        self._preload = tuple(preload)
        self._sys_path = tuple(sys_path)
        self._python = python
        self._ready_timeout = ready_timeout
        self._spawn_timeout = spawn_timeout
        self._ids = itertools.count(1)
        self._lock = asyncio.Lock()
        # cold spawns in flight at once: the rest wait their turn before spawn_timeout runs
        self._window = asyncio.Semaphore(SPAWN_WINDOW)
        self._current: Zygote | None = None
        self._all: set[Zygote] = set()
        self._closed = False
        self._boot: asyncio.Task[None] | None = None  # open(wait=False)'s boot

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
        warm_up: str | None = WORKER_WARM_UP,
        wait: bool = True,
    ) -> ZygoteSpawner:
        """Start the zygote and wait until it has imported ``preload`` (failures are logged).

        ``wait=False`` returns at once and lets the zygote boot meanwhile (a third of a
        second of imports): spawns wait for it, and a daemon that only re-adopts running
        plugins never does. A zygote that fails to boot then is logged, and each spawn
        tries again.

        The zygote keeps ``warm`` pre-forked children to hand requests to (each costs an idle
        process sharing the zygote's pages); ``warm=0`` double-forks per request instead.
        Each warm child runs the ``warm_up`` hook (``module:function``, see ``zygote``) while
        it waits, if that module is in ``preload``: by default the worker runtime's, so a
        plugin process finds its ZeroMQ context and event loop already made.
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
            warm_up=warm_up,
        )
        if wait:
            async with self._lock:
                await self._ensure_zygote()
        else:
            self._boot = asyncio.get_running_loop().create_task(self._boot_zygote())
        return self

    async def _boot_zygote(self) -> None:
        try:
            async with self._lock:
                await self._ensure_zygote()
        except PluginLoadError as exc:
            log.error("the zygote did not start: %s (the next spawn tries again)", exc)

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
        return self._warm_spawns, self._cold_spawns + sum(z.cold_spawns for z in self._all)

    def spawn_now(self, req: SpawnRequest) -> int | None:
        """Hand ``req`` to a warm child at once: its pid, or None when no warm child is
        ready or the zygote is down (then ``spawn``). Raises ``PluginLoadError`` for a
        malformed request. Costs one ``sendmsg``."""
        zygote = self._current
        if self._closed or zygote is None or not zygote.usable:
            return None
        return self._hand(zygote, self._message(req), req)

    async def spawn(self, req: SpawnRequest, *, warm: bool = True) -> int:
        """Start a plugin process from a warm zygote child, else the zygote; returns its pid.
        ``warm=False`` always asks the zygote (a standby: the warm children are kept for
        restarts, and none is refilled in the middle of one).

        Raises ``PluginLoadError`` when the request is malformed, the fork failed, the zygote
        cannot be (re)started, or no answer came within ``spawn_timeout`` (the zygote is then
        killed and replaced). Cold spawns go ``SPAWN_WINDOW`` at a time; ``spawn_timeout``
        counts from a request's turn, so hundreds started at once do not time out queueing.
        """
        message = self._message(req)
        async with self._lock:  # no wait unless the zygote is down: it restarts first
            zygote = await self._ensure_zygote()
        pid = self._hand(zygote, message, req) if warm else None
        if pid is not None:
            return pid
        async with self._window:
            current = self._current  # a warm child may have come while this one waited
            if warm and current is not None and current.usable:
                pid = self._hand(current, message, req)
                if pid is not None:
                    return pid
            return await self._spawn_cold(req, message)

    async def _spawn_cold(self, req: SpawnRequest, message: dict[str, Any]) -> int:
        for attempt in (1, 2):
            async with self._lock:
                zygote = await self._ensure_zygote()
            req_id = next(self._ids)
            message["id"] = req_id
            data = msgpack.packb(message, use_bin_type=True)
            fut: asyncio.Future[int] = zygote.loop.create_future()
            try:
                async with asyncio.timeout(self._spawn_timeout):  # the send too: never hang
                    await zygote.send(data, request_fds(req))
                    # Registered only now: no reply can be read before this task yields.
                    zygote.pending[req_id] = fut
                    return await fut
            except ZygoteLost as exc:
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

    @staticmethod
    def _message(req: SpawnRequest) -> dict[str, Any]:
        message = {"id": 0, **request_to_wire(req, env=_resolved_env(req))}
        try:  # a warm child could only exit on it; the zygote would refuse it
            request_from_wire(message, stdout=req.stdout, stderr=req.stderr)
        except ValueError as exc:
            raise PluginLoadError(f"malformed spawn request: {exc}") from exc
        return message

    def _hand(self, zygote: Zygote, message: dict[str, Any], req: SpawnRequest) -> int | None:
        data = msgpack.packb(message, use_bin_type=True)
        pid = self._warm.hand(zygote.loop, data, request_fds(req))
        if pid is not None:
            self._warm_spawns += 1
        return pid

    async def wait_warm(self, count: int) -> None:
        """Wait until at least ``count`` warm children are ready (the pool refills a moment
        after a hand-out). Callers bound it with a timeout; used by tests and benchmarks."""
        await self._warm.wait_for(count)

    async def aclose(self, *, grace: float = 5.0) -> None:
        """Close the socket (the zygote exits on EOF), wait for it, SIGKILL after ``grace`` s.

        Then waits the same way for the warm children (they exit on EOF too), so none is
        left behind when this returns.
        """
        if self._boot is not None:  # a zygote still booting is let finish, then closed
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._ready_timeout):
                    await asyncio.shield(self._boot)
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

    async def _ensure_zygote(self) -> Zygote:
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

    async def _start(self) -> Zygote:
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            argv = [self._python, "-P", "-m", ZYGOTE_MODULE, "--warm", str(self._warm_size)]
            if self._warm_up and self._warm_up.partition(":")[0] in self._preload:
                argv += ["--warm-up", self._warm_up]
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
        zygote = Zygote(loop, pid, ours, self._warm)
        self._all.add(zygote)
        self._reaper.watch(pid, zygote.on_exit)
        try:
            async with asyncio.timeout(self._ready_timeout):
                hello = await zygote.ready
        except (ZygoteLost, TimeoutError) as exc:
            self._kill(zygote)
            raise PluginLoadError(f"the zygote (pid {pid}) failed to start: {exc!r}") from exc
        for name, error in dict(hello.get("failed") or {}).items():
            log.warning("zygote could not preload %s (%s); plugins will import it", name, error)
        log.info("zygote %d ready, preloaded %s", pid, hello.get("preloaded"))
        if hello.get("double_fork"):  # each spawn costs a middle process that forks and exits
            log.info("zygote %d double-forks: %s", pid, hello["double_fork"])
        return zygote

    def _forget(self, zygote: Zygote) -> None:
        self._all.discard(zygote)
        self._cold_spawns += zygote.cold_spawns
        zygote.cold_spawns = 0

    def _kill(self, zygote: Zygote) -> None:
        zygote.close("zygote killed")
        if not zygote.exited.done():
            with contextlib.suppress(ProcessLookupError):
                os.kill(zygote.pid, signal.SIGKILL)
