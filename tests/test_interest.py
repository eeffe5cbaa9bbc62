"""Interest subscriptions (spec section 10, ``redis.subscribe = "interest"``) on
real gateway processes and a real redis-server: a BOM's channel is subscribed
while someone watches it, catch-up comes from history, and the switch from
"not subscribed" to "subscribed" loses nothing and doubles nothing."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import redis

from bomstream.publisher import AsyncPublisher
from tests.cli_proc import cli_env, run_cli
from tests.conftest import progress
from tests.gateway_proc import GatewayProcess
from tests.metrics_scrape import scrape, value
from tests.redis_proc import RedisProcess
from tests.sse import Frame, SSEStream
from tests.test_startup_refusals import assert_refused
from tests.waiting import eventually

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
            assert sent <= 100, sent
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
    assert 1 <= unsent <= 100, unsent
    print(f"1000 BOMs: {sent:.0f} SUBSCRIBE and {unsent:.0f} UNSUBSCRIBE commands")


# -- the switch from "not subscribed" to "subscribed" ------------------------------


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
