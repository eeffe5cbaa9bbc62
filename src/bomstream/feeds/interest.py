"""Interest subscriptions: a BOM's channel is subscribed while someone here watches it.

A BOM is watched while it has an open stream, while a request for it
(stream, poll, ticket) is being answered, and for ``redis.unsubscribe_grace_s``
after its last stream left or its last request was answered. Then it is
unsubscribed.

Catch-up without a gap or a double: a request waits until Redis has confirmed
the subscription, and only then is history read. Whatever was published
before the subscription took effect is in history (in interest mode history
is written at publication); whatever comes after arrives live, and the hub
merges the two by event_id.

Once a subscription lapses (unsubscribed, the connection dropped, a cluster
node gave the slot up), the BOM's buffer no longer hears its events: the hub
is told at once, so the next request re-reads history, and open streams wait
(the hub holds their live events back) until the subscription is back and
history has filled in what they missed.

Changes are batched: everything decided in one event-loop iteration goes out
as one command per connection (one per hash slot on a cluster node), and
while changes keep coming, at most once every ``FLUSH_INTERVAL_S``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from typing import Protocol

from bomstream.feeds.link import Link
from bomstream.hub import Hub
from bomstream.metrics import Metrics

# The longest a request waits for Redis to confirm a new subscription.
CONFIRM_WAIT_S = 5.0
# Commands go out at most this often: the first change after a quiet spell
# goes at once (next loop iteration), a burst of them waits and shares one.
FLUSH_INTERVAL_S = 0.01


class Router(Protocol):
    def link_for(self, channel: bytes) -> Link | None:
        """The connected link that serves ``channel``, or None for now; the feed
        calls :meth:`Interest.reroute` once that may have changed."""
        ...

    def failing(self, channel: bytes) -> bool:
        """Whether the channel's connection is known to be down right now."""
        ...


class Watch:
    __slots__ = (
        "bom_id",
        "channel",
        "epoch",
        "holds",
        "link",
        "live",
        "seq",
        "streams",
        "subscribed",
        "until",
        "waiters",
    )

    def __init__(self, bom_id: str, channel: bytes) -> None:
        self.bom_id = bom_id
        self.channel = channel
        self.streams = False
        # Requests working on this BOM right now.
        self.holds = 0
        # Interest without a stream lasts until then (monotonic seconds).
        self.until = 0.0
        # Where the latest command for this channel went, its number, and
        # whether it was a subscribe.
        self.link: Link | None = None
        self.seq = 0
        self.subscribed = False
        # Redis confirmed that subscribe: events reach this process.
        self.live = False
        # Which confirmation made it live (see Interest.epoch).
        self.epoch = 0
        self.waiters: list[asyncio.Future[bool]] = []


def _nothing(bom_id: str) -> None:
    return None


class Interest:
    def __init__(self, hub: Hub, metrics: Metrics, grace_s: float, prefix: str) -> None:
        self._hub = hub
        self._metrics = metrics
        self._grace = grace_s
        self._prefix = prefix.encode()
        self._watches: dict[bytes, Watch] = {}
        # Watches without a stream, in order of `until` (every hold is now + grace).
        self._idle: OrderedDict[bytes, None] = OrderedDict()
        self._dirty: dict[bytes, Watch] = {}
        self._flush_handle: asyncio.Handle | None = None
        self._flushed_at = 0.0
        self._live = 0
        self._epochs = 0
        self.router: Router | None = None
        # Called when a BOM whose open streams wait for a re-sync is live again.
        self.on_live: Callable[[str], None] = _nothing

    def channel(self, bom_id: str) -> bytes:
        return self._prefix + bom_id.encode()

    def epoch(self, bom_id: str) -> int:
        """Changes whenever the BOM's subscription becomes live; -1 while it is not.
        A history read is complete if the epoch is the same before and after it."""
        w = self._watches.get(self.channel(bom_id))
        return w.epoch if w is not None and w.live else -1

    # -- requests and streams ------------------------------------------------

    @contextlib.asynccontextmanager
    async def hold(self, bom_id: str) -> AsyncIterator[bool]:
        """Keep ``bom_id`` watched while a request works on it (and for the
        grace after). Yields once its subscription is live: True, or False when
        it cannot be (its connection is down, or no confirmation in time)."""
        w = self._get(bom_id)
        w.holds += 1
        try:
            yield await self._until_live(w)
        finally:
            w.holds -= 1
            if self._watches.get(w.channel) is w:
                self._hold(w)

    async def _until_live(self, w: Watch) -> bool:
        if w.live:
            return True
        assert self.router is not None
        if self.router.failing(w.channel):
            return False
        fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        w.waiters.append(fut)
        self._mark(w)
        try:
            async with asyncio.timeout(CONFIRM_WAIT_S):
                return await fut
        except TimeoutError:
            return False
        finally:
            if fut in w.waiters:
                w.waiters.remove(fut)

    def first_stream(self, bom_id: str) -> None:
        w = self._get(bom_id)
        w.streams = True
        self._idle.pop(w.channel, None)
        if not w.live:
            # The stream registered on a buffer no subscription keeps current
            # (it lapsed after the request was let in): hold its live events
            # back until history has been read again.
            self._hub.begin_resync(bom_id)
            self._mark(w)

    def last_stream(self, bom_id: str) -> None:
        w = self._watches.get(self.channel(bom_id))
        if w is not None:
            w.streams = False
            self._hold(w)

    def _get(self, bom_id: str) -> Watch:
        channel = self.channel(bom_id)
        w = self._watches.get(channel)
        if w is None:
            w = self._watches[channel] = Watch(bom_id, channel)
        return w

    def _hold(self, w: Watch) -> None:
        if w.streams:
            return
        w.until = max(w.until, time.monotonic() + self._grace)
        self._idle[w.channel] = None
        self._idle.move_to_end(w.channel)

    def _wanted(self, w: Watch, now: float) -> bool:
        return w.streams or w.holds > 0 or w.until > now

    def expire(self) -> None:
        """Let go of BOMs whose grace has passed."""
        now = time.monotonic()
        idle = self._idle
        while idle:
            channel = next(iter(idle))
            w = self._watches.get(channel)
            if w is not None and w.until > now:
                break
            idle.popitem(last=False)
            if w is not None and not w.streams and not w.holds:
                self._mark(w)

    async def run(self) -> None:
        """Owner task of the grace timer."""
        tick = max(0.05, min(1.0, self._grace / 4))
        while True:
            await asyncio.sleep(tick)
            self.expire()

    # -- commands --------------------------------------------------------------

    def _mark(self, w: Watch) -> None:
        self._dirty[w.channel] = w
        if self._flush_handle is None:
            loop = asyncio.get_running_loop()
            wait = self._flushed_at + FLUSH_INTERVAL_S - loop.time()
            if wait > 0:
                self._flush_handle = loop.call_later(wait, self._flush)
            else:
                self._flush_handle = loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_handle = None
        self._flushed_at = asyncio.get_running_loop().time()
        dirty, self._dirty = self._dirty, {}
        assert self.router is not None
        now = time.monotonic()
        subscribe: dict[Link, dict[bytes, Watch]] = {}
        unsubscribe: dict[Link, dict[bytes, Watch]] = {}
        for channel, w in dirty.items():
            if self._watches.get(channel) is not w:
                continue
            if self._wanted(w, now):
                if w.subscribed and w.link is not None:
                    continue  # sent already: live, or waiting for its confirmation
                link = self.router.link_for(channel)
                if link is not None:
                    subscribe.setdefault(link, {})[channel] = w
            elif w.subscribed and w.link is not None and not w.link.closed.done():
                unsubscribe.setdefault(w.link, {})[channel] = w
            else:
                # Nothing to undo (never subscribed, or its connection is gone), or
                # an unsubscribe already on its way: a later watch starts afresh.
                self._drop(w)
        for link, watches in subscribe.items():
            self._send(link, watches, True)
        for link, watches in unsubscribe.items():
            self._send(link, watches, False)

    def _send(self, link: Link, watches: dict[bytes, Watch], subscribe: bool) -> None:
        sent = link.subscribe(watches.keys(), subscribe)
        verb = ("s" if link.sharded else "") + ("subscribe" if subscribe else "unsubscribe")
        self._metrics.redis_subscription_commands.labels(verb).inc(len(sent))
        self._metrics.redis_subscription_changes.labels(
            "subscribe" if subscribe else "unsubscribe"
        ).inc(len(watches))
        for seq, channels in sent:
            for channel in channels:
                w = watches[channel]
                w.link, w.seq, w.subscribed = link, seq, subscribe
                if not subscribe:
                    self._lapse(w)

    def _lapse(self, w: Watch) -> None:
        """Events of this BOM may no longer reach this process."""
        if w.live:
            w.live = False
            self._live -= 1
            self._metrics.redis_subscribed_channels.set(self._live)
        self._hub.begin_resync(w.bom_id)

    def _drop(self, w: Watch) -> None:
        del self._watches[w.channel]
        self._idle.pop(w.channel, None)

    # -- what the connections report -------------------------------------------

    def on_confirmed(self, link: Link, channel: bytes, subscribed: bool, seq: int) -> None:
        w = self._watches.get(channel)
        if w is None or w.link is not link or w.seq != seq:
            return  # overtaken by a later command
        if subscribed and w.subscribed:
            if not w.live:
                w.live = True
                self._epochs += 1
                w.epoch = self._epochs
                self._live += 1
                self._metrics.redis_subscribed_channels.set(self._live)
            if self._hub.resyncing(w.bom_id):
                self.on_live(w.bom_id)
            self._wake(w, True)
        elif not subscribed and not w.subscribed and not self._wanted(w, time.monotonic()):
            self._drop(w)

    def on_lost(self, link: Link, channel: bytes) -> None:
        """Redis dropped the subscription itself (a cluster node gave up its slot)."""
        w = self._watches.get(channel)
        if w is not None and w.link is link:
            w.link, w.subscribed = None, False
            self._lapse(w)
            self._mark(w)

    def on_refused(self, link: Link, channels: tuple[bytes, ...], seq: int) -> None:
        """A command that did not take effect (``MOVED``...): route it again."""
        for channel in channels:
            w = self._watches.get(channel)
            if w is not None and w.link is link and w.seq == seq:
                w.link, w.subscribed = None, False
                self._lapse(w)
                self._mark(w)

    def link_down(self, link: Link) -> None:
        for w in list(self._watches.values()):
            if w.link is link:
                w.link, w.subscribed = None, False
                self._lapse(w)
                # Requests waiting on it get their answer (503) now, not after the timeout.
                self._wake(w, False)
                self._mark(w)

    def reroute(self) -> None:
        """Connections or the slot map changed: send what could not be sent."""
        for w in self._watches.values():
            if w.link is None:
                self._mark(w)

    def _wake(self, w: Watch, live: bool) -> None:
        waiters, w.waiters = w.waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(live)
