"""/metrics: Prometheus text that prometheus-client parses, and every metric moves
with real traffic (real gateway, real redis-server)."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import aiohttp

from bomstream.channel import Subscriber
from bomstream.config_load import load_config
from bomstream.hub import Hub
from bomstream.metrics import Metrics
from bomstream.principal import OPEN
from bomstream.server import RunningGateway, start
from tests.conftest import StartGateway, open_stream, progress, publish
from tests.gateway_proc import GatewayProcess
from tests.metrics_scrape import Samples, parse, scrape, value
from tests.redis_proc import RedisProcess
from tests.waiting import eventually

TOKEN = "metrics-admin-token"
EXPECTED_FAMILIES = {
    "bomstream_streams_active",
    "bomstream_streams_opened",
    "bomstream_events_received",
    "bomstream_events_delivered",
    "bomstream_events_dropped",
    "bomstream_slow_consumer_disconnects",
    "bomstream_stream_end",
    "bomstream_replay",
    "bomstream_redis_connected",
    "bomstream_redis_reconnects",
    "bomstream_auth_failures",
    "bomstream_publish_to_write_seconds",
    "bomstream_loop_lag_seconds",
}


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def delta(after: Samples, before: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


async def test_metrics_parse_and_every_counter_moves_with_traffic(
    gateway_factory: StartGateway, redis_server: RedisProcess, http: aiohttp.ClientSession
) -> None:
    gw = await gateway_factory(
        redis__url=redis_server.url,
        auth__admin_token=TOKEN,
        server__max_connections=2,
        redis__backoff_initial_s=0.05,
        redis__backoff_max_s=0.2,
    )
    base = gw.url

    async def metrics() -> Samples:
        return await scrape(http, base)

    m0 = await eventually(metrics, lambda m: value(m, "bomstream_redis_connected") == 1)
    async with http.get(f"{base}/metrics") as resp:
        from prometheus_client.parser import text_string_to_metric_families

        families = {f.name for f in text_string_to_metric_families(await resp.text())}
    assert families >= EXPECTED_FAMILIES

    # Refused streams, by result, and auth failures by reason.
    async with open_stream(http, base, "bom-m", expect=401):
        pass
    async with open_stream(http, base, "bom-m", token="not-the-token", expect=401):
        pass
    async with http.get(f"{base}/api/enrichment/stream/-bad") as resp:
        assert resp.status == 400
    m1 = await metrics()
    assert delta(m1, m0, "bomstream_streams_opened_total", result="401") == 2
    assert delta(m1, m0, "bomstream_streams_opened_total", result="400") == 1
    assert delta(m1, m0, "bomstream_auth_failures_total", reason="missing") == 1
    assert delta(m1, m0, "bomstream_auth_failures_total", reason="invalid") == 1

    async with open_stream(http, base, "bom-m", token=TOKEN) as a:
        assert (await a.next_event()).event == "connected"
        mid = await metrics()
        assert value(mid, "bomstream_streams_active") == 1
        assert delta(mid, m0, "bomstream_streams_opened_total", result="ok") == 1

        # Two worker events straight to Redis, one through the publish endpoint.
        for n in (1, 2):
            redis_server.publish(
                "enrichment:bom-m", json.dumps(progress("bom-m", n, created_at=now_iso()))
            )
        await publish(http, base, "bom-m", progress("bom-m", 3), token=TOKEN)
        assert [(await a.next_event()).id for _ in range(3)] == ["bom-m-e1", "bom-m-e2", "bom-m-e3"]

        # Bad input and a retried event are dropped; a good event after them
        # proves the feed has processed them (Redis keeps order).
        redis_server.publish("enrichment:bom-m", b"{not json")
        redis_server.publish("enrichment:bom-m", json.dumps(progress("bom-m", 2)))
        redis_server.publish("enrichment:bom-m", json.dumps(progress("bom-m", 4)))
        assert (await a.next_event()).id == "bom-m-e4"
        m2 = await metrics()
        assert delta(m2, m0, "bomstream_events_received_total", source="redis") == 4
        assert delta(m2, m0, "bomstream_events_received_total", source="http") == 1
        assert delta(m2, m0, "bomstream_events_delivered_total") == 4
        assert delta(m2, m0, "bomstream_events_dropped_total", reason="invalid_json") == 1
        assert delta(m2, m0, "bomstream_events_dropped_total", reason="duplicate") == 1
        assert delta(m2, m0, "bomstream_publish_to_write_seconds_count") == 4

        # A resume whose id is held: a hit, and its catch-up counts as deliveries.
        async with open_stream(http, base, "bom-m", token=TOKEN, last_event_id="bom-m-e2") as b:
            assert (await b.next_event()).json()["resumed"] is True
            assert [(await b.next_event()).id for _ in range(2)] == ["bom-m-e3", "bom-m-e4"]
            # max_connections = 2: the third stream is refused.
            async with open_stream(http, base, "bom-x", token=TOKEN, expect=503):
                pass
        m3 = await eventually(metrics, lambda m: value(m, "bomstream_streams_active") == 1)
        assert delta(m3, m0, "bomstream_replay_total", result="hit") == 1
        assert delta(m3, m0, "bomstream_events_delivered_total") == 6
        assert delta(m3, m0, "bomstream_streams_opened_total", result="503") == 1
        assert delta(m3, m0, "bomstream_stream_end_total", reason="client_disconnected") == 1

        # A resume from an id nobody holds: a miss.
        async with open_stream(http, base, "bom-x", token=TOKEN, last_event_id="nope") as x:
            assert (await x.next_event()).json()["resumed"] is False
        await eventually(metrics, lambda m: value(m, "bomstream_streams_active") == 1)

        done = {"event_id": "bom-m-done", "event_type": "enrichment.completed", "bom_id": "bom-m"}
        redis_server.publish("enrichment:bom-m", json.dumps(done))
        frames = await a.events_until_end()
        assert [f.event for f in frames] == ["enrichment.completed", "stream_end"]

    async with open_stream(
        http, base, "bom-m", token=TOKEN, last_event_id="bom-m-done", expect=204
    ):
        pass
    m4 = await eventually(metrics, lambda m: value(m, "bomstream_streams_active") == 0)
    assert delta(m4, m0, "bomstream_replay_total", result="miss") == 1
    assert delta(m4, m0, "bomstream_replay_total", result="hit") == 2
    assert delta(m4, m0, "bomstream_streams_opened_total", result="204") == 1
    assert delta(m4, m0, "bomstream_stream_end_total", reason="enrichment.completed") == 1

    # Redis goes away and comes back.
    redis_server.kill()
    await eventually(metrics, lambda m: value(m, "bomstream_redis_connected") == 0)
    async with open_stream(http, base, "bom-y", token=TOKEN, expect=503):
        pass
    redis_server.start()
    m5 = await eventually(metrics, lambda m: value(m, "bomstream_redis_connected") == 1)
    assert delta(m5, m0, "bomstream_redis_reconnects_total") >= 1
    assert delta(m5, m0, "bomstream_streams_opened_total", result="503") == 2


async def test_metrics_token_guards_the_endpoint(
    gateway_factory: StartGateway, http: aiohttp.ClientSession
) -> None:
    gw = await gateway_factory(metrics__token="scrape-secret")
    async with http.get(f"{gw.url}/metrics") as resp:
        assert resp.status == 401
        assert (await resp.json())["code"] == "unauthorized"
    samples = await scrape(http, gw.url, token="scrape-secret")
    assert value(samples, "bomstream_streams_active") == 0


async def test_slow_consumer_disconnect_is_counted(
    gateway_factory: StartGateway, http: aiohttp.ClientSession
) -> None:
    gw = await gateway_factory(server__send_queue_bytes=1024)
    # A client that asks for a stream and never reads, with a tiny receive window.
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", gw.port))
    sock.sendall(b"GET /api/enrichment/stream/bom-s HTTP/1.1\r\nHost: t\r\n\r\n")
    try:
        await eventually(lambda: _stream_count(gw.gateway.hub), lambda n: n == 1)
        filler = "x" * 30000
        cut = False
        for n in range(400):  # bounded: about 12 MB at most
            await publish(http, gw.url, "bom-s", progress("bom-s", n, payload={"f": filler}))
            samples = parse(gw.gateway.metrics.render().decode())
            if value(samples, "bomstream_slow_consumer_disconnects_total") == 1:
                cut = True
                break
        assert cut, "the stream was never cut"
        assert value(samples, "bomstream_stream_end_total", reason="slow_consumer") == 1
        assert value(samples, "bomstream_streams_active") == 0
    finally:
        sock.close()


async def _stream_count(hub: Hub) -> int:
    return hub.stream_count


async def test_server_shutdown_and_max_duration_are_counted_as_stream_end_reasons(
    gateway_factory: StartGateway, http: aiohttp.ClientSession
) -> None:
    short = await gateway_factory(server__max_stream_s=0.2, server__max_stream_jitter_s=0.2)
    async with open_stream(http, short.url, "bom-d") as s:
        frames = await s.events_until_end(timeout=5)
    assert [f.event for f in frames] == ["connected", "stream_end"]
    assert frames[-1].json() == {"type": "stream_end", "reason": "max_duration"}
    samples = await scrape(http, short.url)
    assert value(samples, "bomstream_stream_end_total", reason="max_duration") == 1

    running = await start(
        load_config(env={}, overrides={"server.port": 0, "server.access_log": False},
                    default_file=False)
    )  # fmt: skip
    metrics = running.gateway.metrics
    stopped = False
    try:
        async with open_stream(http, running.url, "bom-d") as s:
            assert (await s.next_event()).event == "connected"
            await running.stop()
            stopped = True
            frames = await s.events_until_end(timeout=5)
        assert [f.json()["reason"] for f in frames] == ["server_shutdown"]
    finally:
        if not stopped:
            await running.stop()
    samples = parse(metrics.render().decode())
    assert value(samples, "bomstream_stream_end_total", reason="server_shutdown") == 1
    assert value(samples, "bomstream_streams_active") == 0


def test_max_duration_deadlines_are_jittered_within_bounds() -> None:
    cfg = load_config(
        env={},
        overrides={"server.max_stream_s": 60, "server.max_stream_jitter_s": 30},
        default_file=False,
    )
    hub = Hub(cfg, Metrics())
    sub = Subscriber("bom", OPEN, cast(Any, None))
    deadlines = [d for _ in range(50) if (d := hub._timers._deadline_for(sub))]
    assert {reason for reason, _ in deadlines} == {"max_duration"}
    seconds = [s for _, s in deadlines]
    assert all(60 <= s <= 90 for s in seconds)
    # Spread out, so streams opened together do not all reconnect together.
    assert max(seconds) - min(seconds) > 5


async def test_publish_to_write_latency_is_measured_from_created_at(
    gateway: RunningGateway, http: aiohttp.ClientSession
) -> None:
    async with open_stream(http, gateway.url, "bom-h") as s:
        assert (await s.next_event()).event == "connected"
        before = await scrape(http, gateway.url)
        # Created by the worker 2 s ago: the histogram must show ~2 s, not the
        # few milliseconds the gateway itself took.
        created = datetime.now(UTC) - timedelta(seconds=2)
        stamp = created.isoformat(timespec="milliseconds").replace("+00:00", "Z")
        await publish(http, gateway.url, "bom-h", progress("bom-h", 1, created_at=stamp))
        assert (await s.next_event()).id == "bom-h-e1"
    after = await scrape(http, gateway.url)
    name = "bomstream_publish_to_write_seconds_bucket"
    assert delta(after, before, name, le="1.0") == 0
    assert delta(after, before, name, le="2.5") == 1
    assert delta(after, before, "bomstream_publish_to_write_seconds_sum") >= 2.0


async def test_no_latency_is_observed_for_an_event_no_stream_received(
    gateway: RunningGateway, http: aiohttp.ClientSession
) -> None:
    await publish(http, gateway.url, "bom-q", progress("bom-q", 1))
    samples = await scrape(http, gateway.url)
    assert value(samples, "bomstream_events_received_total", source="http") == 1
    assert value(samples, "bomstream_publish_to_write_seconds_count") == 0


async def test_loop_lag_probe_sees_a_stalled_gateway(http: aiohttp.ClientSession) -> None:
    """A gateway process stopped for half a second (as a long GC pause would
    stall it) shows that pause in bomstream_loop_lag_seconds."""
    gw = GatewayProcess()
    try:
        await gw.start(http)
        lag = "bomstream_loop_lag_seconds"
        # The probe samples on its own, with nothing else going on.
        first = await eventually(lambda: _lag_count(http, gw.url), lambda n: n >= 3)
        before = await scrape(http, gw.url)
        gw.signal(signal.SIGSTOP)
        await asyncio.sleep(0.5)
        gw.signal(signal.SIGCONT)
        after = await scrape(http, gw.url)
        assert value(after, f"{lag}_count") > first

        # At least one more wake-up came over 0.2 s late: the stall.
        def late(s: Samples) -> float:
            return value(s, f"{lag}_count") - value(s, f"{lag}_bucket", le="0.2")

        assert late(after) - late(before) >= 1
        assert value(after, f"{lag}_sum") - value(before, f"{lag}_sum") >= 0.4
    finally:
        gw.signal(signal.SIGCONT)
        gw.stop()
        gw.close()


async def _lag_count(http: aiohttp.ClientSession, base: str) -> float:
    return value(await scrape(http, base), "bomstream_loop_lag_seconds_count")
