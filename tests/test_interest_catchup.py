"""Interest subscriptions: the switch from "not subscribed" to "subscribed"
loses nothing and doubles nothing, whether it happens on a first watch, on a
watch after the BOM was released, or when the feed comes back after a drop."""

from __future__ import annotations

import asyncio
import random

import aiohttp
import redis

from bomstream.publisher import AsyncPublisher
from tests.gateway_proc import GatewayProcess
from tests.interest_kit import (
    AUTH,
    Publishing,
    channels,
    check_stream,
    gateways,
    inspect,
    numsub,
    read_all,
    read_all_after_finish,
    started,
)
from tests.metrics_scrape import scrape, value
from tests.redis_proc import RedisProcess
from tests.sse import Frame, SSEStream
from tests.waiting import eventually

__all__ = ["gateways", "inspect"]  # fixtures


# -- the switch from "not subscribed" to "subscribed" ------------------------------


async def test_streams_that_open_while_their_bom_is_being_published_get_every_event_once(
    redis_server: RedisProcess,
    gateways: list[GatewayProcess],
    inspect: redis.Redis,
) -> None:
    boms, events, streams_per_bom = 8, 300, 6
    async with (
        aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0),
            timeout=aiohttp.ClientTimeout(total=None, sock_read=30),
        ) as http,
        AsyncPublisher(redis_server.url) as pub,
    ):
        g = await started(gateways, redis_server, http)
        rng = random.Random(7)

        async def one_bom(b: int) -> list[tuple[list[str], bool, list[Frame], str | None]]:
            run = Publishing(pub, f"race-{b}", events)

            async def watcher(at: int, resume: bool) -> tuple[bool, list[Frame], str | None]:
                await run.reached(at)
                # Resume from an event published a moment ago, or connect fresh.
                after = (
                    run.sent[rng.randrange(max(0, len(run.sent) - 20), len(run.sent))]
                    if resume
                    else None
                )
                resumed, frames = await read_all(http, g.url, run.bom_id, after)
                return resumed, frames, after

            points = sorted(rng.sample(range(1, events), streams_per_bom))
            watchers = [asyncio.create_task(watcher(at, i % 2 == 0)) for i, at in enumerate(points)]
            await run.run()
            await run.finish()
            results = await asyncio.gather(*watchers)
            return [(run.sent, *r) for r in results]

        per_bom = await asyncio.gather(*(one_bom(b) for b in range(boms)))
        for results in per_bom:
            for sent, resumed, frames, after in results:
                check_stream(sent, resumed, frames, after)
        samples = await scrape(http, g.url)
    # Each BOM's first stream subscribed it while its events were being published.
    assert value(samples, "bomstream_redis_subscription_changes_total", change="subscribe") == boms
    assert value(samples, "bomstream_events_dropped_total", reason="duplicate") == 0


async def test_a_bom_watched_again_after_its_release_resumes_while_it_is_published(
    redis_server: RedisProcess,
    gateways: list[GatewayProcess],
    http: aiohttp.ClientSession,
    inspect: redis.Redis,
) -> None:
    g = await started(gateways, redis_server, http)
    async with AsyncPublisher(redis_server.url) as pub:
        run = Publishing(pub, "again", 50)
        # First watch: read a little, then leave.
        async with http.get(f"{g.url}/api/enrichment/stream/again", headers=AUTH) as resp:
            s = SSEStream(resp)
            assert (await s.next_event()).event == "connected"  # type: ignore[union-attr]
            await run.run()
            seen = [(await s.next_event()).id for _ in range(50)]  # type: ignore[union-attr]
        assert seen == run.sent
        await eventually(
            lambda: asyncio.to_thread(numsub, inspect, "again"), lambda n: n["again"] == 0
        )
        # Published on and on while nobody here listens, and while the resume connects.
        publishing = asyncio.create_task(run.run(start=51))
        await run.reached(80)
        resumed, frames = await read_all_after_finish(http, g.url, run, publishing, seen[-1])
    check_stream(run.sent, resumed, frames, seen[-1])


async def test_a_dropped_feed_resubscribes_every_watched_bom_at_once_and_fills_the_gap(
    redis_server: RedisProcess,
    gateways: list[GatewayProcess],
    inspect: redis.Redis,
) -> None:
    """Events published while the subscription connection is down are only in
    history; open streams stay open and get them, in order, before what follows."""
    boms = [f"gap-{i}" for i in range(20)]
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http,
        AsyncPublisher(redis_server.url) as pub,
    ):
        g = await started(gateways, redis_server, http)
        runs = [Publishing(pub, b, 200) for b in boms]
        readers = [asyncio.create_task(read_all(http, g.url, b)) for b in boms]
        await eventually(lambda: asyncio.to_thread(channels, inspect), lambda c: len(c) == 20)
        before = value(
            await scrape(http, g.url),
            "bomstream_redis_subscription_commands_total",
            command="subscribe",
        )
        publishing = [asyncio.create_task(r.run()) for r in runs]
        await runs[0].reached(50)
        killed = inspect.client_kill_filter(_type="pubsub")
        assert killed == 1
        await asyncio.gather(*publishing)
        for r in runs:
            await r.finish()
        results = await asyncio.gather(*readers)
        samples = await scrape(http, g.url)
    for run, (resumed, frames) in zip(runs, results, strict=True):
        check_stream(run.sent, resumed, frames, None)
        # The streams were open before the first event: they saw every one.
        assert len(frames) == len(run.sent) + 1
    assert value(samples, "bomstream_redis_reconnects_total") >= 1
    # All 20 again in one SUBSCRIBE.
    assert (
        value(samples, "bomstream_redis_subscription_commands_total", command="subscribe")
        == before + 1
    )
    assert value(samples, "bomstream_redis_resyncs_total", result="filled") == 20
    # Some events never reached the gateway live (the gap); the streams had them all.
    heard = value(samples, "bomstream_events_received_total", source="redis")
    assert heard < sum(len(r.sent) for r in runs)
