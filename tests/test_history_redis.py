"""Shared history in Redis Streams (spec section 8), on real gateway processes
sharing one real redis-server: replay and snapshots survive restarts."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import redis

from bomstream.publisher import Publisher
from tests.authkit import SECRET, org_token
from tests.conftest import progress, publish
from tests.gateway_proc import GatewayProcess
from tests.metrics_scrape import scrape, value
from tests.redis_proc import RedisProcess
from tests.sse import Frame, SSEStream
from tests.waiting import eventually

ADMIN = "history-suite-admin"
AUTH = {"Authorization": f"Bearer {ADMIN}"}


def gateway(redis_server: RedisProcess, **settings: object) -> GatewayProcess:
    base: dict[str, object] = {
        "redis_url": redis_server.url,
        "auth_admin_token": ADMIN,
        "server_heartbeat_s": 0.5,
        "redis_backoff_initial_s": 0.05,
        "redis_backoff_max_s": 0.3,
    }
    base.update(settings)
    return GatewayProcess(**base)  # type: ignore[arg-type]


async def started(
    made: list[GatewayProcess],
    redis_server: RedisProcess,
    http: aiohttp.ClientSession,
    **settings: object,
) -> GatewayProcess:
    g = gateway(redis_server, **settings)
    made.append(g)
    await g.start(http)
    return g


def worker_publish(redis_server: RedisProcess, bom_id: str, event: dict[str, object]) -> None:
    """A worker's plain PUBLISH, not through bomstream."""
    redis_server.publish(f"enrichment:{bom_id}", json.dumps(event))


def stored_ids(redis_server: RedisProcess, bom_id: str) -> list[str]:
    client = redis.Redis.from_url(redis_server.url)
    try:
        return [f[b"i"].decode() for _, f in client.xrange(f"enrichment-history:{bom_id}")]
    finally:
        client.close()


async def read_stream(
    http: aiohttp.ClientSession,
    base: str,
    bom_id: str,
    last_event_id: str | None = None,
    count: int | None = None,
) -> tuple[bool, list[Frame]]:
    """(resumed, events): ``count`` events, or every frame until the stream ends."""
    headers = dict(AUTH)
    if last_event_id is not None:
        headers["Last-Event-ID"] = last_event_id
    async with http.get(f"{base}/api/enrichment/stream/{bom_id}", headers=headers) as resp:
        assert resp.status == 200, await resp.text()
        s = SSEStream(resp)
        connected = await s.next_event()
        assert connected is not None and connected.event == "connected"
        if count is None:
            return connected.json()["resumed"], await s.events_until_end(timeout=5)
        return connected.json()["resumed"], [
            f for f in [await s.next_event() for _ in range(count)] if f is not None
        ]


async def test_a_new_instance_resumes_last_event_id_with_exactly_the_missed_events(
    redis_server: RedisProcess, gateways: list[GatewayProcess], http: aiohttp.ClientSession
) -> None:
    first = await started(gateways, redis_server, http)
    for n in range(1, 6):
        worker_publish(redis_server, "bom-a", progress("bom-a", n))
    await eventually(
        lambda: asyncio.to_thread(stored_ids, redis_server, "bom-a"), lambda i: len(i) == 5
    )
    first.stop()
    second = await started(gateways, redis_server, http)
    resumed, frames = await read_stream(http, second.url, "bom-a", "bom-a-e3", count=2)
    assert resumed is True
    assert [f.id for f in frames] == ["bom-a-e4", "bom-a-e5"]
    samples = await scrape(http, second.url, token=None)
    assert value(samples, "bomstream_history_reads_total", result="hit") == 1
    assert value(samples, "bomstream_replay_total", result="hit") == 1


async def test_a_late_joiner_on_a_fresh_instance_gets_the_latest_event_as_snapshot(
    redis_server: RedisProcess, gateways: list[GatewayProcess], http: aiohttp.ClientSession
) -> None:
    with Publisher(redis_server.url) as pub:
        for n in range(1, 4):
            pub.publish("bom-s", progress("bom-s", n))
    g = await started(gateways, redis_server, http)
    resumed, frames = await read_stream(http, g.url, "bom-s", count=1)
    assert resumed is False
    assert [f.id for f in frames] == ["bom-s-e3"]
    async with http.get(f"{g.url}/api/enrichment/events/bom-s", headers=AUTH) as resp:
        body = await resp.json()
    assert [e["event_id"] for e in body["events"]] == ["bom-s-e1", "bom-s-e2", "bom-s-e3"]
    assert body["state"]["enriched_items"] == 3


async def test_a_job_that_finished_before_the_instance_started(
    redis_server: RedisProcess, gateways: list[GatewayProcess], http: aiohttp.ClientSession
) -> None:
    with Publisher(redis_server.url) as pub:
        pub.publish("bom-f", progress("bom-f", 1))
        pub.publish("bom-f", {"event_id": "bom-f-done", "event_type": "enrichment.completed"})
    g = await started(gateways, redis_server, http)
    resumed, frames = await read_stream(http, g.url, "bom-f")
    assert resumed is False
    assert [(f.event, f.id) for f in frames] == [
        ("enrichment.completed", "bom-f-done"),
        ("stream_end", None),
    ]
    assert frames[-1].json()["reason"] == "enrichment.completed"
    headers = {**AUTH, "Last-Event-ID": "bom-f-done"}
    async with http.get(f"{g.url}/api/enrichment/stream/bom-f", headers=headers) as resp:
        assert resp.status == 204
    # On yet another fresh instance the poll says the same.
    other = await started(gateways, redis_server, http)
    url = f"{other.url}/api/enrichment/events/bom-f?after=bom-f-e1"
    async with http.get(url, headers=AUTH) as resp:
        body = await resp.json()
    assert body["resumed"] is True and body["terminal"] is True
    assert [e["event_id"] for e in body["events"]] == ["bom-f-done"]


async def test_two_instances_store_each_directly_published_event_once_in_order(
    redis_server: RedisProcess, gateways: list[GatewayProcess], http: aiohttp.ClientSession
) -> None:
    for _ in range(2):
        await started(gateways, redis_server, http)
    expected = [f"bom-o-e{n}" for n in range(1, 301)]
    for n in range(1, 301):
        worker_publish(redis_server, "bom-o", progress("bom-o", n, total=300))
    ids = await eventually(
        lambda: asyncio.to_thread(stored_ids, redis_server, "bom-o"),
        lambda i: len(i) >= 300,
        timeout=10,
    )
    assert ids == expected
    for g in gateways:
        samples = await scrape(http, g.url)
        assert (
            value(samples, "bomstream_history_writes_total", result="stored")
            + value(samples, "bomstream_history_writes_total", result="duplicate")
            == 300
        )
    stored = [
        value(await scrape(http, g.url), "bomstream_history_writes_total", result="stored")
        for g in gateways
    ]
    assert sum(stored) == 300


async def test_the_writer_stores_again_after_redis_forgets_its_script(
    redis_server: RedisProcess, gateways: list[GatewayProcess], http: aiohttp.ClientSession
) -> None:
    await started(gateways, redis_server, http)
    worker_publish(redis_server, "bom-f", progress("bom-f", 1))
    await eventually(
        lambda: asyncio.to_thread(stored_ids, redis_server, "bom-f"), lambda i: len(i) == 1
    )
    client = redis.Redis.from_url(redis_server.url)
    try:
        client.script_flush()  # what a restarted or flushed Redis has done
    finally:
        client.close()
    for n in range(2, 5):
        worker_publish(redis_server, "bom-f", progress("bom-f", n))
    ids = await eventually(
        lambda: asyncio.to_thread(stored_ids, redis_server, "bom-f"), lambda i: len(i) == 4
    )
    assert ids == [f"bom-f-e{n}" for n in range(1, 5)]


async def test_history_is_capped_at_the_buffer_size_and_expires(
    redis_server: RedisProcess, gateways: list[GatewayProcess], http: aiohttp.ClientSession
) -> None:
    await started(gateways, redis_server, http, buffer_events_per_bom=5, buffer_retention_s=30)
    for n in range(1, 13):
        worker_publish(redis_server, "bom-c", progress("bom-c", n))
    ids = await eventually(
        lambda: asyncio.to_thread(stored_ids, redis_server, "bom-c"),
        lambda i: i[-1:] == ["bom-c-e12"],
    )
    assert ids == [f"bom-c-e{n}" for n in range(8, 13)]
    client = redis.Redis.from_url(redis_server.url)
    try:
        held = sorted(k.decode() for k in client.hkeys("enrichment-history:bom-c:ids"))
        assert held == sorted(ids)
        for key in ("enrichment-history:bom-c", "enrichment-history:bom-c:ids"):
            assert 0 < client.pttl(key) <= 30_000
    finally:
        client.close()


async def test_200_clients_reconnecting_at_once_to_a_fresh_instance_cost_one_history_read(
    redis_server: RedisProcess, gateways: list[GatewayProcess]
) -> None:
    with Publisher(redis_server.url) as pub:
        for n in range(1, 11):
            pub.publish("bom-h", progress("bom-h", n))
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        g = await started(gateways, redis_server, http)
        results = await asyncio.gather(
            *(read_stream(http, g.url, "bom-h", "bom-h-e7", count=3) for _ in range(200))
        )
        for resumed, frames in results:
            assert resumed is True
            assert [f.id for f in frames] == ["bom-h-e8", "bom-h-e9", "bom-h-e10"]
        samples = await scrape(http, g.url)
    reads = sum(
        value(samples, "bomstream_history_reads_total", result=r) for r in ("hit", "miss", "error")
    )
    assert reads == 1
    assert value(samples, "bomstream_history_read_seconds_count") == 1


async def test_redis_restarted_with_history_on_delivers_nothing_twice(
    redis_server: RedisProcess, gateways: list[GatewayProcess], http: aiohttp.ClientSession
) -> None:
    g = await started(gateways, redis_server, http)
    async with http.get(f"{g.url}/api/enrichment/stream/bom-r", headers=AUTH) as resp:
        s = SSEStream(resp)
        assert (await s.next_event()).event == "connected"  # type: ignore[union-attr]
        for n in (1, 2, 3):
            await publish(http, g.url, "bom-r", progress("bom-r", n), token=ADMIN)
        got = [(await s.next_event()).id for _ in range(3)]  # type: ignore[union-attr]
        redis_server.restart()  # history is gone with it (no persistence)
        await eventually(lambda: g.health(http), lambda h: h["redis"] == "connected", timeout=10)
        # A worker retries event 3 (it never saw the 202), then carries on.
        for n in (3, 4):
            await publish(http, g.url, "bom-r", progress("bom-r", n), token=ADMIN)
        got.append((await s.next_event()).id)  # type: ignore[union-attr]
        await publish(http, g.url, "bom-r", progress("bom-r", 5), token=ADMIN)
        got.append((await s.next_event()).id)  # type: ignore[union-attr]
    assert got == ["bom-r-e1", "bom-r-e2", "bom-r-e3", "bom-r-e4", "bom-r-e5"]
    # The same instance still resumes from its buffer.
    resumed, frames = await read_stream(http, g.url, "bom-r", "bom-r-e2", count=3)
    assert resumed is True
    assert [f.id for f in frames] == ["bom-r-e3", "bom-r-e4", "bom-r-e5"]
    health = await g.health(http)
    assert health["history"] == "ok"


async def test_org_scoping_applies_to_history_rows_on_a_fresh_instance(
    redis_server: RedisProcess, gateways: list[GatewayProcess], http: aiohttp.ClientSession
) -> None:
    with Publisher(redis_server.url) as pub:
        pub.publish("bom-g", progress("bom-g", 1, organization_id="org-a"))
        pub.publish("bom-g", progress("bom-g", 2))  # names no org: admin streams only
        pub.publish("bom-g", progress("bom-g", 3, organization_id="org-a"))
    g = await started(gateways, redis_server, http, auth_jwt_secret=SECRET)
    url = f"{g.url}/api/enrichment/stream/bom-g"
    other = {"Authorization": f"Bearer {org_token('org-b')}"}
    async with http.get(url, headers=other) as resp:
        assert resp.status == 403
    mine = {"Authorization": f"Bearer {org_token('org-a')}", "Last-Event-ID": "bom-g-e1"}
    async with http.get(url, headers=mine) as resp:
        assert resp.status == 200
        s = SSEStream(resp)
        assert (await s.next_event()).json()["resumed"] is True  # type: ignore[union-attr]
        assert (await s.next_event()).id == "bom-g-e3"  # type: ignore[union-attr]
    poll = f"{g.url}/api/enrichment/events/bom-g"
    async with http.get(poll, headers={"Authorization": mine["Authorization"]}) as resp:
        body = await resp.json()
    assert [e["event_id"] for e in body["events"]] == ["bom-g-e1", "bom-g-e3"]
    async with http.get(poll, headers=other) as resp:
        assert resp.status == 403
