"""The in-process broker: per-BOM replay buffers, streams, and their lifecycle.

Everything here is synchronous and runs on the event loop thread, which is
what makes replay race-free: reading the buffer for a new stream's catch-up
and registering that stream for live events happen in one step, with no
``await`` in between, so no event can fall between them or arrive twice.
Who watches what lives in :mod:`bomstream.channel`; writing events to the
streams in :mod:`bomstream.fanout`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, OrderedDict

from bomstream.buffer import Position
from bomstream.catchup import Access, access, catchup
from bomstream.channel import Channel, Group, NoWatchers, Opened, Subscriber, Watchers
from bomstream.config import Config
from bomstream.events import (
    Event,
    chunk,
    connected_frame,
    retry_frame,
    stream_end_chunk,
)
from bomstream.fanout import FanOut
from bomstream.merge import Resyncs, merge_plain, merge_resync
from bomstream.metrics import Metrics
from bomstream.multi.catchup import Plan, finished, newest_of_org, plan
from bomstream.multi.cursor import connected_frame as multi_connected_frame
from bomstream.multi.cursor import multi_chunk
from bomstream.multi.registry import MultiSub, Registry
from bomstream.principal import Principal
from bomstream.reasons import CLIENT_GONE, SERVER_SHUTDOWN
from bomstream.timers import StreamTimers

# The reasons the request handlers name are re-exported from here.
__all__ = ["CLIENT_GONE", "SERVER_SHUTDOWN", "Access", "Hub"]

log = logging.getLogger("bomstream.hub")


class Hub:
    def __init__(self, cfg: Config, metrics: Metrics) -> None:
        self._cfg = cfg
        self._metrics = metrics
        self._channels: dict[str, Channel] = {}
        # Channels holding events, least recently updated first (for the BOM cap).
        self._recency: OrderedDict[str, None] = OrderedDict()
        self._dirty: dict[str, Channel] = {}
        self._flush_handle: asyncio.Handle | None = None
        self._retry_chunk = chunk(retry_frame(cfg.server.retry_ms))
        self._send_limit = cfg.server.send_queue_bytes
        self._fanout = FanOut(metrics, self._send_limit, self.end, self._finish)
        self._timers = StreamTimers(
            cfg.server, end=self.end, finish=self._finish, cut_slow=self._fanout.cut_slow
        )
        self._resyncs = Resyncs(self._channels, self._dirty, self._fanout, metrics)
        self._multi = Registry(
            self._channels, metrics, self._send_limit, self._finish, self._fanout.cut_slow
        )
        # Live events in the order they arrived, across every BOM (multi-BOM
        # streams resume by it), and history merges, numbered across every
        # BOM too, so a stream spanning BOMs compares with any of them.
        self._arrival = 0
        self._merge_gen = 0
        # The newest position among BOMs forgotten entirely (bomstream.multi.catchup).
        self._forgotten = Position()
        self.stream_count = 0
        self.streams_by_org: Counter[str | None] = Counter()
        self.closing = False
        self.watchers: Watchers = NoWatchers()

    # -- ingest --------------------------------------------------------------

    def ingest(self, event: Event, source: str) -> bool:
        """Buffer an accepted event and schedule its fan-out. False for a duplicate."""
        ch = self._channels.get(event.bom_id)
        if ch is None:
            ch = self._channels[event.bom_id] = Channel(
                event.bom_id, self._cfg.buffer.events_per_bom
            )
        elif (held := ch.buffer.get(event.event_id)) is not None:
            if held.hist_gen:
                # Held from history, and this is its first live arrival.
                self._metrics.events_received.labels(source).inc()
                self._arrival += 1
                held.arrival = self._arrival
                if self._multi.push(held, held.hist_gen):
                    self._schedule_flush()
                if ch.resync_gen:
                    ch.pending.append(held)
                else:
                    self._fanout.deliver_late(ch, held)
            else:
                self._metrics.events_dropped.labels("duplicate").inc()
            return False
        self._arrival += 1
        event.arrival = self._arrival
        ch.buffer.append(event)
        self._multi.push(event)
        if ch.owner is None and event.org is not None:
            ch.owner = event.org
        ch.last_event_at = time.monotonic()
        self._metrics.events_received.labels(source).inc()
        self._touch(ch)
        ch.pending.append(event)
        if not self._dirty:
            self._schedule_flush()
        self._dirty[ch.bom_id] = ch
        return True

    def _schedule_flush(self) -> None:
        if self._flush_handle is None:
            self._flush_handle = asyncio.get_running_loop().call_soon(self._flush_dirty)

    def needs_history(self, bom_id: str) -> bool:
        """Whether the process buffer alone cannot answer for this BOM."""
        ch = self._channels.get(bom_id)
        return ch is None or not ch.history_loaded

    def knows(self, bom_id: str) -> bool:
        return bom_id in self._channels

    def merge_history(self, bom_id: str, events: list[Event], *, complete: bool = False) -> None:
        """Merge a BOM's history (oldest first) into its buffer, by ``event_id``
        (:mod:`bomstream.merge`). ``complete``: the feed has carried the BOM
        since before history was read (interest mode), so a BOM that history
        knows nothing of is held as known and empty, not read again per request."""
        ch = self._channels.get(bom_id)
        if ch is None:
            if not events and not complete:
                return
            ch = self._channels[bom_id] = Channel(bom_id, self._cfg.buffer.events_per_bom)
        ch.history_loaded = True
        if ch.resync_gen:
            self._dirty.pop(bom_id, None)
            self._resyncs.finish(ch, merge_resync(ch, events), "filled")
        else:
            if ch.pending:
                self._fanout.flush(ch)
                self._dirty.pop(bom_id, None)
            # Generations count across BOMs (see __init__).
            ch.merge_gen = max(ch.merge_gen, self._merge_gen)
            merged = merge_plain(ch, events)
            self._merge_gen = max(ch.merge_gen, self._merge_gen)
            if not merged:
                return
        if ch.buffer:
            ch.owner = next((e.org for e in ch.buffer if e.org is not None), None)
            ch.last_event_at = time.monotonic()
            self._touch(ch)

    def begin_resync(self, bom_id: str) -> None:
        """The BOM's subscription lapsed (see :class:`bomstream.merge.Resyncs`)."""
        self._resyncs.begin(bom_id)

    def resyncing(self, bom_id: str) -> bool:
        return self._resyncs.active(bom_id)

    def end_resync(self, bom_id: str) -> None:
        """History cannot fill the gap: release the live events held back."""
        self._resyncs.give_up(bom_id)

    def _touch(self, ch: Channel) -> None:
        recency = self._recency
        recency[ch.bom_id] = None
        recency.move_to_end(ch.bom_id)
        while len(recency) > self._cfg.buffer.max_boms:
            oldest, _ = recency.popitem(last=False)
            self._forget(oldest)

    def _forget(self, bom_id: str) -> None:
        """Drop a BOM's history; its open streams stay open and keep receiving."""
        ch = self._channels.get(bom_id)
        if ch is None:
            return
        self._recency.pop(bom_id, None)
        self.end_resync(bom_id)
        if ch.pending:
            self._fanout.flush(ch)
        self._dirty.pop(bom_id, None)
        if ch.has_subscribers():
            ch.buffer.clear()
            ch.history_loaded = False
        else:
            self._drop_channel(ch)

    def _drop_channel(self, ch: Channel) -> None:
        ch.buffer.clear()
        evicted = ch.buffer.evicted
        self._forgotten.arrival = max(self._forgotten.arrival, evicted.arrival)
        self._forgotten.hseq = max(self._forgotten.hseq, evicted.hseq)
        self._channels.pop(ch.bom_id, None)

    # -- fan-out -------------------------------------------------------------

    def _flush_dirty(self) -> None:
        # Emptied in place: the re-sync bookkeeping holds the same dict.
        dirty = list(self._dirty.values())
        self._dirty.clear()
        self._flush_handle = None
        for ch in dirty:
            if ch.pending and not ch.resync_gen:
                self._fanout.flush(ch)
        self._multi.flush()

    # -- streams -------------------------------------------------------------

    def check_access(self, bom_id: str, principal: Principal, last_event_id: str | None) -> Access:
        """Decide before any byte is sent (:func:`bomstream.catchup.access`)."""
        return access(self._channels.get(bom_id), principal, last_event_id)

    def open(
        self,
        bom_id: str,
        principal: Principal,
        last_event_id: str | None,
        transport: asyncio.WriteTransport,
    ) -> Opened:
        """Build a new stream's first bytes and register it for live events, atomically."""
        ch = self._channels.get(bom_id)
        if ch is not None and ch.pending and not ch.resync_gen:
            # Deliver what is in flight first, so catch-up and live cannot overlap.
            self._fanout.flush(ch)
            self._dirty.pop(bom_id, None)
        org = principal.org
        c = catchup(ch, org, last_event_id)
        if last_event_id:
            self._metrics.replay.labels("hit" if c.hit else "miss").inc()
        sent = len(c.events)
        self._metrics.events_delivered.inc(sent)
        parts = [self._retry_chunk, chunk(connected_frame(bom_id, c.resumed))]
        parts.extend(e.chunk for e in c.events)
        if c.end_reason is not None:
            parts.append(stream_end_chunk(c.end_reason))
            self._metrics.stream_end.labels(c.end_reason).inc()
            return Opened(b"".join(parts), None, c.resumed, c.end_reason, sent)
        if ch is None:
            ch = self._channels[bom_id] = Channel(bom_id, self._cfg.buffer.events_per_bom)
        sub = Subscriber(bom_id, principal, transport)
        sub.catchup_events = sent
        sub.gen = ch.merge_gen
        first = not ch.has_subscribers()
        group = ch.groups.get(org)
        if group is None:
            group = ch.groups[org] = Group()
        group.subs.add(sub)
        sub.delivered_base = group.delivered
        self._register(sub, "single")
        if first:
            self.watchers.first_stream(bom_id)
        return Opened(b"".join(parts), sub, c.resumed, None, sent)

    def open_multi(
        self,
        boms: tuple[str, ...] | None,
        principal: Principal,
        anchor: tuple[str, str] | None,
        transport: asyncio.WriteTransport,
    ) -> Opened:
        """A stream of several BOMs (``boms``), or of the caller's org (None):
        its catch-up (bomstream.multi.catchup) and its live registration, in one step."""
        # What has arrived is written out first, so catch-up and live cannot overlap.
        self._multi.flush()
        org = principal.org
        listed = boms if boms is not None else self.org_boms(org)
        p = plan(self._channels, listed, org, anchor, self._forgotten)
        if anchor is not None:
            self._metrics.replay.labels("hit" if p.resumed else "miss").inc()
        self._metrics.events_delivered.inc(len(p.events))
        parts = [self._retry_chunk, chunk(multi_connected_frame(boms, p.resumed, p.gaps))]
        parts.extend(multi_chunk(e) for e in p.events)
        sub = MultiSub(boms, principal, transport)
        sub.catchup_events = len(p.events)
        sub.gen = self._merge_gen
        self._multi.add(sub, self._channel_for)
        self._register(sub, sub.kind)
        return Opened(b"".join(parts), sub, p.resumed, None, len(p.events))

    def poll_multi(
        self, boms: tuple[str, ...] | None, org: str | None, anchor: tuple[str, str] | None
    ) -> tuple[Plan, list[str]]:
        """What a multi-BOM poll returns, and which of its BOMs are finished."""
        listed = boms if boms is not None else self.org_boms(org)
        p = plan(self._channels, listed, org, anchor, self._forgotten)
        return p, finished(self._channels, listed)

    def org_boms(self, org: str | None) -> tuple[str, ...]:
        """The most recently updated BOMs an org (None: every org) may see."""
        limit = self._cfg.limits.max_boms_per_stream
        return newest_of_org(self._channels, reversed(self._recency), org, limit)

    def _channel_for(self, bom_id: str) -> Channel:
        ch = self._channels.get(bom_id)
        if ch is None:
            ch = self._channels[bom_id] = Channel(bom_id, self._cfg.buffer.events_per_bom)
        return ch

    def _register(self, sub: Subscriber, kind: str) -> None:
        """What every stream has: its counts, heartbeat and deadline."""
        org = sub.group
        self.stream_count += 1
        self.streams_by_org[org] += 1
        self._metrics.streams_active.set(self.stream_count)
        self._metrics.streams_by_kind.labels(kind).inc()
        self._timers.add(sub)

    def _unregister(self, sub: Subscriber, kind: str) -> None:
        self.stream_count -= 1
        self.streams_by_org[sub.group] -= 1
        if self.streams_by_org[sub.group] <= 0:
            del self.streams_by_org[sub.group]
        self._metrics.streams_active.set(self.stream_count)
        self._metrics.streams_by_kind.labels(kind).dec()

    def end(self, sub: Subscriber, reason: str) -> None:
        """End a stream with a ``stream_end`` frame (shutdown, expiry, forbidden...)."""
        if sub.reason is not None:
            return
        t = sub.transport
        if not t.is_closing():
            t.write(stream_end_chunk(reason))
        self._finish(sub, reason)

    def _finish(self, sub: Subscriber, reason: str) -> None:
        """Unregister a stream and tell its handler why it ended."""
        if sub.reason is not None:
            return
        self._settle(sub, reason)
        self.detach(sub)

    def detach(self, sub: Subscriber) -> None:
        """Remove a stream from the broker; safe to call more than once."""
        self._timers.remove(sub)
        if isinstance(sub, MultiSub):
            self._detach_multi(sub)
            return
        ch = self._channels.get(sub.bom_id)
        if ch is None:
            return
        group = ch.groups.get(sub.group)
        if group is None or sub not in group.subs:
            return
        group.subs.discard(sub)
        sub.live_events = group.delivered - sub.delivered_base
        self._unregister(sub, "single")
        if not group.subs:
            del ch.groups[sub.group]
            if not ch.has_subscribers():
                # Nobody is left to hold events back for.
                self.end_resync(sub.bom_id)
                self.watchers.last_stream(sub.bom_id)
                if len(ch.buffer) == 0:
                    self._drop_channel(ch)
        if sub.reason is None:
            self._settle(sub, CLIENT_GONE)

    def _detach_multi(self, sub: MultiSub) -> None:
        left = self._multi.remove(sub)
        if left is None:
            return
        for ch in left:
            if not ch.has_subscribers() and len(ch.buffer) == 0:
                self._drop_channel(ch)
        self._unregister(sub, sub.kind)
        if sub.reason is None:
            self._settle(sub, CLIENT_GONE)

    def _settle(self, sub: Subscriber, reason: str) -> None:
        sub.reason = reason
        self._metrics.stream_end.labels(reason).inc()
        on_end, sub.on_end = sub.on_end, None
        if on_end is not None:
            # Soon, not now: the hub finishes unregistering the stream first.
            asyncio.get_running_loop().call_soon(on_end)

    def events_sent(self, sub: Subscriber) -> int:
        """Events written to a stream: its catch-up plus live events (after detach)."""
        return sub.catchup_events + sub.live_events

    def end_all(self, reason: str) -> int:
        """End every open stream (graceful shutdown). Returns how many were open."""
        self.closing = True
        subs = [s for ch in self._channels.values() for g in ch.groups.values() for s in g.subs]
        subs.extend(self._multi.every())
        for sub in subs:
            self.end(sub, reason)
        return len(subs)

    # -- reading -------------------------------------------------------------

    def held(self, bom_id: str) -> list[Event]:
        ch = self._channels.get(bom_id)
        return list(ch.buffer) if ch is not None else []

    def owner(self, bom_id: str) -> str | None:
        ch = self._channels.get(bom_id)
        return ch.owner if ch is not None else None

    def boms(self) -> list[tuple[str, int, Event | None]]:
        """(bom_id, open streams, latest event) for every BOM held, newest first."""
        out = []
        for bom_id in reversed(self._recency):
            ch = self._channels[bom_id]
            streams = sum(len(g.subs) for g in ch.groups.values()) + len(ch.multi or ())
            out.append((bom_id, streams, ch.buffer.latest))
        return out

    @property
    def bom_count(self) -> int:
        return len(self._recency)

    def sweep(self) -> int:
        """Forget BOMs whose last event is older than ``buffer.retention_s``."""
        cutoff = time.monotonic() - self._cfg.buffer.retention_s
        stale = []
        for bom_id in self._recency:  # oldest first, so stop at the first fresh one
            if self._channels[bom_id].last_event_at >= cutoff:
                break
            stale.append(bom_id)
        for bom_id in stale:
            self._forget(bom_id)
        return len(stale)

    async def run_sweeper(self) -> None:
        interval = max(0.05, min(30.0, self._cfg.buffer.retention_s / 4))
        while True:
            await asyncio.sleep(interval)
            forgotten = self.sweep()
            if forgotten:
                log.debug("forgot %d idle BOMs", forgotten)
