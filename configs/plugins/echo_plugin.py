"""Echo: the smallest useful plugin. `oskctl call echo echo '{"text": "hi"}'`."""

import os

from osk_daemon.worker import Plugin, rpc


class Echo(Plugin):
    @rpc
    def echo(self, text: str = "") -> dict[str, object]:
        return {
            "text": text,
            "greeting": self.ctx.config.get("greeting", "hello"),
            "instance": self.ctx.instance,
            "pid": os.getpid(),
        }

    @rpc
    async def ping(self) -> str:
        return "pong"
