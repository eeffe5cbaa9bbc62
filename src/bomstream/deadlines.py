"""One timer for many one-shot deadlines (stream ``max_duration`` and JWT ``exp``).

Like the heartbeat wheel, this replaces a timer handle per stream (about 650
bytes in uvloop) with a dict entry: deadlines are rounded up to a tick and
kept in one bucket per tick, and one timer fires at the earliest bucket.
"""

from __future__ import annotations

import asyncio
import heapq
import math
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")

# A stream ends at most this much after its deadline.
DEFAULT_TICK_S = 0.25


class Deadlines(Generic[T]):
    """Calls ``on_due(member, reason)`` once, at (or just after) each member's deadline."""

    def __init__(self, on_due: Callable[[T, str], None], tick: float = DEFAULT_TICK_S) -> None:
        self._on_due = on_due
        self._tick = tick
        self._buckets: dict[int, dict[T, str]] = {}
        self._keys: list[int] = []  # a heap; may hold keys of buckets since emptied
        self._handle: asyncio.TimerHandle | None = None
        self._armed_key: int | None = None

    def __len__(self) -> int:
        return sum(len(b) for b in self._buckets.values())

    def add(self, member: T, delay: float, reason: str) -> int:
        """Schedule ``member`` for ``delay`` seconds from now; returns the key to remove it."""
        loop = asyncio.get_running_loop()
        key = math.ceil((loop.time() + max(0.0, delay)) / self._tick)
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = {}
            heapq.heappush(self._keys, key)
        bucket[member] = reason
        self._arm(loop)
        return key

    def remove(self, member: T, key: int) -> None:
        bucket = self._buckets.get(key)
        if bucket is not None and member in bucket:
            del bucket[member]
            if not bucket:
                del self._buckets[key]
                if not self._buckets and self._handle is not None:
                    self._handle.cancel()
                    self._handle = None
                    self._armed_key = None
                    self._keys.clear()

    def _arm(self, loop: asyncio.AbstractEventLoop) -> None:
        keys = self._keys
        while keys and keys[0] not in self._buckets:
            heapq.heappop(keys)
        if not keys:
            return
        first = keys[0]
        if self._armed_key == first and self._handle is not None:
            return
        if self._handle is not None:
            self._handle.cancel()
        self._armed_key = first
        self._handle = loop.call_at(first * self._tick, self._fire)

    def _fire(self) -> None:
        self._handle = None
        self._armed_key = None
        loop = asyncio.get_running_loop()
        due_key = math.floor(loop.time() / self._tick + 1e-9)
        keys = self._keys
        while keys and keys[0] <= due_key:
            bucket = self._buckets.pop(heapq.heappop(keys), None)
            if bucket:
                for member, reason in list(bucket.items()):
                    self._on_due(member, reason)
        self._arm(loop)
