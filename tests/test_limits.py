"""Stream limits at their boundaries: server.max_connections (503) and
limits.max_streams_per_org (429), both with Retry-After."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter

import aiohttp

from bomstream.server import RunningGateway
from tests.authkit import ADMIN, SECRET, org_token
from tests.conftest import StartGateway

STREAM = "/api/enrichment/stream/"


async def open_raw(
    stack: contextlib.AsyncExitStack,
    http: aiohttp.ClientSession,
    gw: RunningGateway,
    bom_id: str,
    token: str | None = None,
) -> aiohttp.ClientResponse:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    resp = await stack.enter_async_context(http.get(gw.url + STREAM + bom_id, headers=headers))
    if resp.status == 200:
        # Wait for the first bytes: the stream is registered once they are sent.
        assert await resp.content.readline() == b"retry: 3000\n"
    return resp


async def wait_streams(gw: RunningGateway, count: int) -> None:
    hub = gw.gateway.hub
    for _ in range(500):
        if hub.stream_count == count:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{hub.stream_count} streams open, expected {count}")


async def test_max_connections_boundary_503_with_retry_after(
    gateway_factory: StartGateway, http: aiohttp.ClientSession
) -> None:
    gw = await gateway_factory(server__max_connections=3)
    async with contextlib.AsyncExitStack() as stack:
        first = [await open_raw(stack, http, gw, f"bom-{i}") for i in range(3)]
        assert [r.status for r in first] == [200, 200, 200]
        over = await open_raw(stack, http, gw, "bom-x")
        assert over.status == 503
        assert over.headers["Retry-After"].isdigit()
        assert (await over.json())["code"] == "too_many_streams"
        # Polling, publishing and health are not streams and stay available.
        async with http.get(gw.url + "/api/enrichment/events/bom-0") as resp:
            assert resp.status == 200
        first[0].close()
        await wait_streams(gw, 2)
        again = await open_raw(stack, http, gw, "bom-x")
        assert again.status == 200
        assert (await open_raw(stack, http, gw, "bom-y")).status == 503


async def test_max_connections_holds_under_a_concurrent_burst(
    gateway_factory: StartGateway, http: aiohttp.ClientSession
) -> None:
    gw = await gateway_factory(server__max_connections=5)
    async with contextlib.AsyncExitStack() as stack:
        responses = await asyncio.gather(
            *(open_raw(stack, http, gw, f"bom-{i % 3}") for i in range(12))
        )
        statuses = Counter(r.status for r in responses)
        assert statuses == {200: 5, 503: 7}
        assert gw.gateway.hub.stream_count == 5


async def test_max_streams_per_org_boundary_429_with_retry_after(
    gateway_factory: StartGateway, http: aiohttp.ClientSession
) -> None:
    gw = await gateway_factory(
        auth__jwt_secret=SECRET, auth__admin_token=ADMIN, limits__max_streams_per_org=2
    )
    a, b = org_token("org-a"), org_token("org-b")
    async with contextlib.AsyncExitStack() as stack:
        mine = [await open_raw(stack, http, gw, f"bom-{i}", a) for i in range(2)]
        assert [r.status for r in mine] == [200, 200]
        over = await open_raw(stack, http, gw, "bom-9", a)
        assert over.status == 429
        assert over.headers["Retry-After"].isdigit()
        assert (await over.json())["code"] == "org_stream_limit"
        # Other orgs and the admin are not charged to org-a.
        assert (await open_raw(stack, http, gw, "bom-0", b)).status == 200
        assert (await open_raw(stack, http, gw, "bom-0", b)).status == 200
        assert (await open_raw(stack, http, gw, "bom-0", b)).status == 429
        assert (await open_raw(stack, http, gw, "bom-0", ADMIN)).status == 200
        mine[1].close()
        await wait_streams(gw, 4)
        assert (await open_raw(stack, http, gw, "bom-9", a)).status == 200
        assert (await open_raw(stack, http, gw, "bom-9", a)).status == 429


async def test_max_streams_per_org_holds_under_a_concurrent_burst(
    gateway_factory: StartGateway, http: aiohttp.ClientSession
) -> None:
    gw = await gateway_factory(auth__jwt_secret=SECRET, limits__max_streams_per_org=4)
    token = org_token("org-a")
    async with contextlib.AsyncExitStack() as stack:
        responses = await asyncio.gather(
            *(open_raw(stack, http, gw, "bom-a", token) for _ in range(10))
        )
        assert Counter(r.status for r in responses) == {200: 4, 429: 6}


async def test_limits_count_ticket_streams_by_their_org(
    gateway_factory: StartGateway, http: aiohttp.ClientSession
) -> None:
    gw = await gateway_factory(auth__jwt_secret=SECRET, limits__max_streams_per_org=1)
    token = org_token("org-a")
    async with contextlib.AsyncExitStack() as stack:
        assert (await open_raw(stack, http, gw, "bom-a", token)).status == 200
        async with http.post(
            gw.url + "/api/enrichment/tickets",
            json={"bom_id": "bom-a"},
            headers={"Authorization": f"Bearer {token}"},
        ) as resp:
            ticket = (await resp.json())["ticket"]
        resp = await stack.enter_async_context(
            http.get(gw.url + STREAM + "bom-a", params={"ticket": ticket})
        )
        assert resp.status == 429
