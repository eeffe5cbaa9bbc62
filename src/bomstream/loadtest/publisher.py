"""Paced publishing: events go out at a steady total rate, round-robin over
the BOMs, each stamped with its send time in its id.

Through Redis (``PUBLISH``, pipelined per tick, as a worker would) or through
the gateway's HTTP publish endpoint. The achieved rate is measured, not
assumed: a publisher that falls behind says so in the report.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Protocol, cast

import aiohttp
import hiredis
import orjson

from bomstream.broker_redis import encode_command, parse_redis_url
from bomstream.loadtest.tally import make_event_id

# The longest the pacing loop sleeps; shorter waits keep high rates smooth.
MAX_TICK_S = 0.01
# uvloop keeps time in whole milliseconds: a shorter sleep returns at once, and
# the loop would spin until the clock ticks over.
MIN_TICK_S = 0.001


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


class _ReplyCounter(asyncio.Protocol):
    """Reads PUBLISH replies off a raw Redis connection; they only need counting."""

    def __init__(self) -> None:
        self.reader = hiredis.Reader()
        self.replies = 0
        self.errors = 0
        self.transport: asyncio.Transport | None = None
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waiter: asyncio.Future[None] | None = None
        self.want = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while (reply := self.reader.gets()) is not False:
            if isinstance(reply, hiredis.ReplyError):
                self.errors += 1
            else:
                self.replies += 1
        if self.waiter is not None and not self.waiter.done() and self.replies >= self.want:
            self.waiter.set_result(None)

    def connection_lost(self, exc: BaseException | None) -> None:
        if not self.lost.done():
            self.lost.set_result(None)
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionResetError("Redis closed the connection"))


class RedisSender:
    """PUBLISHes over one raw connection: a whole tick's commands go out in one
    write, so publishing costs the load client next to nothing."""

    def __init__(self, url: str, channel_prefix: str) -> None:
        self._target = parse_redis_url(url)
        self._prefix = channel_prefix.encode()
        self._proto: _ReplyCounter | None = None
        self._written = 0
        self._stats: PublishStats | None = None

    async def _connect(self) -> _ReplyCounter:
        loop = asyncio.get_running_loop()
        t = self._target
        proto = _ReplyCounter()
        if t.unix_path:
            await loop.create_unix_connection(lambda: proto, t.unix_path)
        else:
            await loop.create_connection(lambda: proto, t.host, t.port)
        assert proto.transport is not None
        if t.password is not None:
            auth = [b"AUTH", *([t.username.encode()] if t.username else []), t.password.encode()]
            proto.transport.write(encode_command(*auth))
            self._written += 1
        return proto

    async def send(self, batch: list[tuple[str, bytes]], stats: PublishStats) -> None:
        self._stats = stats
        try:
            if self._proto is None or self._proto.lost.done():
                self._proto = await self._connect()
        except OSError as exc:
            stats.failed[f"redis:{type(exc).__name__}"] += len(batch)
            return
        proto = self._proto
        assert proto.transport is not None
        prefix = self._prefix
        proto.transport.write(
            b"".join(
                encode_command(b"PUBLISH", prefix + bom_id.encode(), body) for bom_id, body in batch
            )
        )
        self._written += len(batch)
        stats.sent += len(batch)

    async def close(self) -> None:
        proto = self._proto
        if proto is None or proto.transport is None:
            return
        # Wait (briefly) for every reply, so no command is cut off by the close.
        proto.want = self._written
        if proto.replies < proto.want and not proto.lost.done():
            proto.waiter = asyncio.get_running_loop().create_future()
            with contextlib.suppress(TimeoutError, ConnectionResetError):
                await asyncio.wait_for(proto.waiter, 5.0)
        proto.transport.close()
        if self._stats is not None and proto.errors:
            # Counted as sent when written; an error reply means it never went out.
            self._stats.sent -= proto.errors
            self._stats.failed["redis:error reply"] += proto.errors


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
            await asyncio.sleep(min(MAX_TICK_S, max(MIN_TICK_S, wait)))
    stats.finished_at = time.monotonic()
    return stats
