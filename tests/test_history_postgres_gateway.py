"""The gateway on the workers' PostgreSQL table (history.backend = "postgres"),
with the live feed from a real redis-server: rows replayed on a fresh
instance, the row/PUBLISH race in both orders, and PostgreSQL going away."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import pytest

from tests.gateway_proc import GatewayProcess
from tests.metrics_scrape import scrape, value
from tests.pg_proc import PostgresProcess, create_seed_table, insert_rows
from tests.redis_proc import RedisProcess
from tests.sse import Frame, SSEStream
from tests.waiting import eventually

ADMIN = "pg-gateway-admin"
AUTH = {"Authorization": f"Bearer {ADMIN}"}
TENANT = str(uuid.UUID(int=7))
BASE_TIME = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)


class Job:
    """One BOM's events, as a worker writes them: a row, and the same event PUBLISHed."""

    def __init__(self) -> None:
        self.bom_id = str(uuid.uuid4())
        self.ids = [str(uuid.uuid4()) for _ in range(20)]

    def row(self, n: int) -> dict[str, Any]:
        return {
            "event_id": uuid.UUID(self.ids[n]),
            "event_type": "enrichment.progress",
            "bom_id": uuid.UUID(self.bom_id),
            "tenant_id": uuid.UUID(TENANT),
            "source": "customer",
            "state": {"enriched_items": n, "total_items": 20},
            "created_at": BASE_TIME + timedelta(seconds=n),
        }

    def message(self, n: int) -> str:
        return json.dumps(
            {
                "event_id": self.ids[n],
                "event_type": "enrichment.progress",
                "bom_id": self.bom_id,
                "organization_id": TENANT,
                "source": "customer",
                "state": {"enriched_items": n, "total_items": 20},
                "created_at": (BASE_TIME + timedelta(seconds=n)).isoformat(),
            }
        )


@pytest.fixture
async def pg(postgres_server: PostgresProcess) -> AsyncIterator[PostgresProcess]:
    conn = await postgres_server.connect()
    try:
        await create_seed_table(conn)
    finally:
        await conn.close()
    yield postgres_server


async def insert(pg: PostgresProcess, job: Job, *ns: int) -> None:
    conn = await pg.connect()
    try:
        await insert_rows(conn, [job.row(n) for n in ns])
    finally:
        await conn.close()


async def started(
    made: list[GatewayProcess],
    redis_server: RedisProcess,
    pg: PostgresProcess,
    http: aiohttp.ClientSession,
) -> GatewayProcess:
    g = GatewayProcess(
        redis_url=redis_server.url,
        history_backend="postgres",
        history_url=pg.url(),
        history_timeout_s=1,
        auth_admin_token=ADMIN,
        server_heartbeat_s=0.5,
    )
    made.append(g)
    await g.start(http)
    return g


async def opened(
    http: aiohttp.ClientSession, g: GatewayProcess, job: Job, after: int | None
) -> tuple[aiohttp.ClientResponse, SSEStream, bool]:
    headers = dict(AUTH)
    if after is not None:
        headers["Last-Event-ID"] = job.ids[after]
    resp = await http.get(f"{g.url}/api/enrichment/stream/{job.bom_id}", headers=headers)
    assert resp.status == 200, await resp.text()
    s = SSEStream(resp)
    connected = await s.next_event()
    assert connected is not None and connected.event == "connected"
    return resp, s, connected.json()["resumed"]


async def take(s: SSEStream, count: int) -> list[str | None]:
    frames: list[Frame | None] = [await s.next_event() for _ in range(count)]
    return [f.id if f is not None else None for f in frames]


async def test_rows_written_before_the_gateway_started_are_replayed(
    redis_server: RedisProcess,
    pg: PostgresProcess,
    gateways: list[GatewayProcess],
    http: aiohttp.ClientSession,
) -> None:
    job = Job()
    await insert(pg, job, 1, 2, 3, 4, 5)
    g = await started(gateways, redis_server, pg, http)
    resp, s, resumed = await opened(http, g, job, after=2)
    async with resp:
        assert resumed is True
        assert await take(s, 3) == [job.ids[3], job.ids[4], job.ids[5]]
    resp, s, resumed = await opened(http, g, job, after=None)
    async with resp:
        assert resumed is False
        frame = await s.next_event()
        assert frame is not None and frame.id == job.ids[5]
        assert frame.json()["organization_id"] == TENANT
    async with http.get(f"{g.url}/api/enrichment/events/{job.bom_id}", headers=AUTH) as r:
        body = await r.json()
    assert [e["event_id"] for e in body["events"]] == [job.ids[n] for n in range(1, 6)]
    samples = await scrape(http, g.url)
    assert value(samples, "bomstream_history_reads_total", result="hit") == 1


async def test_a_row_committed_before_its_publish_is_delivered_once(
    redis_server: RedisProcess,
    pg: PostgresProcess,
    gateways: list[GatewayProcess],
    http: aiohttp.ClientSession,
) -> None:
    job = Job()
    # Row 4 is committed; its PUBLISH has not happened yet.
    await insert(pg, job, 1, 2, 3, 4)
    g = await started(gateways, redis_server, pg, http)
    resp, s, resumed = await opened(http, g, job, after=2)
    async with resp:
        assert resumed is True
        assert await take(s, 2) == [job.ids[3], job.ids[4]]
        redis_server.publish(f"enrichment:{job.bom_id}", job.message(4))  # the late PUBLISH
        await insert(pg, job, 5)
        redis_server.publish(f"enrichment:{job.bom_id}", job.message(5))
        assert await take(s, 1) == [job.ids[5]]  # 4 is not sent again


async def test_a_publish_before_its_row_commits_is_delivered_once(
    redis_server: RedisProcess,
    pg: PostgresProcess,
    gateways: list[GatewayProcess],
    http: aiohttp.ClientSession,
) -> None:
    job = Job()
    await insert(pg, job, 1, 2, 3)
    g = await started(gateways, redis_server, pg, http)
    # Event 4 arrives live; its row commits only later.
    redis_server.publish(f"enrichment:{job.bom_id}", job.message(4))

    async def held() -> int:
        return int((await g.health(http))["boms"])

    await eventually(held, lambda n: n == 1)
    resp, s, resumed = await opened(http, g, job, after=2)
    async with resp:
        assert resumed is True
        assert await take(s, 2) == [job.ids[3], job.ids[4]]
        await insert(pg, job, 4)
        await insert(pg, job, 5)
        redis_server.publish(f"enrichment:{job.bom_id}", job.message(5))
        assert await take(s, 1) == [job.ids[5]]
    # A reconnect after the late commit: each event still once.
    resp, s, resumed = await opened(http, g, job, after=3)
    async with resp:
        assert resumed is True
        assert await take(s, 2) == [job.ids[4], job.ids[5]]


async def test_postgres_down_streams_and_polls_carry_on_from_the_buffer(
    redis_server: RedisProcess,
    pg: PostgresProcess,
    gateways: list[GatewayProcess],
    http: aiohttp.ClientSession,
) -> None:
    old, live, warm = Job(), Job(), Job()
    await insert(pg, old, 1, 2)
    await insert(pg, warm, 1)
    g = await started(gateways, redis_server, pg, http)
    # One good read first: the pool is up and the start-up ping long done, so
    # the next read below is the first to find PostgreSQL gone.
    async with http.get(f"{g.url}/api/enrichment/events/{warm.bom_id}", headers=AUTH) as r:
        assert [e["event_id"] for e in (await r.json())["events"]] == [warm.ids[1]]
    assert (await g.health(http))["history"] == "ok"
    pg.stop()
    for n in (1, 2, 3):
        redis_server.publish(f"enrichment:{live.bom_id}", live.message(n))
    await eventually(lambda: g.health(http), lambda h: h["boms"] == 2)  # warm and live
    # A BOM the buffer holds: answered in full although history is down.
    resp, s, resumed = await opened(http, g, live, after=1)
    async with resp:
        assert resumed is True
        assert await take(s, 2) == [live.ids[2], live.ids[3]]
    # One only history knew: a miss, reported as such, never an error status.
    resp, s, resumed = await opened(http, g, old, after=1)
    async with resp:
        assert resumed is False
    async with http.get(f"{g.url}/api/enrichment/events/{old.bom_id}", headers=AUTH) as r:
        assert r.status == 200
        assert (await r.json())["events"] == []
    health = await eventually(lambda: g.health(http), lambda h: h["history"] == "down")
    assert health["status"] == "healthy"
    async with http.get(f"{g.url}/api/enrichment/health") as r:
        assert r.status == 200
    samples = await scrape(http, g.url)
    assert value(samples, "bomstream_history_reads_total", result="error") >= 1
    # Back again: the BOM history alone knows is replayed.
    pg.start()
    await eventually(lambda: g.health(http), lambda h: h["history"] == "ok", timeout=15)
    await asyncio.sleep(0)
    resp, s, resumed = await opened(http, g, old, after=1)
    async with resp:
        assert resumed is True
        assert await take(s, 1) == [old.ids[2]]
