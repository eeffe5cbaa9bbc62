"""The Redis feed (spec section 6) against a real redis-server the tests own."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket

import aiohttp
import pytest

from bomstream.server import RunningGateway
from tests.conftest import StartGateway, open_stream, progress, publish
from tests.redis_proc import RedisProcess


async def wait_health(
    http: aiohttp.ClientSession, gw: RunningGateway, status: int, timeout: float = 10
) -> dict[str, object]:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        async with http.get(f"{gw.url}/api/enrichment/health") as resp:
            body = await resp.json()
            if resp.status == status:
                return body
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"health never became {status}: {body}")
        await asyncio.sleep(0.05)


async def redis_gateway(
    factory: StartGateway, redis: RedisProcess, http: aiohttp.ClientSession, **kw: object
) -> RunningGateway:
    gw = await factory(redis__url=redis.url, redis__backoff_max_s=0.3, **kw)
    await wait_health(http, gw, 200)
    return gw


def redis_command(port: int, *args: str) -> bytes:
    raw = b"*%d\r\n" % len(args) + b"".join(
        b"$%d\r\n%s\r\n" % (len(a.encode()), a.encode()) for a in args
    )
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(raw)
        return s.recv(65536)


async def test_worker_publish_reaches_stream(
    gateway_factory: StartGateway, redis_server: RedisProcess, http: aiohttp.ClientSession
) -> None:
    gw = await redis_gateway(gateway_factory, redis_server, http)
    async with open_stream(http, gw.url, "bom-r") as s:
        await s.next_event()
        receivers = redis_server.publish("enrichment:bom-r", json.dumps(progress("bom-r", 1)))
        assert receivers == 1
        frame = await s.next_event()
        assert frame.id == "bom-r-e1"
        assert frame.json()["state"]["enriched_items"] == 1
    health = await wait_health(http, gw, 200)
    assert health["redis"] == "connected"


async def test_one_pattern_subscription_per_process_however_many_streams(
    gateway_factory: StartGateway, redis_server: RedisProcess, http: aiohttp.ClientSession
) -> None:
    gw = await redis_gateway(gateway_factory, redis_server, http)
    async with contextlib.AsyncExitStack() as stack:
        for i in range(30):
            s = await stack.enter_async_context(open_stream(http, gw.url, f"bom-{i % 5}"))
            await s.next_event()
        assert gw.gateway.hub.stream_count == 30
        assert redis_command(redis_server.port, "PUBSUB", "NUMPAT").startswith(b":1\r\n")
        clients = redis_command(redis_server.port, "CLIENT", "LIST").decode()
        assert sum("psub=1" in line for line in clients.splitlines()) == 1


async def test_http_publish_goes_through_redis_to_every_instance(
    gateway_factory: StartGateway, redis_server: RedisProcess, http: aiohttp.ClientSession
) -> None:
    a = await redis_gateway(gateway_factory, redis_server, http)
    b = await redis_gateway(gateway_factory, redis_server, http)
    async with open_stream(http, a.url, "bom-x") as sa, open_stream(http, b.url, "bom-x") as sb:
        await sa.next_event()
        await sb.next_event()
        reply = await publish(http, a.url, "bom-x", {"event_type": "enrichment.started"})
        got_a = await sa.next_event()
        got_b = await sb.next_event()
        assert got_a.id == got_b.id == reply["event_id"]
        assert got_a.data == got_b.data


async def test_instances_agree_on_the_id_of_an_event_published_without_one(
    gateway_factory: StartGateway, redis_server: RedisProcess, http: aiohttp.ClientSession
) -> None:
    a = await redis_gateway(gateway_factory, redis_server, http)
    b = await redis_gateway(gateway_factory, redis_server, http)
    async with open_stream(http, a.url, "bom-y") as sa, open_stream(http, b.url, "bom-y") as sb:
        await sa.next_event()
        await sb.next_event()
        redis_server.publish("enrichment:bom-y", b'{"event_type": "enrichment.started"}')
        redis_server.publish("enrichment:bom-y", b'{"event_type": "enrichment.progress"}')
        got_a = [await sa.next_event(), await sa.next_event()]
        got_b = [await sb.next_event(), await sb.next_event()]
    assert [f.id for f in got_a] == [f.id for f in got_b]
    assert got_a[0].id != got_a[1].id
    # The id a client holds from one instance resumes on the other.
    async with open_stream(http, b.url, "bom-y", last_event_id=got_a[0].id) as s:
        assert (await s.next_event()).json()["resumed"] is True
        assert (await s.next_event()).id == got_a[1].id


async def test_redis_killed_and_restarted_mid_stream(
    gateway_factory: StartGateway, redis_server: RedisProcess, http: aiohttp.ClientSession
) -> None:
    gw = await redis_gateway(gateway_factory, redis_server, http, server__heartbeat_s=0.2)
    async with open_stream(http, gw.url, "bom-k") as s:
        await s.next_event()
        redis_server.publish("enrichment:bom-k", json.dumps(progress("bom-k", 1)))
        assert (await s.next_event()).id == "bom-k-e1"

        redis_server.kill()
        down = await wait_health(http, gw, 503)
        assert (down["status"], down["redis"]) == ("unhealthy", "disconnected")
        # The open stream stays open and keeps its heartbeats while Redis is down.
        for _ in range(3):
            frame = await s.next(timeout=3)
            assert frame is not None and frame.comments == ["keepalive"]
        async with http.get(f"{gw.url}/api/enrichment/stream/bom-k") as refused:
            assert refused.status == 503
            assert int(refused.headers["Retry-After"]) > 0
            assert (await refused.json())["code"] == "broker_unavailable"

        redis_server.start()
        await wait_health(http, gw, 200)
        redis_server.publish("enrichment:bom-k", json.dumps(progress("bom-k", 2)))
        assert (await s.next_event(timeout=5)).id == "bom-k-e2"


async def test_redis_down_at_start_then_comes_up(
    gateway_factory: StartGateway, http: aiohttp.ClientSession
) -> None:
    redis = RedisProcess()
    try:
        gw = await gateway_factory(redis__url=redis.url, redis__backoff_max_s=0.3)
        await wait_health(http, gw, 503)
        redis.start()
        await wait_health(http, gw, 200)
        async with open_stream(http, gw.url, "bom-late") as s:
            await s.next_event()
            redis.publish("enrichment:bom-late", json.dumps(progress("bom-late", 1)))
            assert (await s.next_event()).id == "bom-late-e1"
    finally:
        redis.close()


BAD_MESSAGES: list[tuple[str, bytes, str]] = [
    ("enrichment:bom-b", b"not json at all", "invalid_json"),
    ("enrichment:bom-b", b"[1, 2, 3]", "not_an_object"),
    ("enrichment:bom-b", b'{"state": {}}', "invalid_event_type"),
    ("enrichment:bom-b", b'{"event_type": "x\\r\\nevent: injected"}', "invalid_event_type"),
    ("enrichment:bom-b", b'{"event_type": "x\\ndata: injected"}', "invalid_event_type"),
    ("enrichment:bom-b", b'{"event_type": ""}', "invalid_event_type"),
    ("enrichment:bom-b", b'{"event_type": 7}', "invalid_event_type"),
    (
        "enrichment:bom-b",
        b'{"event_type": "enrichment.progress", "bom_id": "other"}',
        "bom_id_mismatch",
    ),
    ("enrichment:bom-b", b'{"event_type": "enrichment.progress", "x": "\xff\xfe"}', "invalid_utf8"),
    (
        "enrichment:bom-b",
        b'{"event_type": "enrichment.progress", "pad": "' + b"x" * 70000 + b'"}',
        "too_large",
    ),
    ("enrichment:-bad-bom", b'{"event_type": "enrichment.progress"}', "invalid_bom_id"),
]


async def test_bad_messages_from_redis_are_dropped_counted_and_the_feed_goes_on(
    gateway_factory: StartGateway,
    redis_server: RedisProcess,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="bomstream.redis")
    gw = await redis_gateway(gateway_factory, redis_server, http)
    async with open_stream(http, gw.url, "bom-b") as s:
        await s.next_event()
        for _ in range(20):  # a burst, to check the log is rate-limited
            for channel, raw, _reason in BAD_MESSAGES:
                redis_server.publish(channel, raw)
        redis_server.publish("enrichment:bom-b", json.dumps(progress("bom-b", 1)))
        frame = await s.next_event()
        # Nothing bad reached the client: the next thing after connected is the good event.
        assert frame.id == "bom-b-e1"
        assert frame.event == "enrichment.progress"

    async with http.get(f"{gw.url}/metrics") as resp:
        text = await resp.text()
    for _channel, _raw, reason in BAD_MESSAGES:
        assert f'bomstream_events_dropped_total{{reason="{reason}"}}' in text, reason
    assert 'bomstream_events_dropped_total{reason="invalid_event_type"} 100.0' in text
    drop_lines = [r for r in caplog.records if "dropped" in r.getMessage()]
    assert 1 <= len(drop_lines) <= 2
