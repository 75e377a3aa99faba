"""Crasher: misbehaves on request, to watch the supervisor at work.

- ``crash(code=1)``: exit at once with ``code`` (0 = a clean exit: a transient plugin
  is then not restarted).
- ``hang(seconds=1000)``: block the event loop; heartbeats stop and the daemon kills
  and restarts it.
- ``sick()`` / ``cure()``: make health checks fail or pass again.
"""

import os
import time

from osk_daemon.worker import Health, Plugin, rpc


class Crasher(Plugin):
    async def start(self) -> None:
        self.healthy = True

    async def health(self) -> Health:
        return Health.healthy() if self.healthy else Health.unhealthy("made sick on request")

    @rpc
    def crash(self, code: int = 1) -> None:
        os._exit(code)

    @rpc
    def hang(self, seconds: float = 1000.0) -> None:
        time.sleep(seconds)

    @rpc
    def sick(self) -> str:
        self.healthy = False
        return "health checks will fail now"

    @rpc
    def cure(self) -> str:
        self.healthy = True
        return "healthy again"
