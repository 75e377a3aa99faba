"""Counter: a plugin with state that it can hand over to its next version."""

from typing import Any

from osk_daemon.worker import Plugin, rpc


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

    async def export_state(self) -> Any:
        return {"value": self.value}

    async def import_state(self, state: Any) -> None:
        self.value = int(state.get("value", 0))
