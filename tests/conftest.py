from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest
import uvloop

from bomstream.config_load import load_config
from bomstream.server import RunningGateway, start
from tests.gateway_proc import GatewayProcess
from tests.pg_proc import PgTemplate, PostgresProcess
from tests.redis_proc import RedisProcess
from tests.sse import SSEStream

StartGateway = Callable[..., Awaitable[RunningGateway]]


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    """Tests run on uvloop, the loop the gateway runs on in production."""
    return {"uvloop": uvloop.new_event_loop}


@pytest.fixture
def redis_server() -> Iterator[RedisProcess]:
    proc = RedisProcess()
    proc.start()
    try:
        yield proc
    finally:
        proc.close()


@pytest.fixture(scope="session")
def pg_template() -> Iterator[PgTemplate]:
    """initdb once per session (seconds); every server is a copy of this."""
    template = PgTemplate()
    try:
        yield template
    finally:
        template.close()


@pytest.fixture
def postgres_server(pg_template: PgTemplate) -> Iterator[PostgresProcess]:
    """A running PostgreSQL of this test's own, started from a copy of the template."""
    proc = PostgresProcess(pg_template)
    proc.start()
    try:
        yield proc
    finally:
        proc.close()


def gateway_config(**overrides: Any) -> Any:
    """Config for a test gateway: free port, no access log noise, fast heartbeats."""
    values: dict[str, Any] = {"server.port": 0, "server.access_log": False}
    values.update({k.replace("__", "."): v for k, v in overrides.items()})
    return load_config(path=None, env={}, overrides=values, default_file=False)


@pytest.fixture
async def gateway_factory() -> AsyncIterator[StartGateway]:
    """Starts real listening gateways (``server__heartbeat_s=1`` style overrides)."""
    running: list[RunningGateway] = []

    async def _start(**overrides: Any) -> RunningGateway:
        gw = await start(gateway_config(**overrides))
        running.append(gw)
        return gw

    yield _start
    for gw in reversed(running):
        await gw.stop()


@pytest.fixture
async def gateway(gateway_factory: StartGateway) -> RunningGateway:
    return await gateway_factory()


@pytest.fixture
def gateways() -> Iterator[list[GatewayProcess]]:
    """Gateway processes a test starts; each is killed and cleaned up after it."""
    made: list[GatewayProcess] = []
    yield made
    for g in made:
        g.close()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_read=30)) as s:
        yield s


@asynccontextmanager
async def open_stream(
    session: aiohttp.ClientSession,
    base: str,
    bom_id: str,
    *,
    last_event_id: str | None = None,
    token: str | None = None,
    expect: int = 200,
) -> AsyncIterator[SSEStream]:
    headers = {}
    if last_event_id is not None:
        headers["Last-Event-ID"] = last_event_id
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    async with session.get(f"{base}/api/enrichment/stream/{bom_id}", headers=headers) as resp:
        assert resp.status == expect, await resp.text()
        yield SSEStream(resp)


async def publish(
    session: aiohttp.ClientSession,
    base: str,
    bom_id: str,
    event: dict[str, Any] | bytes,
    *,
    token: str | None = None,
    expect: int = 202,
) -> Any:
    body = event if isinstance(event, bytes) else json.dumps(event).encode()
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    async with session.post(
        f"{base}/api/enrichment/events/{bom_id}", data=body, headers=headers
    ) as resp:
        payload = await resp.json()
        assert resp.status == expect, payload
        return payload


def progress(bom_id: str, n: int, total: int = 100, **extra: Any) -> dict[str, Any]:
    """A seed-shaped progress event numbered ``n``."""
    event = {
        "event_id": f"{bom_id}-e{n}",
        "event_type": "enrichment.progress",
        "bom_id": bom_id,
        "state": {
            "status": "enriching",
            "total_items": total,
            "enriched_items": n,
            "failed_items": 0,
            "pending_items": total - n,
            "percent_complete": round(100 * n / total, 1),
        },
        "payload": {"n": n},
    }
    event.update(extra)
    return event
