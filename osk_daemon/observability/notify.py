"""sd_notify: telling systemd (``Type=notify``) that the daemon is ready, how it is, and that
its event loop still turns.

Theory of operation
-------------------
systemd passes the path of a datagram socket in ``NOTIFY_SOCKET`` (a name starting with
``@`` is in the abstract namespace) and, with ``WatchdogSec=``, the watchdog period in
``WATCHDOG_USEC`` (and the pid it is meant for in ``WATCHDOG_PID``). Each notification is one
datagram of ``KEY=VALUE`` lines. ``Notifier`` speaks that protocol with nothing but the
stdlib: one non-blocking ``AF_UNIX``/``SOCK_DGRAM`` socket, so a full receive queue drops a
message instead of stalling the loop. Without ``NOTIFY_SOCKET`` every method is a no-op; a
send that fails is logged once (then at debug) and never raises. The socket is close-on-exec
and plugins get an environment without ``NOTIFY_SOCKET``, so only the daemon speaks.

What the daemon says, and when (``daemon.run_daemon`` wires it):

- ``WATCHDOG=1`` from ``Watchdog``, a timer on the daemon's own event loop every half of
  ``WATCHDOG_USEC``: a loop that stalls stops sending it, and systemd restarts the daemon.
  Nothing is sent when ``WATCHDOG_PID`` names another process.
- ``READY=1`` from ``announce`` once every ``critical = true`` plugin is up (its status in
  ``UP_STATUSES``: ready, and healthy by its checks if it has any); with no critical plugin,
  as soon as the boot start is issued (the control socket already listens). ``announce``
  re-reads the supervisor after every event of its stream and sends ``STATUS=`` when the
  line changes ("running 5 plugins, 4 healthy").
- ``RELOADING=1`` + ``MONOTONIC_USEC`` before a config reload, ``READY=1`` after it
  (``Notifier.reload_cycle``, used by SIGHUP and ``oskctl reload``); after only if READY was
  sent already, so a reload during boot does not claim readiness early.
- ``STOPPING=1`` when shutdown begins; no READY is sent after it.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import socket
import time
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

from osk_daemon.supervisor.start_gate import UP_STATUSES
from osk_daemon.worker.sdk import HealthStatus

if TYPE_CHECKING:
    import asyncio

    from osk_daemon.supervisor.runtime import Supervisor

log = logging.getLogger("osk.notify")

__all__ = ["Notifier", "Watchdog", "announce", "service_notifier", "status_line"]


class Notifier:
    """One process's channel to systemd. Not thread-safe; every method costs one ``sendto``
    at most and never raises."""

    def __init__(self, address: str | None, watchdog_usec: int | None = None) -> None:
        """``address``: the value of ``NOTIFY_SOCKET`` (None or empty: a no-op notifier).
        ``watchdog_usec``: the watchdog period (None: no watchdog pings)."""
        self._address: str | None = None
        if address and address[0] in "/@":
            self._address = "\0" + address[1:] if address[0] == "@" else address
        elif address:
            log.warning("NOTIFY_SOCKET=%r is not a unix socket path; not notifying", address)
        self.watchdog_usec = watchdog_usec if self._address and watchdog_usec else None
        self._sock: socket.socket | None = None
        self._warned = False
        self._last_status: str | None = None
        self.ready_sent = False
        self.stopping_sent = False

    @classmethod
    def from_environ(
        cls, environ: Mapping[str, str] | None = None, pid: int | None = None
    ) -> Notifier:
        """From ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and ``WATCHDOG_PID`` (default: this
        process's environment and pid). A malformed or foreign watchdog is ignored."""
        env = os.environ if environ is None else environ
        usec: int | None = None
        try:
            usec = int(env.get("WATCHDOG_USEC", "")) or None
        except ValueError:
            usec = None
        owner = env.get("WATCHDOG_PID")
        if usec is not None and owner and owner != str(os.getpid() if pid is None else pid):
            usec = None  # the watchdog is another process's (we were started by it)
        return cls(env.get("NOTIFY_SOCKET"), usec)

    @property
    def enabled(self) -> bool:
        return self._address is not None

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between two WATCHDOG=1 (half the period), or None for no pings."""
        return None if self.watchdog_usec is None else self.watchdog_usec / 2e6

    def notify(self, **fields: str | int) -> bool:
        """Send one datagram of ``KEY=VALUE`` lines; True if it left. Newlines in values
        become spaces (they would start a new assignment)."""
        if self._address is None:
            return False
        text = "".join(
            f"{key}={str(value).replace(chr(10), ' ')}\n" for key, value in fields.items()
        )
        try:
            if self._sock is None:
                self._sock = socket.socket(
                    socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
                )
            self._sock.sendto(text.encode(), self._address)
        except OSError as exc:
            (log.debug if self._warned else log.warning)(
                "sd_notify to %r failed: %s%s",
                self._address.replace("\0", "@"),
                exc,
                "" if self._warned else " (further failures are logged at debug level)",
            )
            self._warned = True
            return False
        return True

    def ready(self, status: str | None = None) -> None:
        """READY=1 (with STATUS= if given). Nothing once STOPPING=1 was sent."""
        if self.stopping_sent:
            return
        fields: dict[str, str | int] = {"READY": 1}
        if status is not None and status != self._last_status:
            fields["STATUS"] = self._last_status = status
        self.ready_sent = True
        self.notify(**fields)

    def status(self, text: str) -> None:
        """STATUS=text, only when it differs from the last status sent."""
        if text != self._last_status:
            self._last_status = text
            self.notify(STATUS=text)

    def watchdog(self) -> None:
        self.notify(WATCHDOG=1)

    def reloading(self) -> None:
        """RELOADING=1 with MONOTONIC_USEC (CLOCK_MONOTONIC, µs), as systemd wants it."""
        self._last_status = "reloading the config"
        self.notify(
            RELOADING=1,
            MONOTONIC_USEC=time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000,
            STATUS=self._last_status,
        )

    def stopping(self, why: str = "") -> None:
        self._last_status = f"stopping: {why}" if why else "stopping"
        self.stopping_sent = True
        self.notify(STOPPING=1, STATUS=self._last_status)

    @contextlib.contextmanager
    def reload_cycle(self) -> Iterator[None]:
        """RELOADING=1 on entry; READY=1 on exit, refused reload or not, if the daemon had
        announced readiness before (else ``announce`` still sends the first READY=1). The
        status from before comes back with it (``announce`` updates it on the next event)."""
        before = self._last_status
        self.reloading()
        try:
            yield
        finally:
            if self.ready_sent:
                self.ready(before)
            elif before is not None:
                self.status(before)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


@functools.cache
def service_notifier() -> Notifier:
    """This process's notifier, from its environment (made on first use: NOTIFY_SOCKET is
    per process, like the logging tree)."""
    return Notifier.from_environ()


class Watchdog:
    """WATCHDOG=1 every ``notifier.watchdog_interval`` from a timer on ``loop``."""

    def __init__(self, notifier: Notifier, loop: asyncio.AbstractEventLoop) -> None:
        self._notifier = notifier
        self._loop = loop
        self._handle: asyncio.TimerHandle | None = None

    def start(self) -> None:
        """Arm the timer (nothing without a watchdog). Call on the loop's thread."""
        if self._notifier.watchdog_interval is not None and self._handle is None:
            self._handle = self._loop.call_later(self._notifier.watchdog_interval, self._tick)

    def _tick(self) -> None:
        self._notifier.watchdog()
        interval = self._notifier.watchdog_interval
        assert interval is not None
        self._handle = self._loop.call_later(interval, self._tick)

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None


def critical_waiting(sup: Supervisor) -> list[str]:
    """The critical plugins that are not up, in config order."""
    return [
        name
        for name, cfg in sup.config.plugins.items()
        if cfg.critical and sup.deps.status_of(name) not in UP_STATUSES
    ]


def status_line(sup: Supervisor, waiting: list[str], ready: bool) -> str:
    """What STATUS= says: boot progress until READY, then counts."""
    names = list(sup.config.plugins)
    statuses = [sup.deps.status_of(name) for name in names]
    up = sum(status in UP_STATUSES for status in statuses)
    if not ready:
        what = f"waiting for {', '.join(waiting)}; " if waiting else ""
        return f"starting: {what}{up} of {len(names)} plugins up"
    healthy = sum(status is HealthStatus.HEALTHY for status in statuses)
    return f"running {len(names)} plugin{'s' * (len(names) != 1)}, {healthy} healthy"


async def announce(notifier: Notifier, sup: Supervisor) -> None:
    """READY=1 once the critical plugins are up, then STATUS= on every change, until
    cancelled or shutdown. Call after ``sup.start()``; costs one status pass per event."""
    if not notifier.enabled:
        return
    queue = sup.events.follow()
    try:
        while not notifier.stopping_sent and not sup.shutting_down:
            waiting = critical_waiting(sup)
            if not notifier.ready_sent and not waiting and sup.deps.boot_failure is None:
                notifier.ready()
            notifier.status(status_line(sup, waiting, notifier.ready_sent))
            await queue.get()
            while not queue.empty():  # one pass for a burst of events
                queue.get_nowait()
    finally:
        sup.events.unfollow(queue)
