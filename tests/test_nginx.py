"""bomstream behind a real nginx (started from deploy/nginx.conf) with two gateway
processes sharing one real redis-server, as in production."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack

import aiohttp
import pytest

from tests.conftest import open_stream, progress, publish
from tests.metrics_scrape import scrape, value
from tests.nginx_stack import Follower, Stack, nginx_stack
from tests.redis_proc import RedisProcess
from tests.sse import SSEStream
from tests.waiting import eventually

ADMIN = "nginx-suite-admin-token"
AUTH = {"Authorization": f"Bearer {ADMIN}"}
GRACE_S = 5.0


@pytest.fixture
async def stack(redis_server: RedisProcess, http: aiohttp.ClientSession) -> AsyncIterator[Stack]:
    async with nginx_stack(redis_server, http, admin=ADMIN, grace_s=GRACE_S) as made:
        yield made


async def test_event_published_to_redis_reaches_client_through_nginx_within_300ms(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    loop = asyncio.get_running_loop()
    # aiohttp asks for gzip; a stream must come back uncompressed all the same.
    async with http.get(f"{stack.url}/api/enrichment/stream/bom-n", headers=AUTH) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "text/event-stream"
        assert "Content-Encoding" not in resp.headers
        assert resp.headers.get("Transfer-Encoding") == "chunked"
        s = SSEStream(resp)
        assert (await s.next_event()).event == "connected"
        latencies = []
        for n in range(1, 11):
            t0 = loop.time()
            stack.publish("bom-n", progress("bom-n", n))
            frame = await s.next_event(timeout=2)
            latencies.append(loop.time() - t0)
            assert frame is not None
            assert frame.id == f"bom-n-e{n}"
        print(f"redis->nginx->client latency ms: {[round(x * 1000, 1) for x in latencies]}")
        assert max(latencies) < 0.3, latencies
        # Heartbeats (every 0.2 s here) are not held back by nginx either.
        beats = 0
        t0 = loop.time()
        while beats < 3:
            frame = await s.next(timeout=1)
            assert frame is not None
            if frame.comments == ["keepalive"]:
                beats += 1
        assert loop.time() - t0 < 1.5


async def test_killed_instance_client_resumes_on_the_other_with_every_event_once_in_order(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    follower = Follower(f"{stack.url}/api/enrichment/stream/bom-f", ADMIN)
    task = asyncio.create_task(follower.run(http))
    try:
        await eventually(lambda: stack.serving(http), lambda counts: sorted(counts) == [0, 1])
        for n in range(1, 4):
            stack.publish("bom-f", progress("bom-f", n))

        async def received() -> int:
            return len(follower.events)

        await eventually(received, lambda k: k == 3)
        victim = (await stack.serving(http)).index(1)
        survivor = stack.gateways[1 - victim]
        stack.gateways[victim].kill()
        # Workers keep publishing while the client is cut off and reconnecting.
        for n in range(4, 41):
            stack.publish("bom-f", progress("bom-f", n))
            await asyncio.sleep(0.005)
        stack.publish("bom-f", {"event_id": "bom-f-done", "event_type": "enrichment.completed"})
        await asyncio.wait_for(task, 20)
    finally:
        task.cancel()
    ids = [f.id for f in follower.events]
    print(f"failover: {len(follower.connects)} connections, resumed flags {follower.connects}")
    assert ids == [f"bom-f-e{n}" for n in range(1, 41)] + ["bom-f-done"]
    assert follower.end_reason == "enrichment.completed"
    assert follower.connects[0] is False
    assert all(follower.connects[1:]) and len(follower.connects) >= 2
    samples = await scrape(http, survivor.url)
    assert value(samples, "bomstream_replay_total", result="hit") >= 1


async def test_rolling_restart_moves_streams_to_the_other_instance_without_loss(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    followers = [Follower(f"{stack.url}/api/enrichment/stream/bom-r", ADMIN) for _ in range(10)]
    tasks = [asyncio.create_task(f.run(http)) for f in followers]
    try:
        counts = await eventually(lambda: stack.serving(http), lambda c: sum(c) == 10)
        assert min(counts) > 0, counts
        for n in range(1, 6):
            stack.publish("bom-r", progress("bom-r", n))

        async def all_have_five() -> bool:
            return all(len(f.events) == 5 for f in followers)

        await eventually(all_have_five, bool)
        stopping = stack.gateways[0]
        stopping.signal(signal.SIGTERM)
        for n in range(6, 31):
            stack.publish("bom-r", progress("bom-r", n))
            await asyncio.sleep(0.005)
        assert await stopping.wait(GRACE_S + 5) == 0
        await eventually(lambda: stack.gateways[1].health(http), lambda h: h["streams"] == 10)
        stack.publish("bom-r", {"event_id": "bom-r-done", "event_type": "enrichment.failed"})
        await asyncio.wait_for(asyncio.gather(*tasks), 20)
    finally:
        for task in tasks:
            task.cancel()
    expected = [f"bom-r-e{n}" for n in range(1, 31)] + ["bom-r-done"]
    moved = [f for f in followers if "server_shutdown" in f.ends]
    assert len(moved) == counts[0]
    for f in followers:
        assert [e.id for e in f.events] == expected
        assert f.end_reason == "enrichment.failed"
    for f in moved:
        assert f.ends == ["server_shutdown", "enrichment.failed"]
        assert f.connects == [False, True]


async def test_events_without_event_id_still_resume_on_another_instance(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    """Every instance derives the same id for an id-less Redis event, so a client
    moving to another instance resumes where it was."""
    follower = Follower(f"{stack.url}/api/enrichment/stream/bom-u", ADMIN)
    task = asyncio.create_task(follower.run(http))
    try:
        await eventually(lambda: stack.serving(http), lambda c: sum(c) == 1)
        for n in range(1, 4):
            event = progress("bom-u", n)
            del event["event_id"]
            stack.publish("bom-u", event)

        async def received() -> int:
            return len(follower.events)

        await eventually(received, lambda k: k == 3)
        victim = (await stack.serving(http)).index(1)
        stack.gateways[victim].kill()
        await eventually(lambda: stack.gateways[1 - victim].health(http), lambda h: h["streams"])
        stack.publish("bom-u", {"event_type": "enrichment.completed"})
        await asyncio.wait_for(task, 20)
    finally:
        task.cancel()
    assert follower.connects == [False, True]
    payloads = [f.json().get("payload") for f in follower.events]
    assert payloads == [{"n": 1}, {"n": 2}, {"n": 3}, None]
    assert follower.events[3].event == "enrichment.completed"
    assert len({f.id for f in follower.events}) == 4


async def test_sigterm_with_50_streams_through_nginx_ends_each_with_server_shutdown(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    loop = asyncio.get_running_loop()
    async with AsyncExitStack() as es:
        streams: list[SSEStream] = []
        for i in range(50):
            s = await es.enter_async_context(open_stream(http, stack.url, f"bom-{i}", token=ADMIN))
            assert (await s.next_event()).event == "connected"
            streams.append(s)
        counts = await stack.serving(http)
        assert sum(counts) == 50
        assert min(counts) > 0, counts  # nginx spread them over both instances
        t0 = loop.time()
        for g in stack.gateways:
            g.signal(signal.SIGTERM)
        ends = await asyncio.gather(*(s.events_until_end(timeout=GRACE_S) for s in streams))
        codes = await asyncio.gather(*(g.wait(GRACE_S + 5) for g in stack.gateways))
        elapsed = loop.time() - t0
    assert codes == [0, 0]
    assert elapsed < GRACE_S, elapsed
    for frames in ends:
        assert [(f.event, f.json()["reason"]) for f in frames] == [
            ("stream_end", "server_shutdown")
        ]


async def test_metrics_of_each_instance_parse_and_move_with_traffic_through_nginx(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    before = [await scrape(http, g.url) for g in stack.gateways]
    async with open_stream(http, stack.url, "bom-m", expect=401):
        pass
    async with open_stream(http, stack.url, "bom-m", token=ADMIN) as s:
        assert (await s.next_event()).event == "connected"
        for n in range(1, 6):
            stack.publish("bom-m", progress("bom-m", n))
        await publish(http, stack.url, "bom-m", progress("bom-m", 6), token=ADMIN)
        assert [(await s.next_event()).id for _ in range(6)] == [f"bom-m-e{n}" for n in range(1, 7)]
    after = [await scrape(http, g.url) for g in stack.gateways]

    def moved(name: str, **labels: str) -> list[float]:
        pairs = zip(after, before, strict=True)
        return [value(a, name, **labels) - value(b, name, **labels) for a, b in pairs]

    # Every instance takes in every event from the shared Redis feed.
    assert moved("bomstream_events_received_total", source="redis") == [6, 6]
    assert sorted(moved("bomstream_events_received_total", source="http")) == [0, 1]
    assert sum(moved("bomstream_streams_opened_total", result="ok")) == 1
    assert sum(moved("bomstream_streams_opened_total", result="401")) == 1
    assert sum(moved("bomstream_auth_failures_total", reason="missing")) == 1
    assert sum(moved("bomstream_events_delivered_total")) == 6
    assert sum(moved("bomstream_publish_to_write_seconds_count")) == 6
    assert [value(a, "bomstream_redis_connected") for a in after] == [1, 1]
    # Not exposed through the proxy: scraped per instance.
    async with http.get(f"{stack.url}/metrics") as resp:
        assert resp.status == 404


async def test_nginx_access_log_never_holds_a_query_token(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    url = f"{stack.url}/api/enrichment/stream/bom-a?token={ADMIN}"
    async with http.get(url) as resp:
        assert resp.status == 200
        assert (await SSEStream(resp).next_event()).event == "connected"
    async with http.get(f"{stack.url}/api/enrichment/events/bom-a?token={ADMIN}") as resp:
        assert resp.status == 200

    async def access_log() -> str:
        return stack.nginx.access_log()

    text = await eventually(access_log, lambda t: t.count("/api/enrichment/") >= 2)
    assert '"GET /api/enrichment/events/bom-a" 200' in text
    assert ADMIN not in text


async def test_health_check_through_nginx(stack: Stack, http: aiohttp.ClientSession) -> None:
    async with http.get(f"{stack.url}/api/enrichment/health") as resp:
        assert resp.status == 200
        body = await resp.json()
    assert body["status"] == "healthy"
    assert body["redis"] == "connected"
