"""The embedded broker: one process, events go straight into the hub."""

from __future__ import annotations

import asyncio

from bomstream.events import Event
from bomstream.hub import Hub


class MemoryBroker:
    def __init__(self, hub: Hub) -> None:
        self._hub = hub

    @property
    def status(self) -> str:
        return "disabled"

    @property
    def healthy(self) -> bool:
        return True

    async def publish(self, event: Event) -> None:
        self._hub.ingest(event, "http")

    async def run(self) -> None:
        await asyncio.Event().wait()

    async def close(self) -> None:
        return None
