"""Merging a BOM's history into its process buffer, by event_id.

History is in publication order; the buffer is in the order this process
received events. The merge keeps every event once: history's events in
history's order, and each event only the buffer holds right after the one it
followed in the buffer.
"""

from __future__ import annotations

from collections.abc import Sequence

from bomstream.channel import Channel
from bomstream.events import Event
from bomstream.fanout import FanOut
from bomstream.metrics import Metrics


def interleave(
    held: Sequence[Event], history: Sequence[Event], *, disjoint_newer: bool
) -> tuple[list[Event], list[Event]]:
    """(merged order, history events the buffer lacked). When the two share no
    event, history goes before the buffer (a fresh instance: history is older),
    or after it with ``disjoint_newer`` (history has moved on, or was reset)."""
    held_ids = {e.event_id for e in held}
    hist_ids = {e.event_id for e in history}
    by_id = {e.event_id: e for e in held}
    added: list[Event] = []
    seen: set[str] = set()
    for ev in history:
        if ev.event_id not in held_ids and ev.event_id not in seen:
            seen.add(ev.event_id)
            added.append(ev)
    if not hist_ids & held_ids:
        return ([*held, *added] if disjoint_newer else [*added, *held]), added
    merged: list[Event] = []
    emitted: set[str] = set()
    j = 0
    for ev in history:
        eid = ev.event_id
        if eid in emitted:
            continue
        if eid in held_ids:
            # Buffer-only events that came before this one in the buffer go first.
            while j < len(held) and held[j].event_id != eid:
                if held[j].event_id not in hist_ids:
                    merged.append(held[j])
                j += 1
            if j < len(held):
                j += 1
            merged.append(by_id[eid])
        else:
            merged.append(ev)
        emitted.add(eid)
    merged.extend(e for e in held[j:] if e.event_id not in hist_ids)
    return merged, added


def merge_plain(ch: Channel, history: list[Event]) -> bool:
    """A first load. History events the buffer lacked get a new merge
    generation: streams registered from now on have them in catch-up, and a
    late live copy goes only to the streams registered before (Hub.ingest)."""
    merged, added = interleave(list(ch.buffer), history, disjoint_newer=False)
    if not added:
        return False
    ch.merge_gen += 1
    for ev in added:
        ev.hist_gen = ch.merge_gen
    ch.buffer.replace(merged)
    return True


def merge_resync(ch: Channel, history: list[Event]) -> list[Event]:
    """A load after the BOM's subscription lapsed, with streams open since
    before it. Returns, in order, what those streams have not been sent: the
    history events after the last one they got, and the live events held back
    meanwhile (``ch.pending``)."""
    held = list(ch.buffer)
    pending = {e.event_id for e in ch.pending}
    last = next((e for e in reversed(held) if e.event_id not in pending), None)
    merged, added = interleave(held, history, disjoint_newer=True)
    added_ids = {e.event_id for e in added}
    after = 0 if last is None else next(i for i, e in enumerate(merged) if e is last) + 1
    missed: list[Event] = []
    taken: set[str] = set()
    for i, ev in enumerate(merged):
        eid = ev.event_id
        if eid in taken:
            continue
        if eid in pending or (eid in added_ids and i >= after):
            missed.append(ev)
            taken.add(eid)
    for ev in added:
        ev.hist_gen = 0
    ch.buffer.replace(merged)
    ch.pending = []
    return missed


class Resyncs:
    """The hub's side of a lapsed subscription (interest mode).

    When a BOM's subscription lapses (unsubscribed, the connection dropped, a
    cluster node gave up its slot), this process may miss the BOM's events
    until it is back. The buffer must then be read from history again; and
    the streams open on it get no live event meanwhile (they wait in
    ``pending``), so that when history has been read, what they missed and
    what was held back reach them in order (:func:`merge_resync`). Streams
    that open during the wait had the held-back events in catch-up and are
    left out of the fill.
    """

    def __init__(
        self,
        channels: dict[str, Channel],
        dirty: dict[str, Channel],
        fanout: FanOut,
        metrics: Metrics,
    ) -> None:
        self._channels = channels
        self._dirty = dirty
        self._fanout = fanout
        self._metrics = metrics

    def begin(self, bom_id: str) -> None:
        ch = self._channels.get(bom_id)
        if ch is None:
            return
        ch.history_loaded = False
        if ch.resync_gen:
            return
        if not ch.has_subscribers():
            if not ch.buffer:
                del self._channels[bom_id]
                self._dirty.pop(bom_id, None)
            return
        if ch.pending:
            # Received before the lapse: in order, so out now.
            self._fanout.flush(ch)
            self._dirty.pop(bom_id, None)
        ch.merge_gen += 1
        ch.resync_gen = ch.merge_gen

    def active(self, bom_id: str) -> bool:
        ch = self._channels.get(bom_id)
        return ch is not None and ch.resync_gen > 0

    def give_up(self, bom_id: str) -> None:
        ch = self._channels.get(bom_id)
        if ch is not None and ch.resync_gen:
            pending, ch.pending = ch.pending, []
            self._dirty.pop(bom_id, None)
            self.finish(ch, pending, "unfilled")

    def finish(self, ch: Channel, missed: list[Event], result: str) -> None:
        gen, ch.resync_gen = ch.resync_gen, 0
        self._fanout.fill(ch, missed, gen)
        self._metrics.redis_resyncs.labels(result).inc()
