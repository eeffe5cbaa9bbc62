"""What a new single-BOM stream is sent before live events, from the BOM's buffer.

A resuming client gets every event after its ``Last-Event-ID``; a new one,
the BOM's latest event (a snapshot). A terminal event ends the stream right
after it, even one the caller may not see, unless visible events follow it
(a new run has begun). Multi-BOM streams have their own rules
(:mod:`bomstream.multi.catchup`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from bomstream.channel import Channel, latest_visible, visible
from bomstream.events import Event
from bomstream.principal import Principal

Access = Literal["ok", "forbidden", "finished"]


def access(ch: Channel | None, principal: Principal, last_event_id: str | None) -> Access:
    """Decided before any byte is sent: 403 for another org's BOM, 204 when the
    client already holds the BOM's terminal event."""
    if ch is None:
        return "ok"
    if principal.org is not None and ch.owner is not None and ch.owner != principal.org:
        return "forbidden"
    if last_event_id is not None:
        anchor = ch.buffer.get(last_event_id)
        latest = ch.buffer.latest
        # Finished when the run is over and the client holds everything of
        # it that it may see (the terminal event itself may be invisible).
        if (
            anchor is not None
            and latest is not None
            and latest.terminal
            and not any(visible(e, principal.org) for e in ch.buffer.after(anchor))
        ):
            return "finished"
    return "ok"


@dataclass(slots=True)
class Catchup:
    events: list[Event] = field(default_factory=list)
    resumed: bool = False
    # Whether the client named a position that the buffer held.
    hit: bool = False
    # The terminal event type that ends the stream right after catch-up.
    end_reason: str | None = None


def catchup(ch: Channel | None, org: str | None, last_event_id: str | None) -> Catchup:
    out = Catchup()
    if ch is None:
        return out
    anchor = ch.buffer.get(last_event_id) if last_event_id else None
    events: list[Event] = []
    if anchor is not None:
        out.resumed = out.hit = True
        events = list(ch.buffer.after(anchor))
    else:
        latest = latest_visible(ch, org)
        if latest is not None:
            events = [latest]
        if ch.buffer.latest is not None and ch.buffer.latest is not latest:
            # An invisible terminal event still ends the run for this stream.
            events.append(ch.buffer.latest)
    last_visible = max((i for i, e in enumerate(events) if visible(e, org)), default=-1)
    for i, ev in enumerate(events):
        if ev.terminal and (i > last_visible or visible(ev, org)):
            events = events[: i + 1]
            out.end_reason = ev.event_type
            break
    out.events = [e for e in events if visible(e, org)]
    return out
