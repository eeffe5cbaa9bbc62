"""What the interest-subscription and cluster suites share: gateway settings,
what Redis says is subscribed, and a publisher that remembers what it sent."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import redis

from bomstream.publisher import AsyncPublisher
from tests.conftest import progress
from tests.gateway_proc import GatewayProcess
from tests.redis_proc import RedisProcess
from tests.sse import Frame, SSEStream

ADMIN = "interest-suite-admin"
AUTH = {"Authorization": f"Bearer {ADMIN}"}
GRACE_S = 0.5


def interest_gateway(redis_server: RedisProcess, **settings: object) -> GatewayProcess:
    base: dict[str, object] = {
        "redis_url": redis_server.url,
        "redis_subscribe": "interest",
        "redis_unsubscribe_grace_s": GRACE_S,
        "auth_admin_token": ADMIN,
        "server_heartbeat_s": 0.5,
        "redis_backoff_initial_s": 0.05,
        "redis_backoff_max_s": 0.3,
    }
    base.update(settings)
    return GatewayProcess(**base)  # type: ignore[arg-type]


@pytest.fixture
async def gateways() -> AsyncIterator[list[GatewayProcess]]:
    made: list[GatewayProcess] = []
    yield made
    for g in made:
        g.close()


@pytest.fixture
def inspect(redis_server: RedisProcess) -> redis.Redis:
    """A plain client for looking at what Redis holds (PUBSUB, INFO)."""
    client = redis.Redis.from_url(redis_server.url)
    yield client  # type: ignore[misc]
    client.close()


async def started(
    made: list[GatewayProcess],
    redis_server: RedisProcess,
    http: aiohttp.ClientSession,
    **settings: object,
) -> GatewayProcess:
    g = interest_gateway(redis_server, **settings)
    made.append(g)
    await g.start(http)
    return g


def numsub(client: redis.Redis, *bom_ids: str) -> dict[str, int]:
    reply = client.pubsub_numsub(*(f"enrichment:{b}" for b in bom_ids))
    return {ch.decode().removeprefix("enrichment:"): n for ch, n in reply}


def channels(client: redis.Redis) -> set[str]:
    return {c.decode() for c in client.pubsub_channels("enrichment:*")}


def subscribe_calls(client: redis.Redis) -> dict[str, int]:
    stats = client.info("commandstats")
    return {
        name: int(stats.get(f"cmdstat_{name}", {}).get("calls", 0))
        for name in ("subscribe", "unsubscribe", "psubscribe")
    }


async def read_all(
    http: aiohttp.ClientSession, base: str, bom_id: str, last_event_id: str | None = None
) -> tuple[bool, list[Frame]]:
    """(resumed, frames) of one stream, until the gateway ends it."""
    headers = dict(AUTH)
    if last_event_id is not None:
        headers["Last-Event-ID"] = last_event_id
    async with http.get(f"{base}/api/enrichment/stream/{bom_id}", headers=headers) as resp:
        assert resp.status == 200, await resp.text()
        s = SSEStream(resp)
        connected = await s.next_event()
        assert connected is not None and connected.event == "connected"
        return connected.json()["resumed"], await s.events_until_end(timeout=15)


def event(bom_id: str, n: int, *, terminal: bool = False) -> dict[str, Any]:
    if terminal:
        return {"event_id": f"{bom_id}-done", "event_type": "enrichment.completed"}
    return progress(bom_id, n, total=10_000)


class Publishing:
    """Publishes one BOM's events through bomstream.publisher in a tight loop,
    remembering what went out, then ends the run with a terminal event."""

    def __init__(self, pub: AsyncPublisher, bom_id: str, count: int) -> None:
        self.pub = pub
        self.bom_id = bom_id
        self.count = count
        self.sent: list[str] = []
        self.progress = asyncio.Condition()

    async def run(self, start: int = 1) -> None:
        for n in range(start, start + self.count):
            await self.pub.publish(self.bom_id, event(self.bom_id, n))
            await self._sent(f"{self.bom_id}-e{n}")

    async def finish(self) -> None:
        await self.pub.publish(self.bom_id, event(self.bom_id, 0, terminal=True))
        await self._sent(f"{self.bom_id}-done")

    async def _sent(self, event_id: str) -> None:
        async with self.progress:
            self.sent.append(event_id)
            self.progress.notify_all()

    async def reached(self, n: int) -> None:
        async with self.progress:
            await self.progress.wait_for(lambda: len(self.sent) >= n)


def check_stream(sent: list[str], resumed: bool, frames: list[Frame], after: str | None) -> None:
    """Every event once, in order, with no gap, ending with the run's terminal event."""
    ids = [f.id for f in frames if f.id is not None]
    assert frames[-1].event == "stream_end"
    assert ids[-1] == sent[-1]
    if after is not None:
        assert resumed is True
        assert ids == sent[sent.index(after) + 1 :]
    else:
        # Without Last-Event-ID: the latest event as a snapshot, then all that follow.
        assert resumed is False
        assert ids == sent[sent.index(ids[0]) :]


async def read_all_after_finish(
    http: aiohttp.ClientSession,
    base: str,
    run: Publishing,
    publishing: asyncio.Task[None],
    after: str,
) -> tuple[bool, list[Frame]]:
    reading = asyncio.create_task(read_all(http, base, run.bom_id, after))
    await publishing
    await run.finish()
    return await reading
