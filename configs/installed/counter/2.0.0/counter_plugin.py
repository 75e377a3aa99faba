"""Counter 2.0.0: the same state as 1.2.0, and it says which version answered."""

from typing import Any

from osk_daemon.worker import Plugin, rpc

VERSION = "2.0.0"


class Counter(Plugin):
    async def start(self) -> None:
        self.value = getattr(self, "value", 0)

    @rpc
    def incr(self, by: int = 1) -> int:
        self.value += by
        return self.value

    @rpc
    def get(self) -> int:
        return self.value

    @rpc
    def version(self) -> str:
        return VERSION

    async def export_state(self) -> Any:
        return {"value": self.value}

    async def import_state(self, state: Any) -> None:
        self.value = int(state.get("value", 0))
