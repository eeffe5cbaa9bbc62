"""Who watches what: one BOM's buffer and the streams open on it, grouped by
the org whose events they may see."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from bomstream.buffer import BomBuffer
from bomstream.events import Event
from bomstream.principal import Principal


class Subscriber:
    """One open stream. ``reason`` is set once it ends, and then ``on_end`` (set
    by whoever serves the stream) is called soon after, once. A plain callback
    rather than a future: at tens of thousands of streams, each object per
    stream is memory, and work for every garbage collection."""

    __slots__ = (
        "_beat_slot",
        "_deadline_key",
        "bom_id",
        "catchup_events",
        "delivered_base",
        "gen",
        "group",
        "live_events",
        "on_end",
        "opened_at",
        "principal",
        "reason",
        "transport",
    )

    def __init__(
        self,
        bom_id: str,
        principal: Principal,
        transport: asyncio.WriteTransport,
    ) -> None:
        self.bom_id = bom_id
        self.principal = principal
        self.group = principal.org
        self.transport = transport
        self.on_end: Callable[[], None] | None = None
        self.reason: str | None = None
        self.opened_at = time.monotonic()
        self.catchup_events = 0
        self.delivered_base = 0
        self.live_events = 0
        # The channel's history merge generation when this stream registered.
        self.gen = 0
        # Slot on the hub's heartbeat wheel; -1 once off it.
        self._beat_slot = -1
        # Key on the hub's deadline timer; -1 when the stream has no deadline.
        self._deadline_key = -1


class Group:
    """The streams of one BOM that see the same events (one org, or all orgs)."""

    __slots__ = ("delivered", "subs")

    def __init__(self) -> None:
        self.subs: set[Subscriber] = set()
        # Events written to this group since it was made; a stream's count of
        # events sent is this minus its base, so nothing is counted per stream.
        self.delivered = 0


class Channel:
    __slots__ = (
        "bom_id",
        "buffer",
        "groups",
        "history_loaded",
        "last_event_at",
        "merge_gen",
        "multi",
        "owner",
        "pending",
        "resync_gen",
    )

    def __init__(self, bom_id: str, capacity: int) -> None:
        self.bom_id = bom_id
        self.buffer = BomBuffer(capacity)
        # A BOM belongs to the org of its first event that names one.
        self.owner: str | None = None
        self.groups: dict[str | None, Group] = {}
        # Multi-BOM streams that list this BOM (bomstream.multi); None while none do.
        self.multi: set[Subscriber] | None = None
        self.pending: list[Event] = []
        self.last_event_at = time.monotonic()
        # Whether shared history has been merged into the buffer (see merge_history).
        self.history_loaded = False
        self.merge_gen = 0
        # Non-zero while the BOM's lapsed subscription is being re-established:
        # live events wait, and the streams registered before this generation
        # get what they missed first (see Hub.begin_resync).
        self.resync_gen = 0

    def has_subscribers(self) -> bool:
        return bool(self.multi) or any(g.subs for g in self.groups.values())


@dataclass(slots=True)
class Opened:
    """What a new stream writes first, and the live subscription (None if already over)."""

    initial: bytes
    sub: Subscriber | None
    resumed: bool
    end_reason: str | None
    catchup_events: int


def visible(event: Event, org: str | None) -> bool:
    return org is None or event.org == org


def latest_visible(ch: Channel | None, org: str | None) -> Event | None:
    """A BOM's newest event that ``org`` may see (its snapshot)."""
    if ch is None:
        return None
    return next((e for e in reversed(ch.buffer) if visible(e, org)), None)


class Watchers(Protocol):
    """Told when a BOM gets its first open stream and loses its last one
    (interest subscriptions follow this)."""

    def first_stream(self, bom_id: str) -> None: ...

    def last_stream(self, bom_id: str) -> None: ...


class NoWatchers:
    def first_stream(self, bom_id: str) -> None:
        return None

    def last_stream(self, bom_id: str) -> None:
        return None
