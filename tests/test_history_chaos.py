"""A rolling restart of every instance behind nginx, with shared history:
no client misses or repeats an event, and no reconnect is a gap."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import aiohttp

from bomstream.publisher import Publisher
from tests.conftest import progress
from tests.metrics_scrape import scrape, value
from tests.nginx_stack import Follower, nginx_stack
from tests.redis_proc import RedisProcess
from tests.waiting import eventually

ADMIN = "chaos-suite-admin-token"
EVENTS = 1000
CLIENTS = 50


async def test_both_instances_restarted_mid_run_every_client_gets_every_event_once_in_order(
    redis_server: RedisProcess,
) -> None:
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http,
        nginx_stack(
            redis_server, http, admin=ADMIN, grace_s=5.0, buffer_events_per_bom=2000
        ) as stack,
    ):
        url = f"{stack.url}/api/enrichment/stream/bom-x"
        followers = [Follower(url, ADMIN) for _ in range(CLIENTS)]
        # nginx skips an instance for fail_timeout (5 s) after a failed connect,
        # so while the second restart runs it may answer 502 for a few seconds:
        # a follower retries every 0.1 s, as EventSource does, for up to 8 s.
        tasks = [asyncio.create_task(f.run(http, max_connects=80)) for f in followers]
        try:
            await eventually(lambda: stack.serving(http), lambda c: sum(c) == CLIENTS, timeout=10)
            restarts = {EVENTS // 3: 0, 2 * EVENTS // 3: 1}
            for n in range(1, EVENTS + 1):
                # A worker publishing straight to Redis, paced like a busy job.
                stack.publish("bom-x", progress("bom-x", n, total=EVENTS))
                if n in restarts:
                    # One after the other: the second restart sends its clients
                    # to an instance that started after most of the run.
                    await stack.restart(restarts[n], http)
                elif n % 10 == 0:
                    await asyncio.sleep(0.01)
            stack.publish("bom-x", {"event_id": "bom-x-done", "event_type": "enrichment.completed"})
            await asyncio.wait_for(asyncio.gather(*tasks), 60)
        finally:
            for task in tasks:
                task.cancel()
    expected = [f"bom-x-e{n}" for n in range(1, EVENTS + 1)] + ["bom-x-done"]
    moved = 0
    for f in followers:
        assert [e.id for e in f.events] == expected
        assert f.end_reason == "enrichment.completed"
        assert f.connects[0] is False  # the first connect has nothing to resume
        assert all(f.connects[1:]), f.connects
        moved += len(f.connects) - 1
    # Each restart moved the streams of the instance it stopped.
    assert moved >= CLIENTS, moved


async def test_every_instance_down_while_workers_publish_clients_resume_from_history(
    redis_server: RedisProcess,
) -> None:
    """The case the process buffer cannot cover at all: no instance was running
    while events were published (through bomstream.publisher, which stores them)."""
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http,
        nginx_stack(redis_server, http, admin=ADMIN, grace_s=5.0) as stack,
    ):
        url = f"{stack.url}/api/enrichment/stream/bom-y"
        followers = [Follower(url, ADMIN) for _ in range(20)]
        tasks = [asyncio.create_task(f.run(http, max_connects=200)) for f in followers]
        try:
            await eventually(lambda: stack.serving(http), lambda c: sum(c) == 20, timeout=10)
            with Publisher(redis_server.url) as pub:
                for n in range(1, 51):
                    pub.publish("bom-y", progress("bom-y", n))
                await eventually(_received(followers), lambda counts: min(counts) == 50, timeout=10)
                for g in stack.gateways:
                    g.stop()
                for n in range(51, 201):
                    pub.publish("bom-y", progress("bom-y", n, total=200))
                for g in stack.gateways:
                    g.env["BOMSTREAM_SERVER_PORT"] = str(g.port)
                    await g.start(http)
                pub.publish("bom-y", {"event_id": "bom-y-done", "event_type": "enrichment.failed"})
            await asyncio.wait_for(asyncio.gather(*tasks), 60)
            hits = [
                value(await scrape(http, g.url), "bomstream_history_reads_total", result="hit")
                for g in stack.gateways
            ]
        finally:
            for task in tasks:
                task.cancel()
    expected = [f"bom-y-e{n}" for n in range(1, 201)] + ["bom-y-done"]
    for f in followers:
        assert [e.id for e in f.events] == expected
        assert f.connects[0] is False and all(f.connects[1:]), f.connects
        assert f.end_reason == "enrichment.failed"
    assert sum(hits) >= 1


def _received(followers: list[Follower]) -> Callable[[], Awaitable[list[int]]]:
    async def probe() -> list[int]:
        return [len(f.events) for f in followers]

    return probe
