"""The in-process broker: per-BOM replay buffers and fan-out to open streams.

Everything here is synchronous and runs on the event loop thread, which is
what makes replay race-free: reading the buffer for a new stream's catch-up
and registering that stream for live events happen in one step, with no
``await`` in between, so no event can fall between them or arrive twice.

Fan-out writes one pre-framed HTTP chunk straight to each stream's transport.
There is no queue and no task wake-up per stream; the transport's own write
buffer is the send queue, and its size is the back-pressure signal.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from bomstream.buffer import BomBuffer
from bomstream.config import Config
from bomstream.deadlines import Deadlines
from bomstream.events import (
    KEEPALIVE_CHUNK,
    Event,
    chunk,
    connected_frame,
    retry_frame,
    stream_end_chunk,
)
from bomstream.metrics import Metrics
from bomstream.principal import Principal
from bomstream.wheel import TimerWheel

log = logging.getLogger("bomstream.hub")

# Why a stream ended. Terminal event types are reasons too.
SERVER_SHUTDOWN = "server_shutdown"
MAX_DURATION = "max_duration"
TOKEN_EXPIRED = "token_expired"
FORBIDDEN = "forbidden"
SLOW_CONSUMER = "slow_consumer"
CLIENT_GONE = "client_disconnected"

Access = Literal["ok", "forbidden", "finished"]


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
        # Slot on the hub's heartbeat wheel; -1 once off it.
        self._beat_slot = -1
        # Key on the hub's deadline timer; -1 when the stream has no deadline.
        self._deadline_key = -1


class _Group:
    """The streams of one BOM that see the same events (one org, or all orgs)."""

    __slots__ = ("delivered", "subs")

    def __init__(self) -> None:
        self.subs: set[Subscriber] = set()
        # Events written to this group since it was made; a stream's count of
        # events sent is this minus its base, so nothing is counted per stream.
        self.delivered = 0


class _Channel:
    __slots__ = ("bom_id", "buffer", "groups", "last_event_at", "owner", "pending")

    def __init__(self, bom_id: str, capacity: int) -> None:
        self.bom_id = bom_id
        self.buffer = BomBuffer(capacity)
        # A BOM belongs to the org of its first event that names one.
        self.owner: str | None = None
        self.groups: dict[str | None, _Group] = {}
        self.pending: list[Event] = []
        self.last_event_at = time.monotonic()

    def has_subscribers(self) -> bool:
        return any(g.subs for g in self.groups.values())


@dataclass(slots=True)
class Opened:
    """What a new stream writes first, and the live subscription (None if already over)."""

    initial: bytes
    sub: Subscriber | None
    resumed: bool
    end_reason: str | None
    catchup_events: int


def _visible(event: Event, org: str | None) -> bool:
    return org is None or event.org == org


class Hub:
    def __init__(self, cfg: Config, metrics: Metrics) -> None:
        self._cfg = cfg
        self._metrics = metrics
        self._channels: dict[str, _Channel] = {}
        # Channels holding events, least recently updated first (for the BOM cap).
        self._recency: OrderedDict[str, None] = OrderedDict()
        self._dirty: dict[str, _Channel] = {}
        self._flush_handle: asyncio.Handle | None = None
        self._retry_chunk = chunk(retry_frame(cfg.server.retry_ms))
        self._send_limit = cfg.server.send_queue_bytes
        self._beats: TimerWheel[Subscriber] = TimerWheel(cfg.server.heartbeat_s, self._heartbeat)
        self._deadlines: Deadlines[Subscriber] = Deadlines(self.end)
        self.stream_count = 0
        self.streams_by_org: Counter[str | None] = Counter()
        self.closing = False

    # -- ingest --------------------------------------------------------------

    def ingest(self, event: Event, source: str) -> bool:
        """Buffer an accepted event and schedule its fan-out. False for a duplicate."""
        ch = self._channels.get(event.bom_id)
        if ch is None:
            ch = self._channels[event.bom_id] = _Channel(
                event.bom_id, self._cfg.buffer.events_per_bom
            )
        elif event.event_id in ch.buffer:
            self._metrics.events_dropped.labels("duplicate").inc()
            return False
        ch.buffer.append(event)
        if ch.owner is None and event.org is not None:
            ch.owner = event.org
        ch.last_event_at = time.monotonic()
        self._touch(ch)
        ch.pending.append(event)
        if not self._dirty:
            self._flush_handle = asyncio.get_running_loop().call_soon(self._flush_dirty)
        self._dirty[ch.bom_id] = ch
        self._metrics.events_received.labels(source).inc()
        return True

    def _touch(self, ch: _Channel) -> None:
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
        if ch.pending:
            self._flush(ch)
        self._dirty.pop(bom_id, None)
        if ch.has_subscribers():
            ch.buffer.clear()
        else:
            del self._channels[bom_id]

    # -- fan-out -------------------------------------------------------------

    def _flush_dirty(self) -> None:
        dirty, self._dirty = self._dirty, {}
        self._flush_handle = None
        for ch in dirty.values():
            if ch.pending:
                self._flush(ch)

    def _flush(self, ch: _Channel) -> None:
        """Write every pending event of one BOM to its streams, coalesced per group."""
        pending, ch.pending = ch.pending, []
        terminal: Event | None = None
        for i, ev in enumerate(pending):
            if ev.terminal:
                # Streams close at a terminal event; what follows (a new run)
                # is read from the buffer by the streams that reconnect.
                terminal = ev
                pending = pending[: i + 1]
                break
        if not ch.groups:
            return
        now = time.time()
        all_blob = pending[0].chunk if len(pending) == 1 else b"".join(e.chunk for e in pending)
        delivered = 0
        # Events written to at least one stream, for the publish-to-write histogram.
        written_all = False
        written_some: dict[str, Event] = {}
        for org, group in list(ch.groups.items()):
            if not group.subs:
                continue
            if org is not None and ch.owner is not None and ch.owner != org:
                self._end_group(group, FORBIDDEN)
                continue
            if org is None:
                visible = len(pending)
                blob = all_blob
            else:
                mine = [e for e in pending if e.org == org]
                visible = len(mine)
                blob = all_blob if visible == len(pending) else b"".join(e.chunk for e in mine)
                if visible and visible < len(pending):
                    written_some.update((e.event_id, e) for e in mine)
            if terminal is not None:
                blob += stream_end_chunk(terminal.event_type)
            elif not blob:
                continue
            if visible == len(pending):
                written_all = True
            group.delivered += visible
            delivered += visible * len(group.subs)
            self._write_group(group, blob, terminal)
        self._metrics.events_delivered.inc(delivered)
        observe = self._metrics.publish_to_write.observe
        for ev in pending if written_all else written_some.values():
            # created_at comes from the worker's clock; skew must not make it negative.
            observe(max(0.0, now - (ev.created_at or ev.received_at)))

    def _write_group(self, group: _Group, blob: bytes, terminal: Event | None) -> None:
        limit = self._send_limit
        gone: list[tuple[Subscriber, str]] = []
        for sub in group.subs:
            t = sub.transport
            if t.is_closing():
                gone.append((sub, CLIENT_GONE))
                continue
            t.write(blob)
            if terminal is not None:
                gone.append((sub, terminal.event_type))
            elif t.get_write_buffer_size() > limit:
                gone.append((sub, SLOW_CONSUMER))
        for sub, reason in gone:
            if reason == SLOW_CONSUMER:
                self._cut_slow(sub)
            else:
                self._finish(sub, reason)

    def _cut_slow(self, sub: Subscriber) -> None:
        """A stream past server.send_queue_bytes: abort frees its unsent bytes now,
        and the client resumes with Last-Event-ID."""
        self._metrics.slow_consumer_disconnects.inc()
        sub.transport.abort()
        self._finish(sub, SLOW_CONSUMER)

    def _end_group(self, group: _Group, reason: str) -> None:
        for sub in list(group.subs):
            self.end(sub, reason)

    # -- streams -------------------------------------------------------------

    def check_access(self, bom_id: str, principal: Principal, last_event_id: str | None) -> Access:
        """Decide before any byte is sent: 403 for another org's BOM, 204 when the
        client already holds the BOM's terminal event."""
        ch = self._channels.get(bom_id)
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
                and not any(_visible(e, principal.org) for e in ch.buffer.after(anchor))
            ):
                return "finished"
        return "ok"

    def _latest_visible(self, ch: _Channel, org: str | None) -> Event | None:
        for ev in reversed(ch.buffer):
            if _visible(ev, org):
                return ev
        return None

    def open(
        self,
        bom_id: str,
        principal: Principal,
        last_event_id: str | None,
        transport: asyncio.WriteTransport,
    ) -> Opened:
        """Build a new stream's first bytes and register it for live events, atomically."""
        ch = self._channels.get(bom_id)
        if ch is not None and ch.pending:
            # Deliver what is in flight first, so catch-up and live cannot overlap.
            self._flush(ch)
            self._dirty.pop(bom_id, None)
        org = principal.org
        resumed = False
        catchup: list[Event] = []
        if ch is None and last_event_id:
            self._metrics.replay.labels("miss").inc()
        if ch is not None:
            anchor = ch.buffer.get(last_event_id) if last_event_id else None
            if last_event_id:
                self._metrics.replay.labels("hit" if anchor else "miss").inc()
            if anchor is not None:
                resumed = True
                catchup = list(ch.buffer.after(anchor))
            else:
                latest = self._latest_visible(ch, org)
                if latest is not None:
                    catchup = [latest]
                if ch.buffer.latest is not None and ch.buffer.latest is not latest:
                    # An invisible terminal event still ends the run for this stream.
                    catchup.append(ch.buffer.latest)
        end_reason: str | None = None
        # A terminal event this stream may not see still ends it, unless the
        # stream has visible events after it (a new run has begun).
        last_visible = max((i for i, e in enumerate(catchup) if _visible(e, org)), default=-1)
        for i, ev in enumerate(catchup):
            if ev.terminal and (i > last_visible or _visible(ev, org)):
                catchup = catchup[: i + 1]
                end_reason = ev.event_type
                break
        catchup = [e for e in catchup if _visible(e, org)]
        if catchup:
            self._metrics.events_delivered.inc(len(catchup))
        parts = [self._retry_chunk, chunk(connected_frame(bom_id, resumed))]
        parts.extend(e.chunk for e in catchup)
        if end_reason is not None:
            parts.append(stream_end_chunk(end_reason))
            self._metrics.stream_end.labels(end_reason).inc()
            return Opened(b"".join(parts), None, resumed, end_reason, len(catchup))
        if ch is None:
            ch = self._channels[bom_id] = _Channel(bom_id, self._cfg.buffer.events_per_bom)
        sub = Subscriber(bom_id, principal, transport)
        sub.catchup_events = len(catchup)
        group = ch.groups.get(org)
        if group is None:
            group = ch.groups[org] = _Group()
        group.subs.add(sub)
        sub.delivered_base = group.delivered
        self.stream_count += 1
        self.streams_by_org[org] += 1
        self._metrics.streams_active.set(self.stream_count)
        sub._beat_slot = self._beats.add(sub)
        deadline = self._deadline_for(principal)
        if deadline is not None:
            reason, when = deadline
            sub._deadline_key = self._deadlines.add(sub, when, reason)
        return Opened(b"".join(parts), sub, resumed, None, len(catchup))

    def _deadline_for(self, principal: Principal) -> tuple[str, float] | None:
        """Seconds from now until the stream must end, and why."""
        candidates: list[tuple[str, float]] = []
        s = self._cfg.server
        if s.max_stream_s > 0:
            jitter = random.uniform(0, s.max_stream_jitter_s) if s.max_stream_jitter_s else 0.0
            candidates.append((MAX_DURATION, s.max_stream_s + jitter))
        if principal.expires_at is not None:
            candidates.append((TOKEN_EXPIRED, principal.expires_at - time.time()))
        return min(candidates, key=lambda c: c[1]) if candidates else None

    def _heartbeat(self, sub: Subscriber) -> None:
        t = sub.transport
        if sub.reason is not None:
            return
        if t.is_closing():
            self._finish(sub, CLIENT_GONE)
            return
        t.write(KEEPALIVE_CHUNK)
        if t.get_write_buffer_size() > self._send_limit:
            self._cut_slow(sub)

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
        if sub._beat_slot >= 0:
            self._beats.remove(sub, sub._beat_slot)
            sub._beat_slot = -1
        if sub._deadline_key >= 0:
            self._deadlines.remove(sub, sub._deadline_key)
            sub._deadline_key = -1
        ch = self._channels.get(sub.bom_id)
        if ch is None:
            return
        group = ch.groups.get(sub.group)
        if group is None or sub not in group.subs:
            return
        group.subs.discard(sub)
        sub.live_events = group.delivered - sub.delivered_base
        self.stream_count -= 1
        self.streams_by_org[sub.group] -= 1
        if self.streams_by_org[sub.group] <= 0:
            del self.streams_by_org[sub.group]
        self._metrics.streams_active.set(self.stream_count)
        if not group.subs:
            del ch.groups[sub.group]
            if not ch.groups and len(ch.buffer) == 0:
                del self._channels[sub.bom_id]
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
            out.append((bom_id, sum(len(g.subs) for g in ch.groups.values()), ch.buffer.latest))
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
