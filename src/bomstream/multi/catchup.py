"""What a multi-BOM stream is sent first, and what a multi-BOM poll returns.

Given the BOMs and the cursor a client resumes from, each BOM gets what a
single-BOM stream would: the events after its position when they can be
placed, else its latest event (a snapshot) and a mention in ``gaps``. The
cursor names one event (:mod:`.cursor`); its BOM resumes right after it in
that BOM's buffer, and every other BOM after the event's place in this
process's arrival order. A BOM cannot be placed when its buffer has let go
of events that arrived after that place, or when the named event is here
only from history (its arrival here is unknown).

Everything is returned in arrival order, so the last ``id:`` sent is the
newest position and a later resume from it misses nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

from bomstream.channel import Channel, visible
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


def latest_visible(ch: Channel | None, org: str | None) -> Event | None:
    if ch is None:
        return None
    return next((e for e in reversed(ch.buffer) if visible(e, org)), None)


def plan(
    channels: Mapping[str, Channel],
    boms: Iterable[str],
    org: str | None,
    anchor: tuple[str, str] | None,
    forgotten_arrival: int,
) -> Plan:
    """``anchor``: (bom_id, event reference) from the client's cursor.
    ``forgotten_arrival``: the newest arrival of any BOM this process has
    forgotten entirely, below which a BOM it does not hold may have had events."""
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
    position = held.arrival if held is not None else 0
    for bom_id in boms:
        ch = channels.get(bom_id)
        if held is not None and bom_id == anchor_bom and ch is not None:
            out.events.extend(e for e in ch.buffer.after(held) if visible(e, org))
            continue
        placed = held is not None and position > 0
        if placed and ch is not None:
            placed = ch.buffer.evicted_arrival <= position
        elif placed:
            placed = forgotten_arrival <= position
        if placed:
            if ch is not None:
                # An event held only from history (arrival 0) was published
                # before this process subscribed, so before the position.
                out.events.extend(e for e in ch.buffer if e.arrival > position and visible(e, org))
            continue
        snap = latest_visible(ch, org)
        if snap is not None:
            out.events.append(snap)
            out.gaps.append(bom_id)
    out.resumed = held is not None and not out.gaps
    out.events.sort(key=_order)
    return out


def _order(event: Event) -> int:
    return event.arrival


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
