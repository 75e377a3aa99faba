"""store 1.0.0: a key-value store kept in memory (the old API: set/get)."""

from typing import Any

from osk_daemon.worker import Plugin, rpc

VERSION = "1.0.0"


class Store(Plugin):
    async def start(self) -> None:
        self.data: dict[str, Any] = {}

    @rpc
    def set(self, key: str, value: Any) -> str:
        self.data[key] = value
        return VERSION

    @rpc
    def get(self, key: str) -> Any:
        return self.data.get(key)
