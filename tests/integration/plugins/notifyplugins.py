"""A plugin whose start waits for the test (for the sd_notify tests)."""

from __future__ import annotations

import asyncio
import os

from testplugins import Echo

from osk_daemon.worker import rpc


class Gated(Echo):
    """``config.gate``: a unix socket path; ``start`` connects and returns only once the test
    sends a byte or closes the connection, so the test decides when the plugin is ready."""

    async def start(self) -> None:
        gate = self.ctx.config.get("gate")
        if gate:
            reader, writer = await asyncio.open_unix_connection(gate)
            await reader.read(1)
            writer.close()
        await super().start()  # fail_start fails here, once the gate opened

    @rpc
    def environ(self, name: str) -> str | None:
        return os.environ.get(name)
