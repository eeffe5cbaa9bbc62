"""/metrics under ``serve --workers 2``: one scrape of the shared port covers
every worker (real supervisor, workers, redis-server and traffic)."""

from __future__ import annotations

import json
import os
import signal
from contextlib import AsyncExitStack

import aiohttp

from tests.conftest import progress
from tests.gateway_proc import GatewayProcess
from tests.metrics_scrape import Samples, scrape, value
from tests.redis_proc import RedisProcess
from tests.waiting import eventually
from tests.worker_probe import (
    ATTEMPTS,
    START_S,
    every_worker_healthy,
    fresh_health,
    fresh_session,
    streams_on_every_worker,
    two_workers_running,
)

RECEIVED = "bomstream_events_received_total"
DELIVERED = "bomstream_events_delivered_total"
ACTIVE = "bomstream_streams_active"
CONNECTED = "bomstream_redis_connected"
LATENCY_COUNT = "bomstream_publish_to_write_seconds_count"


def scraped_by(gw: GatewayProcess) -> set[int]:
    """The workers that have answered /metrics so far."""
    return {
        line["worker"]
        for line in gw.json_log()
        if line["msg"] == "request" and line.get("path") == "/metrics"
    }


async def scrapes(base: str, times: int) -> list[Samples]:
    """Several scrapes, each over its own connection, so different workers answer."""
    async with fresh_session() as session:
        return [await scrape(session, base) for _ in range(times)]


async def test_one_scrape_of_the_shared_port_adds_up_every_worker(
    redis_server: RedisProcess, http: aiohttp.ClientSession
) -> None:
    async with (
        two_workers_running(redis_server, http, server_access_log="true") as gw,
        AsyncExitStack() as stack,
    ):

        async def metrics() -> Samples:
            return (await scrapes(gw.url, 1))[0]

        m0 = await eventually(metrics, lambda m: value(m, CONNECTED) == 1, timeout=START_S)
        streams, by_pid = await streams_on_every_worker(stack, http, gw.url, "bom-m", 2)
        total = len(streams)
        for n in (1, 2, 3):
            redis_server.publish("enrichment:bom-m", json.dumps(progress("bom-m", n)))
        for s in streams:
            assert [(await s.next_event()).id for _ in range(3)] == [
                "bom-m-e1",
                "bom-m-e2",
                "bom-m-e3",
            ]

        # Whichever worker answers, the totals are the same: both workers' counts.
        # (The access log says which worker answered each scrape.)
        many: list[Samples] = []
        while len(many) < ATTEMPTS and scraped_by(gw) != {0, 1}:
            many += await scrapes(gw.url, 4)
        assert scraped_by(gw) == {0, 1}
        for m in many:
            assert value(m, ACTIVE) == total
            assert value(m, CONNECTED) == 1
            # Each worker holds its own subscription: every event is received twice.
            assert value(m, RECEIVED, source="redis") - value(m0, RECEIVED, source="redis") == 6
            assert value(m, DELIVERED) - value(m0, DELIVERED) == 3 * total
            assert value(m, LATENCY_COUNT) - value(m0, LATENCY_COUNT) == 6
            assert (
                value(m, "bomstream_streams_opened_total", result="ok")
                - value(m0, "bomstream_streams_opened_total", result="ok")
                == total
            )
        m1 = many[-1]

        # A worker dies: its streams leave the gauge, its counts stay in the totals.
        victim_pid, victim = next(iter(by_pid.items()))
        os.kill(victim_pid, signal.SIGKILL)

        async def replaced() -> dict[str, object]:
            return await fresh_health(gw.url)

        await eventually(
            replaced,
            lambda h: h["worker"] == victim["worker"] and h["pid"] != victim_pid,
            timeout=START_S,
        )
        await every_worker_healthy(gw.url, 2)
        left = total - victim["streams"]
        m2 = await eventually(
            metrics, lambda m: value(m, ACTIVE) == left and value(m, CONNECTED) == 1
        )
        assert value(m2, RECEIVED, source="redis") == value(m1, RECEIVED, source="redis")
        assert value(m2, DELIVERED) == value(m1, DELIVERED)

        # The replacement counts too: one more event, received by both live workers.
        redis_server.publish("enrichment:bom-m", json.dumps(progress("bom-m", 4)))

        await eventually(
            metrics,
            lambda m: (
                value(m, DELIVERED) - value(m1, DELIVERED) == left
                and value(m, RECEIVED, source="redis") - value(m1, RECEIVED, source="redis") == 2
            ),
        )
