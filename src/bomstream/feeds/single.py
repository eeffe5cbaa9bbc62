"""The feed from one Redis server: one subscription connection per process.

In ``pattern`` mode it runs ``PSUBSCRIBE <prefix>*`` and hears every BOM; in
``interest`` mode it carries the per-BOM subscriptions that
:class:`~bomstream.feeds.interest.Interest` asks for, over the same one
connection. One owner task (:meth:`SingleFeed.run`) holds the connection,
reconnects with exponential backoff and full jitter, and pings an idle link
so a dead peer is noticed.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable

from bomstream.config import Config
from bomstream.feeds.interest import Interest
from bomstream.feeds.link import FeedError, Link, barrier, connect, keep_alive
from bomstream.feeds.resp import parse_redis_url
from bomstream.logs import FIELDS
from bomstream.metrics import Metrics

log = logging.getLogger("bomstream.redis")

OnMessage = Callable[[bytes, bytes], None]


async def backoff(cfg: Config, failures: int) -> None:
    rc = cfg.redis
    ceiling = min(rc.backoff_max_s, rc.backoff_initial_s * (2 ** min(failures, 20)))
    # Full jitter: many gateways restarting together must not reconnect in step.
    await asyncio.sleep(random.uniform(rc.backoff_initial_s, ceiling))


class SingleFeed:
    def __init__(
        self, cfg: Config, on_message: OnMessage, metrics: Metrics, interest: Interest | None
    ) -> None:
        self._cfg = cfg
        self._target = parse_redis_url(cfg.redis.url)
        self._pattern = cfg.redis.channel_prefix.encode() + b"*"
        self.on_message = on_message
        self._metrics = metrics
        self._interest = interest
        self._link: Link | None = None
        self.connected = False
        if interest is not None:
            interest.router = self

    @property
    def status(self) -> str:
        return "connected" if self.connected else "disconnected"

    # -- what the link reports (LinkSink) --------------------------------------

    def on_confirmed(self, link: Link, channel: bytes, subscribed: bool, seq: int) -> None:
        if self._interest is not None:
            self._interest.on_confirmed(link, channel, subscribed, seq)

    def on_lost(self, link: Link, channel: bytes) -> None:
        if self._interest is not None:
            self._interest.on_lost(link, channel)

    def on_refused(self, link: Link, channels: tuple[bytes, ...], seq: int, error: str) -> None:
        # One server redirects nowhere: a refused subscription makes the link useless.
        link.fail(FeedError(f"Redis refused: {error}"))

    # -- routing (Router) ------------------------------------------------------

    def link_for(self, channel: bytes) -> Link | None:
        return self._link if self.connected else None

    def failing(self, channel: bytes) -> bool:
        return not self.connected

    # -- the owner task --------------------------------------------------------

    async def run(self) -> None:
        """Connect, read, and reconnect forever."""
        failures = 0
        while True:
            try:
                await self._session()
                failures = 0
            except asyncio.CancelledError:
                raise
            except (OSError, FeedError, TimeoutError) as exc:
                if failures == 0:
                    log.warning(
                        "redis feed lost: %s",
                        str(exc) or type(exc).__name__,
                        extra={FIELDS: {"redis": self._target.display}},
                    )
                failures += 1
            await backoff(self._cfg, failures)
            self._metrics.redis_reconnects.inc()

    async def _session(self) -> None:
        link = Link(self, self._target.display, self._metrics.redis_feed_bytes)
        try:
            await connect(self._target, link)
            if self._interest is None:
                link.psubscribe(self._pattern)
                await barrier(link)
            self._link = link
            self._set_connected(True)
            what = (
                {"subscribe": "interest"}
                if self._interest is not None
                else {"pattern": self._pattern.decode()}
            )
            log.info(
                "redis feed subscribed", extra={FIELDS: {"redis": self._target.display, **what}}
            )
            if self._interest is not None:
                # After a reconnect: every watched BOM again, in one command.
                self._interest.reroute()
            await keep_alive(link, self._cfg.redis.health_check_s)
        finally:
            self._link = None
            self._set_connected(False)
            if self._interest is not None:
                self._interest.link_down(link)
            link.abort()

    def _set_connected(self, value: bool) -> None:
        if self.connected != value:
            self.connected = value
            self._metrics.redis_connected.set(1 if value else 0)
