"""The Redis broker: Redis pub/sub feeds the hub, and publishing goes to Redis.

Workers publish with plain ``PUBLISH enrichment:<bom_id> <json>`` (``SPUBLISH``
on a Redis Cluster). The subscriptions live in :mod:`bomstream.feeds`: one
connection per process to one Redis (``PSUBSCRIBE <prefix>*``, or per-BOM
subscriptions in interest mode), or one per node of a Redis Cluster. This
module checks each message the feed hears and hands it to the hub.
Publishing (the HTTP publish endpoint) goes through
:mod:`bomstream.publisher` on a separate client, since a subscribed
connection cannot publish.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from bomstream.config import Config
from bomstream.events import Event, EventRejected, is_valid_bom_id, parse_event
from bomstream.feeds.cluster import ClusterFeed
from bomstream.feeds.interest import Interest
from bomstream.feeds.link import FeedError
from bomstream.feeds.resp import RedisTarget, encode_command, parse_redis_url
from bomstream.feeds.single import SingleFeed
from bomstream.hub import Hub
from bomstream.logs import DropReporter
from bomstream.metrics import Metrics
from bomstream.publisher import AsyncPublisher, PublishSettings

# The RESP helpers moved to bomstream.feeds; the load client imports them from here.
__all__ = ["FeedError", "RedisBroker", "RedisTarget", "encode_command", "parse_redis_url"]

log = logging.getLogger("bomstream.redis")


class RedisBroker:
    def __init__(
        self,
        cfg: Config,
        hub: Hub,
        metrics: Metrics,
        record: Callable[[Event], None] | None = None,
    ) -> None:
        """``record`` stores each accepted feed event in shared history (pattern
        mode only: in interest mode history is written at publication)."""
        rc = cfg.redis
        self._cfg = cfg
        self._hub = hub
        self._metrics = metrics
        self._prefix = rc.channel_prefix.encode()
        self._record = None if rc.interest else record
        self._publisher: AsyncPublisher | None = None
        self._drops = DropReporter(log, "redis")
        self._max_bytes = cfg.limits.max_event_bytes
        self._terminal = frozenset(cfg.events.terminal_types)
        self.interest: Interest | None = None
        self._feed: SingleFeed | ClusterFeed
        if rc.interest:
            self.interest = Interest(hub, metrics, rc.unsubscribe_grace_s, rc.channel_prefix)
            hub.watchers = self.interest
        if rc.cluster:
            assert self.interest is not None
            self._feed = ClusterFeed(cfg, self.on_message, metrics, self.interest)
        else:
            self._feed = SingleFeed(cfg, self.on_message, metrics, self.interest)

    @property
    def status(self) -> str:
        return self._feed.status

    @property
    def healthy(self) -> bool:
        return self._feed.connected

    # -- the feed ------------------------------------------------------------

    def on_message(self, channel: bytes, data: bytes) -> None:
        """One pub/sub message: validate, then hand to the hub. Never raises."""
        try:
            bom_id = channel[len(self._prefix) :].decode()
        except UnicodeDecodeError:
            bom_id = ""
        if not is_valid_bom_id(bom_id):
            self._drop("invalid_bom_id")
            return
        try:
            event = parse_event(
                data, bom_id, max_bytes=self._max_bytes, terminal_types=self._terminal
            )
        except EventRejected as exc:
            self._drop(exc.code)
            return
        if self._hub.ingest(event, "redis") and self._record is not None:
            self._record(event)

    def _drop(self, reason: str) -> None:
        self._metrics.events_dropped.labels(reason).inc()
        self._drops.drop(reason)

    async def run(self) -> None:
        """Owner task of the subscriptions (and of the interest grace timer)."""
        if self.interest is None:
            await self._feed.run()
            return
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._feed.run(), name="redis-feed")
            tg.create_task(self.interest.run(), name="redis-interest")

    # -- publishing ----------------------------------------------------------

    async def publish(self, event: Event) -> None:
        if self._publisher is None:
            # With Redis history on, this appends and PUBLISHes in one script.
            self._publisher = AsyncPublisher.from_settings(PublishSettings.from_config(self._cfg))
        await self._publisher.publish_event(event)
        # Counted here as taken in over HTTP; it is counted again as "redis" by
        # every instance (this one included) when it comes back through the feed.
        self._metrics.events_received.labels("http").inc()

    async def close(self) -> None:
        if self._publisher is not None:
            await self._publisher.close()
            self._publisher = None
        if isinstance(self._feed, ClusterFeed):
            await self._feed.close()
