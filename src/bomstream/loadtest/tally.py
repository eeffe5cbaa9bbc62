"""Per-stream accounting: what arrived against what was published.

Event ids written by the load test's publisher are ``<run>-<bom>-<seq>-<sent_us>``:
``seq`` counts from 1 per BOM, ``sent_us`` is the wall-clock send time in
microseconds. A stream reads everything it needs from the id line alone.
"""

from __future__ import annotations


def make_event_id(run: str, bom: int, seq: int, sent_us: int) -> str:
    return f"{run}-{bom}-{seq}-{sent_us}"


class StreamTally:
    """Counts for one stream across its reconnects.

    ``last`` is the highest sequence number seen; ``missing`` holds the gaps
    below it, so a late arrival is told apart from a duplicate without
    keeping every number seen.
    """

    __slots__ = ("duplicates", "last", "missing", "out_of_order", "received")

    def __init__(self) -> None:
        self.last = 0
        self.received = 0
        self.duplicates = 0
        self.out_of_order = 0
        self.missing: set[int] = set()

    def see(self, seq: int) -> bool:
        """Record sequence number ``seq``; True when it is new to this stream."""
        last = self.last
        if seq == last + 1:
            self.last = seq
        elif seq > last:
            self.missing.update(range(last + 1, seq))
            self.last = seq
        elif seq in self.missing:
            self.missing.discard(seq)
            self.out_of_order += 1
        else:
            self.duplicates += 1
            return False
        self.received += 1
        return True

    def lost(self, expected: int) -> int:
        """Events of 1..expected never seen (gaps plus a missing tail)."""
        tail = max(0, expected - self.last)
        gaps = sum(1 for s in self.missing if s <= expected)
        return gaps + tail
