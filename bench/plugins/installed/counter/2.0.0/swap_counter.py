"""counter 2.0.0 for bench/swap.py: counts calls and hands its count to the next version."""

from typing import Any

from osk_daemon.worker import Plugin, rpc

VERSION = "2.0.0"


class Counter(Plugin):
    async def start(self) -> None:
        self.count: int = getattr(self, "count", 0)

    @rpc
    def incr(self) -> list[Any]:
        self.count += 1
        return [self.count, VERSION]

    async def export_state(self) -> Any:
        return self.count

    async def import_state(self, state: Any) -> None:
        self.count = int(state)
