"""Plugins for the benchmarks in ``bench/``: an echo and a start-time stamp.

``Stamp.start`` records ``time.monotonic()`` (CLOCK_MONOTONIC is system-wide, so the bench
process can compare it with its own clock) and ``stamp`` returns it with the pid; that is
how ``bench/restart.py`` learns when a replacement's plugin code began to run.
"""

from __future__ import annotations

import os
import time
from typing import Any

from osk_daemon.worker import Plugin, rpc


class Stamp(Plugin):
    started_at = 0.0

    async def start(self) -> None:
        self.started_at = time.monotonic()

    @rpc
    def stamp(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "started": self.started_at}

    @rpc
    def echo(self, text: str = "") -> dict[str, Any]:
        return {"text": text}
