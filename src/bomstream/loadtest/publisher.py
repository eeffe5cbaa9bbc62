"""Paced publishing: events go out at a steady total rate, round-robin over
the BOMs, each stamped with its send time in its id.

Through Redis (``PUBLISH``, pipelined per tick, as a worker would) or through
the gateway's HTTP publish endpoint. The achieved rate is measured, not
assumed: a publisher that falls behind says so in the report.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Protocol

import aiohttp
import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from bomstream.loadtest.tally import make_event_id

# The longest the pacing loop sleeps; shorter waits keep high rates smooth.
MAX_TICK_S = 0.01


@dataclass(slots=True)
class PublishStats:
    target_rate: float
    sent: int = 0
    failed: Counter[str] = field(default_factory=Counter)
    started_at: float = 0.0
    finished_at: float = 0.0

    @property
    def elapsed(self) -> float:
        return max(0.0, self.finished_at - self.started_at)

    @property
    def achieved_rate(self) -> float:
        return self.sent / self.elapsed if self.elapsed > 0 else 0.0


class Sender(Protocol):
    async def send(self, batch: list[tuple[str, bytes]], stats: PublishStats) -> None: ...

    async def close(self) -> None: ...


class EventFactory:
    """Builds seed-shaped progress events; ``seq`` counts from 1 per BOM."""

    def __init__(self, run: str, bom_ids: list[str], org: str | None) -> None:
        self.run = run
        self.bom_ids = bom_ids
        self.org = org
        self.published = [0] * len(bom_ids)

    def next(self, index: int) -> tuple[str, bytes]:
        nboms = len(self.bom_ids)
        bom = index % nboms
        seq = self.published[bom] + 1
        self.published[bom] = seq
        bom_id = self.bom_ids[bom]
        now_ns = time.time_ns()
        event = {
            "event_id": make_event_id(self.run, bom, seq, now_ns // 1000),
            "event_type": "enrichment.progress",
            "bom_id": bom_id,
            "project_id": "loadtest",
            "state": {
                "status": "enriching",
                "total_items": 1000,
                "enriched_items": seq % 1000,
                "failed_items": 0,
                "pending_items": 1000 - seq % 1000,
                "percent_complete": round((seq % 1000) / 10, 1),
                "current_batch": seq // 10,
                "total_batches": 100,
            },
            "component": {"line_item_id": f"li-{seq}", "mpn": "LT-1000-XYZ", "status": "enriched"},
            "payload": {},
            "created_at": datetime.fromtimestamp(now_ns / 1e9, UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
        }
        if self.org is not None:
            event["organization_id"] = self.org
        return bom_id, orjson.dumps(event)


class RedisSender:
    def __init__(self, url: str, channel_prefix: str) -> None:
        self._client = aioredis.Redis.from_url(url, socket_connect_timeout=5)
        self._prefix = channel_prefix

    async def send(self, batch: list[tuple[str, bytes]], stats: PublishStats) -> None:
        pipe = self._client.pipeline(transaction=False)
        for bom_id, body in batch:
            pipe.publish(self._prefix + bom_id, body)
        try:
            await pipe.execute()
        except (RedisError, OSError) as exc:
            stats.failed[f"redis:{type(exc).__name__}"] += len(batch)
            return
        stats.sent += len(batch)

    async def close(self) -> None:
        await self._client.aclose()


class HttpSender:
    def __init__(self, base_url: str, token: str | None, concurrency: int = 32) -> None:
        self._base = base_url.rstrip("/")
        self._headers = {"Content-Type": "application/json"}
        if token:
            self._headers["Authorization"] = f"Bearer {token}"
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=concurrency),
            timeout=aiohttp.ClientTimeout(total=10),
        )

    async def _post(self, bom_id: str, body: bytes, stats: PublishStats) -> None:
        url = f"{self._base}/api/enrichment/events/{bom_id}"
        try:
            async with self._session.post(url, data=body, headers=self._headers) as resp:
                await resp.read()
                if resp.status == 202:
                    stats.sent += 1
                else:
                    stats.failed[f"http:{resp.status}"] += 1
        except (aiohttp.ClientError, TimeoutError) as exc:
            stats.failed[f"http:{type(exc).__name__}"] += 1

    async def send(self, batch: list[tuple[str, bytes]], stats: PublishStats) -> None:
        await asyncio.gather(*(self._post(b, body, stats) for b, body in batch))

    async def close(self) -> None:
        await self._session.close()


async def publish_paced(
    sender: Sender, events: EventFactory, stats: PublishStats, duration: float
) -> PublishStats:
    """Send ``target_rate * duration`` events evenly spread over ``duration`` seconds."""
    rate = stats.target_rate
    total = int(rate * duration)
    loop = asyncio.get_running_loop()
    stats.started_at = time.monotonic()
    start = loop.time()
    made = 0
    while made < total:
        due = min(total, int((loop.time() - start) * rate) + 1)
        if due > made:
            batch = [events.next(i) for i in range(made, due)]
            made = due
            await sender.send(batch, stats)
        if made < total:
            wait = start + made / rate - loop.time()
            await asyncio.sleep(min(MAX_TICK_S, max(0.0, wait)))
    stats.finished_at = time.monotonic()
    return stats
