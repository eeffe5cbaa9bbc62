"""Who watches several BOMs, and the live fan-out to them.

A stream of a list of BOMs is entered in each listed BOM's channel
(``Channel.multi``); a ``scope=org`` stream is entered once, under its org,
so an event costs one lookup for the org streams however many BOMs they
span. Live events reach these streams in the order this process received
them across all BOMs, never per BOM: the ``id:`` of the last event a client
got must mean "everything before it arrived too" (see :mod:`.cursor`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator

from bomstream.channel import Channel, Subscriber, visible
from bomstream.events import Event
from bomstream.metrics import Metrics
from bomstream.multi.cursor import multi_chunk
from bomstream.principal import Principal
from bomstream.reasons import CLIENT_GONE, SLOW_CONSUMER

Ending = Callable[[Subscriber, str], None]

# The label of a multi-BOM stream where a single one names its BOM (logs).
LIST_LABEL = "*"
ORG_LABEL = "org:*"


class MultiSub(Subscriber):
    """A stream of a list of BOMs (``boms``), or of every BOM its caller may
    see (``boms`` is None)."""

    __slots__ = ("boms",)

    def __init__(
        self,
        boms: tuple[str, ...] | None,
        principal: Principal,
        transport: asyncio.WriteTransport,
    ) -> None:
        super().__init__(LIST_LABEL if boms is not None else ORG_LABEL, principal, transport)
        self.boms = boms

    @property
    def kind(self) -> str:
        return "multi" if self.boms is not None else "org"


class Registry:
    def __init__(
        self,
        channels: dict[str, Channel],
        metrics: Metrics,
        send_limit: int,
        finish: Ending,
        cut_slow: Callable[[Subscriber], None],
    ) -> None:
        self._channels = channels
        self._metrics = metrics
        self._send_limit = send_limit
        self._finish = finish
        self._cut_slow = cut_slow
        # scope=org streams by the org they see (None: every org).
        self._orgs: dict[str | None, set[MultiSub]] = {}
        # Events not yet written, in arrival order, each with the merge
        # generation a stream must be older than to get it (0: every stream).
        self._queue: list[tuple[Event, int]] = []
        self._subs: set[MultiSub] = set()

    @property
    def count(self) -> int:
        return len(self._subs)

    # -- bookkeeping ----------------------------------------------------------

    def add(self, sub: MultiSub, channel_for: Callable[[str], Channel]) -> None:
        if sub.boms is None:
            self._orgs.setdefault(sub.group, set()).add(sub)
        else:
            for bom_id in sub.boms:
                ch = channel_for(bom_id)
                if ch.multi is None:
                    ch.multi = set()
                ch.multi.add(sub)
        self._subs.add(sub)

    def remove(self, sub: MultiSub) -> list[Channel] | None:
        """Unregister: the channels it left (the hub drops those nobody needs
        any more), or None when it was not registered."""
        if sub not in self._subs:
            return None
        self._subs.discard(sub)
        left: list[Channel] = []
        if sub.boms is None:
            subs = self._orgs.get(sub.group)
            if subs is not None:
                subs.discard(sub)
                if not subs:
                    del self._orgs[sub.group]
        else:
            for bom_id in sub.boms:
                ch = self._channels.get(bom_id)
                if ch is not None and ch.multi is not None:
                    ch.multi.discard(sub)
                    if not ch.multi:
                        ch.multi = None
                    left.append(ch)
        return left

    def every(self) -> list[MultiSub]:
        return list(self._subs)

    # -- fan-out ---------------------------------------------------------------

    def push(self, event: Event, before_gen: int = 0) -> bool:
        """Queue a live event; True when it is the first of a new batch."""
        if not self.count:
            return False
        self._queue.append((event, before_gen))
        return len(self._queue) == 1

    def flush(self) -> None:
        """Write every queued event to the streams watching its BOM: each
        stream's share as one write, and each event's frame built once."""
        queue, self._queue = self._queue, []
        if not queue:
            return
        out: dict[Subscriber, list[bytes]] = {}
        for event, before_gen in queue:
            frame = b""
            for sub in self._targets(event):
                if before_gen and sub.gen >= before_gen:
                    continue
                if not frame:
                    frame = multi_chunk(event)
                parts = out.get(sub)
                if parts is None:
                    out[sub] = [frame]
                else:
                    parts.append(frame)
        delivered = 0
        limit = self._send_limit
        gone: list[tuple[Subscriber, str]] = []
        for sub, parts in out.items():
            t = sub.transport
            if sub.reason is not None:
                continue
            if t.is_closing():
                gone.append((sub, CLIENT_GONE))
                continue
            t.write(parts[0] if len(parts) == 1 else b"".join(parts))
            sub.live_events += len(parts)
            delivered += len(parts)
            if t.get_write_buffer_size() > limit:
                gone.append((sub, SLOW_CONSUMER))
        self._metrics.events_delivered.inc(delivered)
        for sub, reason in gone:
            if reason == SLOW_CONSUMER:
                self._cut_slow(sub)
            else:
                self._finish(sub, reason)

    def _targets(self, event: Event) -> Iterator[Subscriber]:
        ch = self._channels.get(event.bom_id)
        if ch is not None and ch.multi:
            owner = ch.owner
            strays: list[Subscriber] = []
            for sub in ch.multi:
                org = sub.group
                if org is not None and owner is not None and owner != org:
                    # Another org's BOM: left out of this stream from now on.
                    strays.append(sub)
                elif visible(event, org):
                    yield sub
            for sub in strays:
                ch.multi.discard(sub)
            if not ch.multi:
                ch.multi = None
        everyone = self._orgs.get(None)
        if everyone:
            yield from everyone
        if event.org is not None:
            mine = self._orgs.get(event.org)
            if mine:
                yield from mine
