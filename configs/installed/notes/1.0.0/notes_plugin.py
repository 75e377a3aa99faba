"""notes 1.0.0: keeps notes in the store plugin; degraded (and told) while store is down."""

from typing import Any

from osk_daemon.worker import Health, Plugin, rpc


class Notes(Plugin):
    async def start(self) -> None:
        self.count = 0

    @rpc
    async def add(self, text: str) -> dict[str, Any]:
        self.count += 1
        await self.ctx.call("store", "put", {"key": f"note-{self.count}", "value": text})
        return {"id": self.count, "stored_in": "store"}

    @rpc
    async def get(self, id: int) -> Any:
        return await self.ctx.call("store", "get", {"key": f"note-{id}"})

    async def health(self) -> Health:
        if self.ctx.dependencies_down:
            return Health.degraded(f"waiting for {', '.join(sorted(self.ctx.dependencies_down))}")
        return Health.healthy()

    async def dependency_down(self, name: str, optional: bool) -> None:
        self.ctx.logger.warning("%s went down; notes cannot be stored until it is back", name)

    async def dependency_up(self, name: str, optional: bool) -> None:
        self.ctx.logger.info("%s is back", name)
