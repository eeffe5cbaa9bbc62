"""The history backend interface.

A backend returns a BOM's most recent events as the JSON bytes a worker would
PUBLISH; :mod:`bomstream.history.recall` validates them with the same
``parse_event`` as every live event, so a bad row can never reach a client.
"""

from __future__ import annotations

from typing import Protocol

from bomstream.events import Event


class HistoryError(Exception):
    """The history server could not answer (down, timed out, refused).
    ``scoped``: only this BOM's part of it (one Redis Cluster node), not all of history."""

    def __init__(self, message: str, *, scoped: bool = False) -> None:
        super().__init__(message)
        self.scoped = scoped


class HistoryBackend(Protocol):
    @property
    def name(self) -> str:
        """``redis`` or ``postgres``."""
        ...

    async def read(self, bom_id: str, limit: int) -> list[bytes]:
        """The BOM's latest ``limit`` events, oldest first. Raises :class:`HistoryError`."""
        ...

    async def read_rows(self, bom_id: str, limit: int) -> list[tuple[bytes, int]]:
        """As :meth:`read`, each event with the sequence history gave it when
        it was stored (0 where history keeps none)."""
        ...

    async def recent_boms(self, org: str | None, limit: int) -> list[str]:
        """The BOMs of ``org`` (None: of every org) with the newest events,
        newest first, at most ``limit``; [] where history keeps no such index."""
        ...

    def record(self, event: Event) -> None:
        """Store an event this instance received from the feed; never blocks.
        A backend that only reads (postgres) ignores it."""
        ...

    async def ping(self) -> None:
        """Raises :class:`HistoryError` when the history server does not answer."""
        ...

    async def run(self) -> None:
        """The owner task of the backend's connections; runs until cancelled."""
        ...

    async def close(self) -> None: ...
