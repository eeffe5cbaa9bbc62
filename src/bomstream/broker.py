"""How events get into the hub: the broker interface.

A broker carries a validated event from a publisher to every gateway process
and hands it to the in-process :class:`~bomstream.hub.Hub`. The embedded one
(``broker_memory``) hands it over directly; the Redis one (``broker_redis``)
publishes to Redis and feeds the hub from one pattern subscription.
"""

from __future__ import annotations

from typing import Protocol

from bomstream.events import Event


class Broker(Protocol):
    @property
    def status(self) -> str:
        """``disabled`` (no external broker), ``connected`` or ``disconnected``."""
        ...

    @property
    def healthy(self) -> bool: ...

    async def publish(self, event: Event) -> None:
        """Deliver an accepted event to every gateway process (this one included)."""
        ...

    async def run(self) -> None:
        """The broker's owner task: runs until cancelled."""
        ...

    async def close(self) -> None: ...
