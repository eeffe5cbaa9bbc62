"""The feed from a Redis Cluster: sharded pub/sub, one connection per node it needs.

A shard channel (``enrichment:<bom_id>``, published with SPUBLISH) lives on
the primary that owns its hash slot. Each watched BOM is SSUBSCRIBEd there,
over that node's one subscription connection, opened the first time a
watched BOM lives on that node. The slot map is redis-py's
(:class:`redis.asyncio.cluster.RedisCluster`), read again whenever a node
redirects a subscription (``MOVED``), ends one on its own (the
``sunsubscribe`` a node sends when it gives up a slot: failover, slot
migration) or its connection fails, and every few seconds while a node is
down, so a promoted replica is found.

Each node connection has its own owner task (:class:`NodeFeed`); the
cluster's owner task (:meth:`ClusterFeed.run`) reads the map and starts and
stops them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.crc import key_slot
from redis.exceptions import RedisClusterException, RedisError, SlotNotCoveredError

from bomstream.config import Config
from bomstream.feeds.interest import Interest
from bomstream.feeds.link import FeedError, Link, connect, keep_alive
from bomstream.feeds.resp import RedisTarget, parse_redis_url
from bomstream.feeds.single import OnMessage, backoff
from bomstream.logs import FIELDS
from bomstream.metrics import Metrics

log = logging.getLogger("bomstream.redis")

# Re-read the slot map this often anyway, and this often while a node is down.
REFRESH_S = 30.0
REFRESH_DEGRADED_S = 1.0
# Let a burst of redirects (a whole slot range moving) settle into one re-read.
SETTLE_S = 0.05
# Errors that mean "ask again, elsewhere or later", not "this link is broken".
ROUTING_ERRORS = ("MOVED", "ASK", "CLUSTERDOWN", "TRYAGAIN")


class NodeFeed:
    """One node's subscription connection and the task that keeps it open."""

    def __init__(self, feed: ClusterFeed, name: str, target: RedisTarget) -> None:
        self.feed = feed
        self.name = name
        self.target = target
        self.link: Link | None = None
        self.failures = 0
        self.task: asyncio.Task[None] | None = None

    @property
    def ready(self) -> bool:
        return self.link is not None

    async def run(self) -> None:
        while True:
            try:
                await self._session()
            except asyncio.CancelledError:
                raise
            except (OSError, FeedError, TimeoutError) as exc:
                if self.failures == 0:
                    log.warning(
                        "redis cluster node lost: %s",
                        str(exc) or type(exc).__name__,
                        extra={FIELDS: {"redis": self.name}},
                    )
                self.failures += 1
            self.feed.refresh()
            await backoff(self.feed.cfg, self.failures)
            self.feed.metrics.redis_reconnects.inc()

    async def _session(self) -> None:
        feed = self.feed
        link = Link(feed, self.name, feed.metrics.redis_feed_bytes, sharded=True)
        try:
            await connect(self.target, link)
            self.link = link
            self.failures = 0
            feed.metrics.redis_shard_connected.labels(self.name).set(1)
            log.info("redis cluster node connected", extra={FIELDS: {"redis": self.name}})
            feed.interest.reroute()
            await keep_alive(link, feed.cfg.redis.health_check_s)
        finally:
            self.link = None
            feed.node_down(self, link)
            link.abort()


class ClusterFeed:
    def __init__(
        self, cfg: Config, on_message: OnMessage, metrics: Metrics, interest: Interest
    ) -> None:
        self.cfg = cfg
        self.metrics = metrics
        self.interest = interest
        self.on_message = on_message
        self._target = parse_redis_url(cfg.redis.url)
        self._client = RedisCluster.from_url(
            cfg.redis.url,
            require_full_coverage=False,
            socket_connect_timeout=cfg.history.timeout_s,
            socket_timeout=cfg.history.timeout_s,
        )
        self._nodes: dict[str, NodeFeed] = {}
        # Tasks of nodes let go (no longer primaries), still finishing.
        self._retired: set[asyncio.Task[None]] = set()
        self._mapped = False
        # Routes wait while the map is being read again.
        self._stale = True
        self._wake = asyncio.Event()
        self._refusals = 0
        self._closing = False
        interest.router = self

    @property
    def connected(self) -> bool:
        return self._mapped

    @property
    def status(self) -> str:
        if not self._mapped:
            return "disconnected"
        if all(n.ready for n in self._nodes.values()):
            return "connected"
        return "degraded"

    # -- what the links report (LinkSink) --------------------------------------

    def on_confirmed(self, link: Link, channel: bytes, subscribed: bool, seq: int) -> None:
        self._refusals = 0
        self.interest.on_confirmed(link, channel, subscribed, seq)

    def on_lost(self, link: Link, channel: bytes) -> None:
        self.interest.on_lost(link, channel)
        self.refresh()

    def on_refused(self, link: Link, channels: tuple[bytes, ...], seq: int, error: str) -> None:
        self.interest.on_refused(link, channels, seq)
        if error.startswith(ROUTING_ERRORS):
            self._refusals += 1
            self.refresh()
        else:
            link.fail(FeedError(f"Redis refused: {error}"))

    # -- routing (Router) ------------------------------------------------------

    def link_for(self, channel: bytes) -> Link | None:
        if self._closing:
            return None  # shutting down: no new node connections
        node = self._owner(channel)
        if node is None:
            return None
        feed = self._nodes.get(node.name)
        if feed is None:
            feed = self._start(node)
        return feed.link

    def failing(self, channel: bytes) -> bool:
        if not self._mapped:
            return True
        node = self._owner(channel)
        feed = self._nodes.get(node.name) if node is not None else None
        return feed is not None and feed.failures > 0

    def _owner(self, channel: bytes) -> ClusterNode | None:
        if self._stale:
            return None
        try:
            return self._client.nodes_manager.get_node_from_slot(key_slot(channel))
        except SlotNotCoveredError:
            self.refresh()
            return None

    def _start(self, node: ClusterNode) -> NodeFeed:
        feed = self._nodes[node.name] = NodeFeed(
            self, node.name, self._target.at(node.host, int(node.port))
        )
        feed.task = asyncio.get_running_loop().create_task(feed.run(), name=f"redis-{node.name}")
        return feed

    def node_down(self, node: NodeFeed, link: Link) -> None:
        self.interest.link_down(link)
        if self._nodes.get(node.name) is node:
            self.metrics.redis_shard_connected.labels(node.name).set(0)
        else:
            with contextlib.suppress(KeyError):
                self.metrics.redis_shard_connected.remove(node.name)

    def refresh(self) -> None:
        """Read the slot map again soon; until then new subscriptions wait."""
        self._stale = True
        self._wake.set()

    # -- the owner task --------------------------------------------------------

    async def run(self) -> None:
        try:
            await self._maintain()
        finally:
            self._closing = True
            tasks = [n.task for n in self._nodes.values() if n.task is not None]
            tasks.extend(self._retired)
            self._nodes.clear()
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def _maintain(self) -> None:
        failures = 0
        while True:
            # redis-py can swallow a cancellation that lands mid-command and
            # return normally; this loop must still end when it is cancelled.
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise asyncio.CancelledError
            self._wake.clear()
            try:
                await self._read_map()
            except (RedisError, RedisClusterException, OSError) as exc:
                if failures == 0:
                    log.warning(
                        "redis cluster unreachable: %s",
                        str(exc) or type(exc).__name__,
                        extra={FIELDS: {"redis": self._target.display}},
                    )
                failures += 1
                self._set_mapped(False)
                await backoff(self.cfg, failures)
                continue
            failures = 0
            if self._refusals:
                # Nodes that answer CLUSTERDOWN or keep redirecting: slow down.
                await backoff(self.cfg, self._refusals)
            self._stale = False
            self._set_mapped(True)
            self.interest.reroute()
            wait = REFRESH_S if self.status == "connected" else REFRESH_DEGRADED_S
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._wake.wait()
            await asyncio.sleep(SETTLE_S)

    async def _read_map(self) -> None:
        started = time.perf_counter()
        if self._mapped:
            await self._client.nodes_manager.initialize()
        else:
            await self._client.initialize()
        self.metrics.redis_cluster_refreshes.inc()
        primaries = {n.name for n in self._client.get_primaries()}
        for name in [n for n in self._nodes if n not in primaries]:
            # No longer a primary (failed over, removed): its streams move elsewhere.
            node = self._nodes.pop(name)
            if node.task is not None:
                node.task.cancel()
                self._retired.add(node.task)
                node.task.add_done_callback(self._retired.discard)
        log.debug(
            "redis cluster map read",
            extra={
                FIELDS: {
                    "primaries": len(primaries),
                    "ms": round(1000 * (time.perf_counter() - started), 1),
                }
            },
        )

    def _set_mapped(self, value: bool) -> None:
        if self._mapped != value:
            self._mapped = value
            self.metrics.redis_connected.set(1 if value else 0)

    async def close(self) -> None:
        await self._client.aclose()
