"""Fan-out under reconnects, many clients, and a client that stops reading."""

from __future__ import annotations

import asyncio
import json
import random
import socket

import aiohttp
import redis.asyncio as aioredis

from bomstream.server import RunningGateway
from tests.conftest import StartGateway, open_stream, progress, publish
from tests.gateway_proc import GatewayProcess
from tests.redis_proc import RedisProcess
from tests.sse import SSEStream

CHURN_EVENTS = 1000
CHURN_CLIENTS = 20


async def churn_client(
    http: aiohttp.ClientSession, url: str, bom_id: str, rng: random.Random, ready: asyncio.Event
) -> tuple[list[str], int]:
    """Reads the stream, hanging up at random moments and resuming with Last-Event-ID,
    as a browser does. Returns every event id received and how many reconnects it made."""
    received: list[str] = []
    last_id: str | None = None
    reconnects = 0
    while True:
        headers = {"Last-Event-ID": last_id} if last_id else {}
        async with http.get(f"{url}/api/enrichment/stream/{bom_id}", headers=headers) as resp:
            if resp.status == 204:
                return received, reconnects
            assert resp.status == 200
            s = SSEStream(resp)
            ready.set()
            hang_up_after = rng.randint(1, 150)
            taken = 0
            while True:
                frame = await s.next_event(timeout=20)
                if frame is None:
                    break
                if frame.event == "stream_end":
                    return received, reconnects
                if frame.event == "connected":
                    assert frame.json()["resumed"] is (last_id is not None)
                    continue
                assert frame.id is not None
                received.append(frame.id)
                last_id = frame.id
                taken += 1
                if taken >= hang_up_after:
                    break  # leaving the block closes the connection mid-stream
        reconnects += 1
        await asyncio.sleep(rng.uniform(0, 0.03))


async def test_churn_every_client_gets_every_event_exactly_once_in_order(
    gateway_factory: StartGateway, redis_server: RedisProcess, http: aiohttp.ClientSession
) -> None:
    gw = await gateway_factory(redis__url=redis_server.url)
    connector = aiohttp.TCPConnector(limit=0)
    rng = random.Random(20261122)
    async with aiohttp.ClientSession(connector=connector) as session:
        for _ in range(200):
            async with session.get(f"{gw.url}/api/enrichment/health") as resp:
                if resp.status == 200:
                    break
            await asyncio.sleep(0.05)
        readies = [asyncio.Event() for _ in range(CHURN_CLIENTS)]
        clients = [
            asyncio.create_task(
                churn_client(session, gw.url, "bom-churn", random.Random(rng.random()), r)
            )
            for r in readies
        ]
        await asyncio.wait_for(asyncio.gather(*(r.wait() for r in readies)), 10)

        publisher = aioredis.Redis.from_url(redis_server.url)
        expected = []
        try:
            for n in range(1, CHURN_EVENTS + 1):
                kind = "enrichment.completed" if n == CHURN_EVENTS else "enrichment.progress"
                event = progress("bom-churn", n, total=CHURN_EVENTS, event_type=kind)
                expected.append(event["event_id"])
                await publisher.publish("enrichment:bom-churn", json.dumps(event))
                if n % 20 == 0:
                    await asyncio.sleep(0.01)
        finally:
            await publisher.aclose()
        results = await asyncio.wait_for(asyncio.gather(*clients), 60)

    total_reconnects = 0
    for received, reconnects in results:
        assert received == expected
        total_reconnects += reconnects
    # The churn really happened: on average a client hung up several times.
    assert total_reconnects >= CHURN_CLIENTS * 3


async def test_two_hundred_clients_on_one_bom_all_receive_every_event(
    gateway: RunningGateway,
) -> None:
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        streams = []
        responses = []
        for _ in range(200):
            resp = await session.get(f"{gateway.url}/api/enrichment/stream/bom-many")
            assert resp.status == 200
            responses.append(resp)
            s = SSEStream(resp)
            assert (await s.next_event()).event == "connected"
            streams.append(s)
        try:
            expected = []
            for n in range(1, 51):
                reply = await publish(session, gateway.url, "bom-many", progress("bom-many", n))
                expected.append(reply["event_id"])

            async def read_all(s: SSEStream) -> list[str]:
                return [(await s.next_event()).id or "" for _ in expected]

            got = await asyncio.wait_for(asyncio.gather(*(read_all(s) for s in streams)), 60)
            assert all(ids == expected for ids in got)
        finally:
            for resp in responses:
                resp.close()


def open_stalled_stream(port: int, bom_id: str) -> socket.socket:
    """A client that sends its request and then never reads a byte."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.sendall(f"GET /api/enrichment/stream/{bom_id} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    return sock


async def test_slow_consumer_is_cut_and_memory_stays_bounded_while_others_get_everything(
    http: aiohttp.ClientSession,
) -> None:
    gw = GatewayProcess(
        env={
            "BOMSTREAM_SERVER_SEND_QUEUE_BYTES": str(256 * 1024),
            "BOMSTREAM_BUFFER_EVENTS_PER_BOM": "50",
            "BOMSTREAM_SERVER_ACCESS_LOG": "false",
        }
    )
    gw.start_sync()
    try:
        pad = "x" * 30_000
        async with open_stream(http, gw.url, "bom-slow") as normal:
            await normal.next_event()
            stalled = open_stalled_stream(gw.port, "bom-slow")
            for _ in range(100):
                if (
                    '"streams":2'
                    in await (await http.get(f"{gw.url}/api/enrichment/health")).text()
                ):
                    break
                await asyncio.sleep(0.02)
            # Warm up allocator pools so the baseline is not the cold process.
            for n in range(1, 101):
                await publish(http, gw.url, "bom-slow", progress("bom-slow", n, pad=pad))
                assert (await normal.next_event()).id == f"bom-slow-e{n}"
            baseline = gw.rss_bytes()

            published = 0
            for n in range(101, 1501):  # about 42 MB of events
                await publish(http, gw.url, "bom-slow", progress("bom-slow", n, pad=pad))
                published += 30_000
                assert (await normal.next_event()).id == f"bom-slow-e{n}"
            growth = gw.rss_bytes() - baseline

        async with http.get(f"{gw.url}/metrics") as resp:
            metrics = await resp.text()
        assert "bomstream_slow_consumer_disconnects_total 1.0" in metrics
        # Holding the stalled client's backlog would have cost ~40 MB.
        assert published > 40_000_000
        assert growth < 12 * 1024 * 1024, f"RSS grew by {growth} bytes"
        stalled.close()
    finally:
        gw.stop()
