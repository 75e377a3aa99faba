"""store 2.1.0: a key-value store kept in memory (put/get; hands its data to a successor)."""

from typing import Any

from osk_daemon.worker import Plugin, rpc

VERSION = "2.1.0"


class Store(Plugin):
    async def start(self) -> None:
        self.data: dict[str, Any] = getattr(self, "data", {})

    @rpc
    def put(self, key: str, value: Any) -> str:
        self.data[key] = value
        return VERSION

    @rpc
    def get(self, key: str) -> Any:
        return self.data.get(key)

    @rpc
    def version(self) -> str:
        return VERSION

    async def export_state(self) -> Any:
        return self.data

    async def import_state(self, state: Any) -> None:
        self.data = dict(state or {})
