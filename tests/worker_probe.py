"""Finding out which worker of ``serve --workers N`` is which, from outside.

The kernel spreads new connections over the workers listening on the shared
port (SO_REUSEPORT hashes each connection's addresses), so health requests
over fresh connections reach every worker sooner or later; each answer says
which worker and pid it came from.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import aiohttp

from tests.conftest import open_stream
from tests.gateway_proc import HEALTH, GatewayProcess
from tests.redis_proc import RedisProcess
from tests.sse import Frame, SSEStream

Health = dict[str, Any]
# Plenty: with two workers, 200 fresh connections all landing on one is a 1 in 2**199 chance.
ATTEMPTS = 200
GRACE_S = 5.0
# A loaded 2-core machine starts a worker in a second or two; this only bounds a hang.
START_S = 30.0


def supervised(redis: RedisProcess, *args: str, **settings: Any) -> GatewayProcess:
    """``serve --workers 2`` on Redis, logging JSON, not started yet."""
    return GatewayProcess(
        "--workers",
        "2",
        "--log-format",
        "json",
        *args,
        redis_url=redis.url,
        redis_backoff_initial_s=0.05,
        redis_backoff_max_s=0.2,
        server_shutdown_grace_s=GRACE_S,
        **settings,
    )


@asynccontextmanager
async def two_workers_running(
    redis: RedisProcess, session: aiohttp.ClientSession, **settings: Any
) -> AsyncIterator[GatewayProcess]:
    """Two workers, both subscribed to Redis; on the way out, SIGTERM, which
    must end the supervisor with status 0 (no worker killed for overstaying)."""
    gw = supervised(redis, **settings)
    try:
        await gw.start(session, timeout=START_S)
        await every_worker_healthy(gw.url, 2)
        yield gw
        gw.stop()
        assert gw.proc is not None
        assert gw.proc.returncode == 0, gw.log_text()[-4000:]
    finally:
        gw.stop()
        gw.close()


def fresh_session() -> aiohttp.ClientSession:
    """A session that opens a new connection for every request."""
    connector = aiohttp.TCPConnector(force_close=True)
    return aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=10))


async def fresh_health(base: str) -> Health:
    """One health answer over a connection of its own."""
    async with fresh_session() as session, session.get(base + HEALTH) as resp:
        body: Health = await resp.json()
        return body


async def health_by_pid(
    base: str,
    count: int,
    accept: Callable[[Health], bool] = lambda h: True,
    *,
    attempts: int = ATTEMPTS,
) -> dict[int, Health]:
    """The latest health answer of each of ``count`` workers, by pid, once every
    one of them has answered with something ``accept`` likes."""
    seen: dict[int, Health] = {}
    for _ in range(attempts):
        try:
            body = await fresh_health(base)
        except aiohttp.ClientError:
            await asyncio.sleep(0.05)
            continue
        seen[body["pid"]] = body
        good = {pid: h for pid, h in seen.items() if accept(h)}
        if len(good) >= count:
            return good
        await asyncio.sleep(0.01)
    raise AssertionError(f"{count} workers did not all answer in {attempts} tries: {seen}")


async def every_worker_healthy(base: str, count: int) -> dict[int, Health]:
    """Wait until every worker's Redis feed is subscribed (a stream on a worker
    that is not would miss what is published meanwhile)."""
    return await health_by_pid(base, count, lambda h: h["status"] == "healthy")


async def streams_on_every_worker(
    stack: AsyncExitStack,
    session: aiohttp.ClientSession,
    base: str,
    bom_id: str,
    workers: int,
    *,
    batch: int = 4,
    most: int = 64,
    token: str | None = None,
) -> tuple[list[SSEStream], dict[int, Health]]:
    """Open streams (each on its own connection) until every worker holds at
    least one; the streams and each worker's health (with its stream count)."""
    streams: list[SSEStream] = []
    while len(streams) < most:
        for _ in range(batch):
            s = await stack.enter_async_context(open_stream(session, base, bom_id, token=token))
            frame = await s.next_event()
            assert frame is not None and frame.event == "connected", frame
            streams.append(s)
        total = len(streams)
        by_pid = await health_by_pid(base, workers)
        # Other answers may predate the last streams: ask until they add up.
        for _ in range(ATTEMPTS):
            if sum(h["streams"] for h in by_pid.values()) == total:
                break
            body = await fresh_health(base)
            by_pid[body["pid"]] = body
        assert sum(h["streams"] for h in by_pid.values()) == total, by_pid
        if all(h["streams"] > 0 for h in by_pid.values()):
            return streams, by_pid
    raise AssertionError(f"{most} streams did not reach all {workers} workers")


CUT = "cut"


async def next_or_cut(stream: SSEStream, timeout: float) -> Frame | str:
    """The next data frame, or ``CUT`` when the connection ends without a clean end
    of the stream (its worker was killed) or with no frame at all."""
    try:
        frame = await stream.next_event(timeout)
    except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError):
        return CUT
    return CUT if frame is None else frame
