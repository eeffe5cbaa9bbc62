"""Fan-out: one BOM's pending events written to its open streams.

Each event's bytes are built once; a group of streams that sees the same
events gets one blob, written straight to each stream's transport. There is
no queue and no task wake-up per stream: the transport's own write buffer is
the send queue, and its size is the back-pressure signal.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from bomstream.channel import Channel, Group, Subscriber, visible
from bomstream.events import Event, stream_end_chunk
from bomstream.metrics import Metrics
from bomstream.reasons import CLIENT_GONE, FORBIDDEN, SLOW_CONSUMER

Ending = Callable[[Subscriber, str], None]


class FanOut:
    def __init__(self, metrics: Metrics, send_limit: int, end: Ending, finish: Ending) -> None:
        self._metrics = metrics
        self._send_limit = send_limit
        # end: with a stream_end frame; finish: unregister only (no frame).
        self._end = end
        self._finish = finish

    def flush(self, ch: Channel) -> None:
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
                shown = len(pending)
                blob = all_blob
            else:
                mine = [e for e in pending if e.org == org]
                shown = len(mine)
                blob = all_blob if shown == len(pending) else b"".join(e.chunk for e in mine)
                if shown and shown < len(pending):
                    written_some.update((e.event_id, e) for e in mine)
            if terminal is not None:
                blob += stream_end_chunk(terminal.event_type)
            elif not blob:
                continue
            if shown == len(pending):
                written_all = True
            group.delivered += shown
            delivered += shown * len(group.subs)
            self._write_group(group, blob, terminal)
        self._metrics.events_delivered.inc(delivered)
        observe = self._metrics.publish_to_write.observe
        for ev in pending if written_all else written_some.values():
            # created_at comes from the worker's clock; skew must not make it negative.
            observe(max(0.0, now - (ev.created_at or ev.received_at)))

    def deliver_late(self, ch: Channel, ev: Event) -> None:
        """The live copy of an event first held from history: write it to the
        streams that registered before it was merged (the rest had it in catch-up)."""
        gen, ev.hist_gen = ev.hist_gen, 0
        if ch.pending:
            self.flush(ch)
        for org, group in list(ch.groups.items()):
            subs = [s for s in group.subs if s.gen < gen]
            if not subs:
                continue
            seen = visible(ev, org)
            blob = ev.chunk if seen else b""
            if ev.terminal:
                blob += stream_end_chunk(ev.event_type)
            if not blob:
                continue
            if seen:
                # A stream's count of events sent is group.delivered minus its base.
                for sub in subs:
                    sub.delivered_base -= 1
                self._metrics.events_delivered.inc(len(subs))
            self.write_to(subs, blob, ev if ev.terminal else None)

    def fill(self, ch: Channel, events: list[Event], before_gen: int) -> None:
        """What the streams registered before generation ``before_gen`` missed
        while the BOM's subscription had lapsed, in order. An event held from
        an earlier history merge goes only to the streams registered before
        that merge; the others had it in catch-up."""
        for i, ev in enumerate(events):
            if ev.terminal:
                events = events[: i + 1]
                break
        terminal = events[-1] if events and events[-1].terminal else None
        delivered = 0
        for org, group in list(ch.groups.items()):
            if not group.subs:
                continue
            if org is not None and ch.owner is not None and ch.owner != org:
                self._end_group(group, FORBIDDEN)
                continue
            # Streams that get the same events share one blob.
            shares: dict[tuple[int, ...], list[Subscriber]] = {}
            for sub in group.subs:
                if sub.gen >= before_gen:
                    continue
                key = tuple(
                    i
                    for i, e in enumerate(events)
                    if (visible(e, org) or e is terminal)
                    and (not e.hist_gen or sub.gen < e.hist_gen)
                )
                shares.setdefault(key, []).append(sub)
            for key, subs in shares.items():
                shown = [events[i] for i in key if visible(events[i], org)]
                ends = terminal is not None and events.index(terminal) in key
                blob = b"".join(e.chunk for e in shown)
                if ends and terminal is not None:
                    blob += stream_end_chunk(terminal.event_type)
                if not blob:
                    continue
                for sub in subs:
                    sub.delivered_base -= len(shown)
                delivered += len(shown) * len(subs)
                self.write_to(subs, blob, terminal if ends else None)
        self._metrics.events_delivered.inc(delivered)
        for ev in events:
            ev.hist_gen = 0

    def _write_group(self, group: Group, blob: bytes, terminal: Event | None) -> None:
        self.write_to(group.subs, blob, terminal)

    def write_to(self, subs: Iterable[Subscriber], blob: bytes, terminal: Event | None) -> None:
        limit = self._send_limit
        gone: list[tuple[Subscriber, str]] = []
        for sub in subs:
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
                self.cut_slow(sub)
            else:
                self._finish(sub, reason)

    def cut_slow(self, sub: Subscriber) -> None:
        """A stream past server.send_queue_bytes: abort frees its unsent bytes now,
        and the client resumes with Last-Event-ID."""
        self._metrics.slow_consumer_disconnects.inc()
        sub.transport.abort()
        self._finish(sub, SLOW_CONSUMER)

    def _end_group(self, group: Group, reason: str) -> None:
        for sub in list(group.subs):
            self._end(sub, reason)
