"""History in Redis Streams: one capped, expiring stream per BOM.

Reads are ``XREVRANGE`` of the newest entries. Events that workers PUBLISH
straight to the channel are stored by the instances that receive them: the
feed hands each accepted event to :meth:`RedisStreamHistory.record`, and one
writer task appends them, in the order received, with the append script,
which stores an event_id once however many instances offer it.

Why that keeps publication order: Redis delivers a channel's messages to
every subscriber in publication order, and each instance appends in the
order it received, over one connection, waiting for each batch before the
next. So when any instance first appends an event B, it has already
appended (or found stored) every event published before B; no instance can
store B ahead of them.

The connection is its own, never the subscription's. On a Redis Cluster it
is redis-py's cluster client, and the keys are the hash-tagged names of
:mod:`bomstream.history.redis_scripts`; there (interest mode) history is
written at publication, so this only reads.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ConstantBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisClusterException, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from bomstream.config import Config
from bomstream.eventloop import raise_if_cancelled
from bomstream.events import Event
from bomstream.history.backend import HistoryError
from bomstream.history.redis_scripts import APPEND, append_keys, ids_key, index_key, stream_key
from bomstream.logs import FIELDS
from bomstream.metrics import Metrics

log = logging.getLogger("bomstream.history")

# Appends waiting for Redis while it is away; beyond this new ones are given
# up (live delivery is unaffected, and every other instance offers the same
# events).
MAX_QUEUED = 100_000
BATCH = 500
RETRY_S = 0.5


class RedisStreamHistory:
    def __init__(self, cfg: Config, metrics: Metrics) -> None:
        self._prefix = cfg.history.key_prefix
        self._cap = cfg.buffer.events_per_bom
        self._max_boms = cfg.buffer.max_boms
        self._ttl_ms = int(cfg.buffer.retention_s * 1000)
        self._timeout = cfg.history.timeout_s
        self._metrics = metrics
        # On a cluster, the shard channel is the hash tag of the keys.
        self._tag_prefix = cfg.redis.channel_prefix if cfg.redis.cluster else None
        self._client: aioredis.Redis | RedisCluster
        if cfg.redis.cluster:
            self._client = RedisCluster.from_url(
                cfg.redis.url,
                require_full_coverage=False,
                socket_connect_timeout=cfg.history.timeout_s,
                socket_timeout=cfg.history.timeout_s,
            )
        else:
            self._client = aioredis.Redis.from_url(
                cfg.redis.url,
                socket_connect_timeout=cfg.history.timeout_s,
                socket_timeout=cfg.history.timeout_s,
                # Reads and store-once appends are safe to retry on a fresh connection.
                retry_on_error=[RedisConnectionError, RedisTimeoutError],
                retry=Retry(ConstantBackoff(0.05), retries=1),
            )
        self._append = self._client.register_script(APPEND)
        self._queue: deque[Event] = deque()
        self._wake = asyncio.Event()

    @property
    def name(self) -> str:
        return "redis"

    def _keys(self, bom_id: str) -> list[str]:
        tag = None if self._tag_prefix is None else self._tag_prefix + bom_id
        return [stream_key(self._prefix, bom_id, tag), ids_key(self._prefix, bom_id, tag)]

    async def recent_boms(self, org: str | None, limit: int) -> list[str]:
        try:
            ids = await self._client.zrevrange(index_key(self._prefix, org), 0, limit - 1)
        except (RedisError, RedisClusterException, OSError) as exc:
            raise HistoryError(f"redis: {type(exc).__name__}") from None
        return [i.decode() if isinstance(i, bytes) else str(i) for i in ids]

    async def read(self, bom_id: str, limit: int) -> list[bytes]:
        return [data for data, _ in await self.read_rows(bom_id, limit)]

    async def read_rows(self, bom_id: str, limit: int) -> list[tuple[bytes, int]]:
        try:
            entries = await self._client.xrevrange(self._keys(bom_id)[0], "+", "-", count=limit)
        except (RedisError, RedisClusterException, OSError) as exc:
            # On a cluster one node failing is not all of history failing.
            raise HistoryError(
                f"redis: {type(exc).__name__}", scoped=self._tag_prefix is not None
            ) from None
        out: list[tuple[bytes, int]] = []
        for _entry, fields in reversed(entries or []):
            if not fields:
                continue
            data = fields.get(b"d")
            if isinstance(data, bytes):
                out.append((data, _sequence(fields.get(b"s"))))
        return out

    def record(self, event: Event) -> None:
        if len(self._queue) >= MAX_QUEUED:
            self._metrics.history_writes.labels("dropped").inc()
            return
        self._queue.append(event)
        self._wake.set()

    async def ping(self) -> None:
        client = self._client
        try:
            if not isinstance(client, RedisCluster):
                await client.ping()
                return
            # Up while any primary answers: one node down is not history down.
            await client.initialize()
            replies = await asyncio.gather(
                *(client.execute_command("PING", target_nodes=n) for n in client.get_primaries()),
                return_exceptions=True,
            )
            if not any(r is True for r in replies):
                raise RedisConnectionError("no primary answers")
        except (RedisError, RedisClusterException, OSError) as exc:
            raise HistoryError(f"redis: {type(exc).__name__}") from None

    async def run(self) -> None:
        """The writer: appends recorded events in order, a pipelined batch at a time."""
        failing = False
        while True:
            raise_if_cancelled()
            if not self._queue:
                self._wake.clear()
                await self._wake.wait()
            batch = [self._queue[i] for i in range(min(BATCH, len(self._queue)))]
            try:
                results = await self._write(batch)
            except (RedisError, OSError, TimeoutError) as exc:
                if not failing:
                    log.warning(
                        "history writes failing: %s; retrying",
                        type(exc).__name__,
                        extra={FIELDS: {"queued": len(self._queue)}},
                    )
                failing = True
                await asyncio.sleep(RETRY_S)
                continue
            if failing:
                log.info("history writes resumed")
                failing = False
            for ev, (_entry, seq) in zip(batch, results, strict=True):
                self._queue.popleft()
                # The live copy in the buffer learns its place in history's order.
                ev.hseq = _sequence(seq)
            stored = sum(1 for entry, _ in results if entry)
            self._metrics.history_writes.labels("stored").inc(stored)
            self._metrics.history_writes.labels("duplicate").inc(len(results) - stored)

    async def _write(self, batch: list[Event]) -> list[tuple[bytes, int]]:
        client = self._client
        # Only pattern mode records feed events, and a cluster implies interest mode.
        assert isinstance(client, aioredis.Redis)
        try:
            return await self._pipelined(client, batch)
        except NoScriptError:
            # A Redis that restarted (or was flushed) has forgotten the script.
            await client.script_load(APPEND)
            return await self._pipelined(client, batch)

    async def _pipelined(
        self, client: aioredis.Redis, batch: list[Event]
    ) -> list[tuple[bytes, int]]:
        # EVALSHA itself, not the Script object: a pipeline holding Script calls
        # asks SCRIPT EXISTS first on every execute, a second round trip for
        # every batch, which at low event rates is a batch of one event.
        sha = self._append.sha
        # The pipeline as a context: cancelled half way (shutdown) or with Redis
        # gone mid-batch, it is reset and gives its connection back to the pool.
        async with (
            asyncio.timeout(self._timeout),
            client.pipeline(transaction=False) as pipe,
        ):
            for ev in batch:
                keys = append_keys(self._prefix, ev)
                pipe.evalsha(
                    sha,
                    len(keys),
                    *keys,
                    ev.event_id,
                    ev.data,
                    self._cap,
                    self._ttl_ms,
                    "",
                    self._max_boms,
                    ev.bom_id,
                )
            results: list[tuple[bytes, int]] = await pipe.execute()
            return results

    async def close(self) -> None:
        await self._client.aclose()


def _sequence(value: object) -> int:
    """A stored event's sequence; entries stored before there was one have none (0)."""
    try:
        return int(value) if isinstance(value, (bytes, str, int)) else 0
    except ValueError:
        return 0
