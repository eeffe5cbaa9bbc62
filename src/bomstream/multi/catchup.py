"""What a multi-BOM stream is sent first, and what a multi-BOM poll returns.

Given the BOMs and the cursor a client resumes from, each BOM gets what a
single-BOM stream would: the events after its position when they can be
placed, else its latest event (a snapshot) and a mention in ``gaps``. The
cursor names one event (:mod:`.cursor`); its BOM resumes right after it in
that BOM's buffer, and every other BOM after the event's place in an order
across BOMs. Two orders serve:

- **history's sequence** (``Event.hseq``), taken once per event when Redis
  history first stores it, the same on every instance and across restarts;
- **arrival here** (``Event.arrival``), the order this process received live
  events in, which is Redis's publication order on every instance
  subscribed to the pattern, for events that have no sequence yet (the
  writer stores them a moment after delivery) or where history keeps none.

A BOM cannot be placed when its buffer has let go of events after the
position, or when the named event has neither order here.

Everything is returned oldest first (events held from history only, by
sequence, before live ones, by arrival), so the last ``id:`` sent is the
newest position and a later resume from it misses nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

from bomstream.buffer import Position
from bomstream.channel import Channel, latest_visible, visible
from bomstream.events import Event
from bomstream.multi.cursor import matches


@dataclass(slots=True)
class Plan:
    events: list[Event] = field(default_factory=list)
    resumed: bool = False
    gaps: list[str] = field(default_factory=list)


def find(ch: Channel | None, ref: str) -> Event | None:
    if ch is None:
        return None
    held = ch.buffer.get(ref)
    if held is not None:
        return held
    # A digest reference (a very long event_id): rare, and only at connect.
    return next((e for e in ch.buffer if matches(e, ref)), None)


def after(event: Event, position: Event) -> bool:
    """Whether ``event`` (of any BOM) came after ``position`` in the feed."""
    if position.hseq and event.hseq:
        return event.hseq > position.hseq
    if position.arrival and event.arrival:
        return event.arrival > position.arrival
    # Live here and not stored yet, while the position is older than this
    # process (held from history only): newer. Held from history only,
    # while the position arrived live: older, or it would have arrived too.
    return bool(event.arrival) and not position.arrival


def _placed(position: Event, lost: Position) -> bool:
    """Whether no event after ``position`` is among those ``lost`` covers."""
    if position.hseq and lost.hseq > position.hseq:
        return False
    if position.arrival:
        return lost.arrival <= position.arrival
    # Held from history only: live events lost here came after it.
    return lost.arrival == 0


def plan(
    channels: Mapping[str, Channel],
    boms: Iterable[str],
    org: str | None,
    anchor: tuple[str, str] | None,
    forgotten: Position,
) -> Plan:
    """``anchor``: (bom_id, event reference) from the client's cursor.
    ``forgotten``: the newest position of any BOM this process has forgotten
    entirely, before which a BOM it does not hold may have had events."""
    out = Plan()
    if anchor is None:
        for bom_id in boms:
            snap = latest_visible(channels.get(bom_id), org)
            if snap is not None:
                out.events.append(snap)
        out.events.sort(key=_order)
        return out
    anchor_bom, ref = anchor
    held = find(channels.get(anchor_bom), ref)
    orderable = held is not None and bool(held.hseq or held.arrival)
    for bom_id in boms:
        ch = channels.get(bom_id)
        if held is not None and bom_id == anchor_bom and ch is not None:
            out.events.extend(e for e in ch.buffer.after(held) if visible(e, org))
            continue
        if held is not None and orderable:
            if ch is None and _placed(held, forgotten):
                continue
            if ch is not None and _placed(held, ch.buffer.evicted):
                out.events.extend(e for e in ch.buffer if after(e, held) and visible(e, org))
                continue
        # Not placed: what it missed is unknown, so it is a gap even with
        # nothing held to send in its place.
        out.gaps.append(bom_id)
        snap = latest_visible(ch, org)
        if snap is not None:
            out.events.append(snap)
    out.resumed = held is not None and not out.gaps
    out.events.sort(key=_order)
    return out


def _order(event: Event) -> tuple[int, int]:
    # Held from history only: published before this process subscribed.
    return (1, event.arrival) if event.arrival else (0, event.hseq)


def newest_of_org(
    channels: Mapping[str, Channel], newest_first: Iterator[str], org: str | None, limit: int
) -> tuple[str, ...]:
    """The first ``limit`` BOMs of ``newest_first`` that ``org`` (None: any) owns."""
    out: list[str] = []
    for bom_id in newest_first:
        if org is None or channels[bom_id].owner == org:
            out.append(bom_id)
            if len(out) >= limit:
                break
    return tuple(out)


def finished(channels: Mapping[str, Channel], boms: Iterable[str]) -> list[str]:
    """The BOMs whose latest event is terminal (seen by the caller or not)."""
    out = []
    for bom_id in boms:
        ch = channels.get(bom_id)
        latest = ch.buffer.latest if ch is not None else None
        if latest is not None and latest.terminal:
            out.append(bom_id)
    return out
