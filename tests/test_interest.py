"""Interest subscriptions (spec section 10, ``redis.subscribe = "interest"``) on
real gateway processes and a real redis-server: what is subscribed when, and
how the subscription commands batch. The catch-up side is in
test_interest_catchup.py."""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import time

import aiohttp
import pytest
import redis

from bomstream.publisher import AsyncPublisher
from tests.cli_proc import cli_env, run_cli
from tests.gateway_proc import GatewayProcess
from tests.interest_kit import (
    AUTH,
    GRACE_S,
    channels,
    event,
    gateways,
    inspect,
    numsub,
    started,
    subscribe_calls,
)
from tests.metrics_scrape import scrape, value
from tests.redis_proc import RedisProcess
from tests.sse import SSEStream
from tests.test_startup_refusals import assert_refused
from tests.waiting import eventually

__all__ = ["gateways", "inspect"]  # fixtures

# -- start-up ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "needles"),
    [
        (
            {"BOMSTREAM_REDIS_SUBSCRIBE": "interest", "BOMSTREAM_HISTORY_BACKEND": "none"},
            ("history.backend", "interest"),
        ),
        (
            {"BOMSTREAM_REDIS_CLUSTER": "true", "BOMSTREAM_HISTORY_BACKEND": "none"},
            ("history.backend", "implied by redis.cluster"),
        ),
        (
            {"BOMSTREAM_REDIS_CLUSTER": "true", "BOMSTREAM_REDIS_SUBSCRIBE": "pattern"},
            ("redis.subscribe", "'pattern' cannot be used with redis.cluster"),
        ),
        ({"BOMSTREAM_REDIS_SUBSCRIBE": "sometimes"}, ("redis.subscribe", "pattern or interest")),
        ({"BOMSTREAM_REDIS_UNSUBSCRIBE_GRACE_S": "-1"}, ("redis.unsubscribe_grace_s",)),
    ],
)
def test_unusable_subscription_settings_refuse_to_start(
    settings: dict[str, str], needles: tuple[str, ...]
) -> None:
    env = cli_env(BOMSTREAM_REDIS_URL="redis://127.0.0.1:1/0", **settings)
    out = run_cli("serve", "--port", "0", env=env)
    assert_refused(out.returncode, out.stderr, out.stdout, *needles)


# -- what is subscribed when -------------------------------------------------------


async def test_a_bom_is_subscribed_while_streamed_and_released_a_grace_after_the_last_stream(
    redis_server: RedisProcess,
    gateways: list[GatewayProcess],
    http: aiohttp.ClientSession,
    inspect: redis.Redis,
) -> None:
    g = await started(gateways, redis_server, http)
    assert channels(inspect) == set()
    assert inspect.execute_command("PUBSUB", "NUMPAT") == 0
    async with AsyncPublisher(redis_server.url) as pub:
        async with http.get(f"{g.url}/api/enrichment/stream/bom-w", headers=AUTH) as resp:
            s = SSEStream(resp)
            assert (await s.next_event()).event == "connected"  # type: ignore[union-attr]
            assert numsub(inspect, "bom-w") == {"bom-w": 1}
            assert channels(inspect) == {"enrichment:bom-w"}
            for n in (1, 2):
                await pub.publish("bom-w", event("bom-w", n))
            assert [(await s.next_event()).id for _ in range(2)] == [  # type: ignore[union-attr]
                "bom-w-e1",
                "bom-w-e2",
            ]
        left = time.monotonic()
        # A second stream in the grace finds it still subscribed: no new SUBSCRIBE.
        calls = subscribe_calls(inspect)["subscribe"]
        await eventually(
            lambda: asyncio.to_thread(numsub, inspect, "bom-w"), lambda n: n["bom-w"] == 0
        )
        released = time.monotonic() - left
        assert released >= GRACE_S * 0.9
        assert channels(inspect) == set()
        assert subscribe_calls(inspect)["subscribe"] == calls
        # Published while nobody here listens: it reaches history only...
        for n in (3, 4):
            await pub.publish("bom-w", event("bom-w", n))
        # ...and the next watch subscribes again and reads history again.
        async with http.get(
            f"{g.url}/api/enrichment/stream/bom-w", headers={**AUTH, "Last-Event-ID": "bom-w-e2"}
        ) as resp:
            s = SSEStream(resp)
            connected = await s.next_event()
            assert connected is not None and connected.json()["resumed"] is True
            assert [(await s.next_event()).id for _ in range(2)] == [  # type: ignore[union-attr]
                "bom-w-e3",
                "bom-w-e4",
            ]
            await pub.publish("bom-w", event("bom-w", 5))
            assert (await s.next_event()).id == "bom-w-e5"  # type: ignore[union-attr]
    samples = await scrape(http, g.url)
    g.signal(signal.SIGTERM)
    assert await g.wait(15) == 0
    assert value(samples, "bomstream_history_reads_total", result="hit") == 1
    assert value(samples, "bomstream_history_reads_total", result="miss") == 1
    assert value(samples, "bomstream_redis_subscription_commands_total", command="subscribe") == 2
    assert value(samples, "bomstream_redis_subscription_commands_total", command="unsubscribe") == 1


async def test_a_poll_keeps_its_bom_subscribed_for_the_grace(
    redis_server: RedisProcess,
    gateways: list[GatewayProcess],
    http: aiohttp.ClientSession,
    inspect: redis.Redis,
) -> None:
    g = await started(gateways, redis_server, http, redis_unsubscribe_grace_s=1.5)
    async with AsyncPublisher(redis_server.url) as pub:
        await pub.publish("bom-p", event("bom-p", 1))
        url = f"{g.url}/api/enrichment/events/bom-p"
        async with http.get(url, headers=AUTH) as resp:
            assert [e["event_id"] for e in (await resp.json())["events"]] == ["bom-p-e1"]
        polled = time.monotonic()
        assert numsub(inspect, "bom-p") == {"bom-p": 1}
        # While subscribed, what is published arrives live: the next poll has it
        # without another history read.
        await pub.publish("bom-p", event("bom-p", 2))

        async def poll() -> list[str]:
            async with http.get(url + "?after=bom-p-e1", headers=AUTH) as resp:
                return [e["event_id"] for e in (await resp.json())["events"]]

        assert await eventually(poll, lambda ids: ids == ["bom-p-e2"])
        polled = time.monotonic()
        await eventually(
            lambda: asyncio.to_thread(numsub, inspect, "bom-p"),
            lambda n: n["bom-p"] == 0,
            timeout=10,
        )
        assert time.monotonic() - polled >= 1.5 * 0.9
    samples = await scrape(http, g.url)
    assert value(samples, "bomstream_history_reads_total", result="hit") == 1


async def test_1000_boms_are_watched_and_released_with_a_few_batched_commands(
    redis_server: RedisProcess, gateways: list[GatewayProcess], inspect: redis.Redis
) -> None:
    boms = [f"many-{i}" for i in range(1000)]
    timeout = aiohttp.ClientTimeout(total=None, sock_read=60)
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0), timeout=timeout
    ) as http:
        g = await started(gateways, redis_server, http, redis_unsubscribe_grace_s=1.0)
        async with contextlib.AsyncExitStack() as stack:

            async def open_one(bom: str) -> SSEStream:
                resp = await stack.enter_async_context(
                    http.get(f"{g.url}/api/enrichment/stream/{bom}", headers=AUTH)
                )
                assert resp.status == 200, await resp.text()
                s = SSEStream(resp)
                assert (await s.next_event(timeout=30)).event == "connected"  # type: ignore[union-attr]
                return s

            streams = await asyncio.gather(*(open_one(b) for b in boms))
            counts = numsub(inspect, *boms)
            assert set(counts.values()) == {1}, {b: n for b, n in counts.items() if n != 1}
            assert len(channels(inspect)) == 1000
            samples = await scrape(http, g.url)
            assert value(samples, "bomstream_redis_subscribed_channels") == 1000
            assert (
                value(samples, "bomstream_redis_subscription_changes_total", change="subscribe")
                == 1000
            )
            sent = value(
                samples, "bomstream_redis_subscription_commands_total", command="subscribe"
            )
            # Redis's own count agrees with the gateway's.
            assert subscribe_calls(inspect)["subscribe"] == sent
            assert sent <= 200, sent
            # Every BOM is live: one event to a few of them arrives.
            async with AsyncPublisher(redis_server.url) as pub:
                picked = random.sample(range(1000), 5)
                for i in picked:
                    await pub.publish(boms[i], event(boms[i], 1))
                for i in picked:
                    assert (await streams[i].next_event()).id == f"{boms[i]}-e1"  # type: ignore[union-attr]
        # Every stream is closed now.
        await eventually(lambda: asyncio.to_thread(channels, inspect), lambda c: not c, timeout=15)
        assert set(numsub(inspect, *boms).values()) == {0}
        samples = await scrape(http, g.url)
    assert value(samples, "bomstream_redis_subscribed_channels") == 0
    unsent = value(samples, "bomstream_redis_subscription_commands_total", command="unsubscribe")
    assert subscribe_calls(inspect)["unsubscribe"] == unsent
    assert 1 <= unsent <= 200, unsent
    print(f"1000 BOMs: {sent:.0f} SUBSCRIBE and {unsent:.0f} UNSUBSCRIBE commands")
