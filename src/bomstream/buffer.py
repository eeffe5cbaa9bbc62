"""The bounded replay buffer of one BOM: the last N events, findable by id."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from itertools import islice

from bomstream.events import Event


class Position:
    """The newest arrival and history sequence among some events."""

    __slots__ = ("arrival", "hseq")

    def __init__(self) -> None:
        self.arrival = 0
        self.hseq = 0

    def cover(self, event: Event) -> None:
        self.arrival = max(self.arrival, event.arrival)
        self.hseq = max(self.hseq, event.hseq)


class BomBuffer:
    """Holds at most ``capacity`` events in arrival order.

    Each event gets a sequence number, so "everything after id X" is an index
    computation rather than a scan, and de-duplication by ``event_id`` is a
    dict lookup.
    """

    __slots__ = ("_by_id", "_events", "_next_seq", "capacity", "evicted")

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._events: deque[Event] = deque()
        self._by_id: dict[str, Event] = {}
        self._next_seq = 1
        # The newest position (arrival here, and history sequence) of an event
        # no longer held: a multi-BOM stream resuming from before it has a gap.
        self.evicted = Position()

    def __len__(self) -> int:
        return len(self._events)

    def __contains__(self, event_id: str) -> bool:
        return event_id in self._by_id

    def get(self, event_id: str) -> Event | None:
        return self._by_id.get(event_id)

    @property
    def latest(self) -> Event | None:
        return self._events[-1] if self._events else None

    def append(self, event: Event) -> None:
        """Add an event the caller has checked is not held already."""
        event.seq = self._next_seq
        self._next_seq += 1
        self._events.append(event)
        self._by_id[event.event_id] = event
        if len(self._events) > self.capacity:
            old = self._events.popleft()
            del self._by_id[old.event_id]
            self.evicted.cover(old)

    def after(self, event: Event) -> Iterator[Event]:
        """Held events newer than ``event`` (which must be held), oldest first."""
        first = self._events[0].seq
        return islice(self._events, event.seq - first + 1, None)

    def __iter__(self) -> Iterator[Event]:
        return iter(self._events)

    def __reversed__(self) -> Iterator[Event]:
        return reversed(self._events)

    def replace(self, events: list[Event]) -> None:
        """Hold ``events`` (in that order) instead; the newest ``capacity`` are kept."""
        dropped = events[: -self.capacity]
        self._events.clear()
        self._by_id.clear()
        for ev in events[-self.capacity :]:
            self.append(ev)
        for ev in dropped:
            self.evicted.cover(ev)

    def clear(self) -> None:
        for ev in self._events:
            self.evicted.cover(ev)
        self._events.clear()
        self._by_id.clear()
