"""Plugins that misbehave in every way the supervisor must handle (for integration tests)."""

from __future__ import annotations

import os
import signal
import time
from typing import Any

from osk_daemon.worker import Health, Plugin, rpc


class Echo(Plugin):
    async def start(self) -> None:
        if self.ctx.config.get("fail_start"):
            raise RuntimeError("refusing to start: fail_start is set")
        self.healthy = True

    async def health(self) -> Health:
        return Health.healthy() if self.healthy else Health.unhealthy("told to be sick")

    @rpc
    def echo(self, text: str = "") -> dict[str, Any]:
        return {"text": text, "pid": os.getpid(), "instance": self.ctx.instance}

    @rpc
    def pid(self) -> int:
        return os.getpid()

    @rpc
    def crash(self, code: int = 1) -> None:
        os._exit(code)

    @rpc
    def kill_self(self, sig: int = signal.SIGKILL) -> None:
        os.kill(os.getpid(), sig)

    @rpc
    def hang(self, seconds: float = 1000.0) -> None:
        time.sleep(seconds)

    @rpc
    def sick(self) -> None:
        self.healthy = False

    @rpc
    def ignore_sigterm(self) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        self.stubborn = True

    async def stop(self) -> None:
        if getattr(self, "stubborn", False):
            time.sleep(1000)  # noqa: ASYNC251 - ignores STOP as well: only SIGKILL ends it

    @rpc
    async def call_other(self, plugin: str, method: str, args: Any = None) -> Any:
        return await self.ctx.call(plugin, method, args, timeout=5)

    @rpc
    def spawn_grandchild(self) -> int:
        pid = os.fork()
        if pid == 0:
            time.sleep(1000)
            os._exit(0)
        return pid
