"""A multi-BOM stream resumes after its gateway restarts, from Redis history's
sequence: every BOM's missed events exactly once, in order, ``resumed: true``."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import redis

from bomstream.history.redis_scripts import sequence_key, stream_key
from bomstream.publisher import Publisher
from tests.authkit import ADMIN, SECRET, org_token
from tests.conftest import progress
from tests.gateway_proc import GatewayProcess
from tests.multi_kit import by_bom, connected, nothing_more, open_multi, read_events
from tests.redis_proc import RedisProcess
from tests.waiting import eventually

BOMS = [f"bom-{i}" for i in range(5)]
PREFIX = "enrichment-history:"


def direct(redis_server: RedisProcess, bom_id: str, n: int) -> None:
    """A worker publishing straight to the channel: the gateway stores it."""
    redis_server.publish(f"enrichment:{bom_id}", json.dumps(progress(bom_id, n)))


def stored(redis_server: RedisProcess) -> int:
    client = redis.Redis.from_url(redis_server.url)
    try:
        return sum(int(client.xlen(stream_key(PREFIX, b))) for b in BOMS)
    finally:
        client.close()


async def test_a_restarted_gateway_resumes_every_bom_from_history(
    redis_server: RedisProcess, gateways: list[GatewayProcess]
) -> None:
    gw = GatewayProcess(redis_url=redis_server.url, server_shutdown_grace_s=2)
    gateways.append(gw)
    async with aiohttp.ClientSession() as http:
        await gw.start(http)
        async with open_multi(http, gw.url, BOMS) as s:
            await connected(s)
            for n in range(1, 5):
                for b in BOMS:
                    direct(redis_server, b, n)
            seen = await read_events(s, 20)
        last_id = seen[-1].id
        # Missed while disconnected, stored by the running gateway's writer...
        for n in range(5, 8):
            for b in BOMS:
                direct(redis_server, b, n)
        await eventually(lambda: asyncio.to_thread(stored, redis_server), lambda c: c == 35)
        gw.stop()
        # ...and while it is down, stored by workers publishing through history.
        with Publisher(redis_server.url) as pub:
            for n in range(8, 10):
                for b in BOMS:
                    pub.publish(b, progress(b, n))
        gw.env["BOMSTREAM_SERVER_PORT"] = str(gw.port)
        await gw.start(http)
        async with open_multi(http, gw.url, BOMS, last_event_id=last_id) as s:
            hello = await connected(s)
            assert hello["resumed"] is True and hello["gaps"] == []
            missed = await read_events(s, 25)
            assert by_bom(missed) == {b: [f"{b}-e{n}" for n in range(5, 10)] for b in BOMS}
            await nothing_more(s)
            direct(redis_server, BOMS[2], 10)
            (live,) = await read_events(s, 1)
            assert json.loads(live.data)["event_id"] == f"{BOMS[2]}-e10"
        # Resuming from the newest catch-up event is exact as well.
        async with open_multi(http, gw.url, BOMS, last_event_id=missed[-1].id) as s:
            hello = await connected(s)
            assert hello["resumed"] is True
            assert by_bom(await read_events(s, 1)) == {BOMS[2]: [f"{BOMS[2]}-e10"]}
            await nothing_more(s)
    # One sequence for every BOM, taken once per event: nine of each, and e10.
    await eventually(lambda: asyncio.to_thread(sequence, redis_server), lambda n: n == 46)


def sequence(redis_server: RedisProcess) -> int:
    client = redis.Redis.from_url(redis_server.url)
    try:
        return int(client.get(sequence_key(PREFIX)) or 0)
    finally:
        client.close()


async def test_an_org_stream_on_a_fresh_gateway_finds_the_orgs_boms_in_history(
    redis_server: RedisProcess, gateways: list[GatewayProcess]
) -> None:
    with Publisher(redis_server.url) as pub:
        for i in range(3):
            for org in ("org-a", "org-b"):
                bom = f"{org}-bom-{i}"
                for n in range(1, 3):
                    pub.publish(bom, progress(bom, n, organization_id=org))
    # Started after every event: it holds nothing until a stream asks.
    gw = GatewayProcess(redis_url=redis_server.url, auth_jwt_secret=SECRET, auth_admin_token=ADMIN)
    gateways.append(gw)
    async with aiohttp.ClientSession() as http:
        await gw.start(http)
        async with open_multi(http, gw.url, None, token=org_token("org-a")) as s:
            await connected(s)
            snaps = by_bom(await read_events(s, 3))
            assert snaps == {f"org-a-bom-{i}": [f"org-a-bom-{i}-e2"] for i in range(3)}
            await nothing_more(s, 0.3)
        async with open_multi(http, gw.url, None, token=ADMIN) as s:
            await connected(s)
            assert len(by_bom(await read_events(s, 6))) == 6
