"""Reap every child of the daemon and hand each exact exit status to whoever watches it.

Why: restart rules need the exact status of a plugin process (exit code or signal), and only
its parent can read it. The daemon makes itself a *child subreaper*
(``prctl(PR_SET_CHILD_SUBREAPER)``), so processes the zygote double-forks are re-parented to
the daemon when their intermediate parent exits; then they are the daemon's own children.

How: ``reap`` calls ``waitid(P_ALL, WEXITED | WNOHANG)`` until nothing is left; it runs on
the asyncio loop from two wake-ups. Each watched child has a pidfd on the loop
(``add_reader``), readable as soon as that child has exited: the fast path, with no signal
hop before ``reap`` runs. SIGCHLD (``loop.add_signal_handler``, which only queues the signal
and runs the handler on the loop) catches every other child. SIGCHLD is coalesced by the
kernel, so one signal may stand for many exits; draining until empty is what makes that
safe, and whichever wake-up comes second finds nothing left. Each ``ExitStatus`` goes to the
callbacks registered with ``watch(pid)``. A child may die before anyone watches it (a fast-failing
plugin re-parented to us before the spawner even learned its pid), so unwatched statuses are
stashed, bounded, and handed over as soon as ``watch`` is called.

Caveat: reaping ``P_ALL`` takes every child's status, including children started with
``subprocess`` or asyncio's child watchers. While a ``ChildReaper`` is installed, start
other processes through it (``watch``) and not through those APIs.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from osk_daemon.errors import OskInternalError

__all__ = ["ChildReaper", "ExitStatus", "become_subreaper", "is_subreaper"]

log = logging.getLogger("osk.supervisor.reaper")

_PR_SET_CHILD_SUBREAPER = 36
_PR_GET_CHILD_SUBREAPER = 37
_DEFAULT_STASH = 1024
_DEFAULT_STASH_TTL = 60.0


def _prctl(option: int, arg2: int | ctypes.c_void_p) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(option, arg2, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl({option}): {os.strerror(err)}")


def become_subreaper(enabled: bool = True) -> None:
    """Make this process a child subreaper (``enabled=False`` undoes it).

    Orphaned descendants are then re-parented to this process instead of init, so it can
    reap them and read their exact status. Raises ``OSError`` if the kernel refuses.
    """
    _prctl(_PR_SET_CHILD_SUBREAPER, 1 if enabled else 0)


def is_subreaper() -> bool:
    """Whether this process is currently a child subreaper."""
    flag = ctypes.c_int(0)
    _prctl(_PR_GET_CHILD_SUBREAPER, ctypes.cast(ctypes.pointer(flag), ctypes.c_void_p))
    return flag.value != 0


@dataclass(frozen=True, slots=True)
class ExitStatus:
    """How a child ended: ``code`` if it exited, ``signal`` if a signal killed it."""

    pid: int
    code: int | None
    signal: int | None

    def __str__(self) -> str:
        if self.signal is not None:
            try:
                name = signal.Signals(self.signal).name
            except ValueError:
                name = str(self.signal)
            return f"pid {self.pid} killed by {name}"
        return f"pid {self.pid} exited with code {self.code}"


ExitCallback = Callable[[ExitStatus], None]


def _status_from(result: os.waitid_result) -> ExitStatus:
    if result.si_code == os.CLD_EXITED:
        return ExitStatus(result.si_pid, result.si_status, None)
    # CLD_KILLED or CLD_DUMPED: si_status is the signal number.
    return ExitStatus(result.si_pid, None, result.si_status)


class ChildReaper:
    """Reaps all children on SIGCHLD and delivers each status to its watchers.

    Callbacks always run from the event loop (``loop.call_soon``), never inside the reap
    loop, so a raising callback cannot stop reaping. Not thread-safe: use from the loop.
    """

    def __init__(
        self, *, stash_size: int = _DEFAULT_STASH, stash_ttl: float = _DEFAULT_STASH_TTL
    ) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._watchers: dict[int, list[ExitCallback]] = {}
        self._pidfds: dict[int, int] = {}  # watched pid -> its pidfd on the loop
        # pid -> (status, loop.time() when reaped). The TTL keeps a stale status from being
        # handed to a new process that got the same pid after the pid space wrapped.
        self._stash: OrderedDict[int, tuple[ExitStatus, float]] = OrderedDict()
        self._stash_size = stash_size
        self._stash_ttl = stash_ttl

    @property
    def installed(self) -> bool:
        return self._loop is not None

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        """Handle SIGCHLD on ``loop`` and reap children that already died.

        Must be called from the main thread (a signal-handler rule). Raises
        ``OskInternalError`` if already installed.
        """
        if self._loop is not None:
            raise OskInternalError("ChildReaper.install: already installed")
        self._loop = loop
        loop.add_signal_handler(signal.SIGCHLD, self.reap)
        self.reap()

    def uninstall(self) -> None:
        """Stop handling SIGCHLD (its disposition returns to the default). Idempotent."""
        if self._loop is not None:
            for pid in list(self._pidfds):
                self._close_pidfd(pid)
            self._loop.remove_signal_handler(signal.SIGCHLD)
            self._loop = None

    def stashed(self, pid: int) -> bool:
        """Has ``pid`` exited, with its status kept for a ``watch`` to come?"""
        return pid in self._stash

    def watch(self, pid: int, callback: ExitCallback) -> None:
        """Call ``callback(status)`` once when child ``pid`` has exited.

        If that child was already reaped (at most ``stash_ttl`` seconds ago) and its status
        stashed, the callback is scheduled at once. Several callbacks may watch one pid.
        Raises ``OskInternalError`` when the reaper is not installed.
        """
        loop = self._require_loop()
        stashed = self._stash.pop(pid, None)
        if stashed is not None and loop.time() - stashed[1] <= self._stash_ttl:
            loop.call_soon(callback, stashed[0])
            return
        self._watchers.setdefault(pid, []).append(callback)
        if pid not in self._pidfds:
            try:
                pidfd = os.pidfd_open(pid)
            except OSError:  # not there (SIGCHLD still reaps it if it is ours)
                return
            self._pidfds[pid] = pidfd
            loop.add_reader(pidfd, self._on_pidfd, pid)

    def unwatch(self, pid: int, callback: ExitCallback) -> None:
        """Forget one callback for ``pid``; unknown pairs are ignored."""
        callbacks = self._watchers.get(pid)
        if callbacks and callback in callbacks:
            callbacks.remove(callback)
            if not callbacks:
                del self._watchers[pid]
                self._close_pidfd(pid)

    def reap(self) -> None:
        """Collect every exited child now (the SIGCHLD handler; cheap when none exited)."""
        loop = self._require_loop()
        while True:
            try:
                result = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG)
            except ChildProcessError:
                return
            if result is None or result.si_pid == 0:
                return
            self._deliver(loop, _status_from(result))

    def _deliver(self, loop: asyncio.AbstractEventLoop, status: ExitStatus) -> None:
        self._close_pidfd(status.pid)
        callbacks = self._watchers.pop(status.pid, None)
        if callbacks:
            for callback in callbacks:
                loop.call_soon(callback, status)
            return
        log.debug("reaped unwatched child: %s", status)
        self._stash[status.pid] = (status, loop.time())
        self._stash.move_to_end(status.pid)
        while len(self._stash) > self._stash_size:
            self._stash.popitem(last=False)

    def _on_pidfd(self, pid: int) -> None:
        self.reap()
        # Still open: not waitable by us yet (a cold-spawned child that died before its
        # middle process exited); SIGCHLD reaps it once it is re-parented to us.
        self._close_pidfd(pid)

    def _close_pidfd(self, pid: int) -> None:
        pidfd = self._pidfds.pop(pid, None)
        if pidfd is not None:
            if self._loop is not None:
                self._loop.remove_reader(pidfd)
            os.close(pidfd)

    def _require_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise OskInternalError("ChildReaper is not installed; call install(loop) first")
        return self._loop
