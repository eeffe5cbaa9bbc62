"""Single-use stream tickets: ``POST /api/enrichment/tickets`` then ``?ticket=``."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp

from bomstream.principal import ADMIN as ADMIN_PRINCIPAL
from bomstream.server import RunningGateway
from bomstream.tickets import Grant, MemoryTicketStore
from tests.authkit import ADMIN, SECRET, claims, hs256, org_token
from tests.conftest import StartGateway, progress, publish
from tests.redis_proc import RedisProcess, free_port
from tests.sse import SSEStream
from tests.test_redis_feed import wait_health

TICKETS = "/api/enrichment/tickets"


async def get_ticket(
    http: aiohttp.ClientSession, gw: RunningGateway, bom_id: str, token: str, expect: int = 201
) -> Any:
    async with http.post(
        gw.url + TICKETS, json={"bom_id": bom_id}, headers={"Authorization": f"Bearer {token}"}
    ) as resp:
        body = await resp.json()
        assert resp.status == expect, body
        if expect == 201:
            assert resp.headers["Cache-Control"] == "no-store"
        return body


def stream_url(gw: RunningGateway, bom_id: str, ticket: str) -> str:
    return f"{gw.url}/api/enrichment/stream/{bom_id}?ticket={ticket}"


async def auth_gateway(gateway_factory: StartGateway, **extra: Any) -> RunningGateway:
    return await gateway_factory(auth__jwt_secret=SECRET, auth__admin_token=ADMIN, **extra)


async def test_ticket_opens_one_stream_scoped_like_its_token(
    gateway_factory: StartGateway, http: aiohttp.ClientSession
) -> None:
    gw = await auth_gateway(gateway_factory)
    await publish(http, gw.url, "bom-a", progress("bom-a", 1, organization_id="org-a"), token=ADMIN)
    body = await get_ticket(http, gw, "bom-a", org_token("org-a"))
    assert body["bom_id"] == "bom-a"
    assert body["expires_in"] == 60
    ticket = body["ticket"]
    assert len(ticket) >= 40
    async with http.get(stream_url(gw, "bom-a", ticket)) as resp:
        assert resp.status == 200
        s = SSEStream(resp)
        assert (await s.next_event()).event == "connected"
        assert (await s.next_event()).id == "bom-a-e1"
        await publish(http, gw.url, "bom-a", progress("bom-a", 2), token=ADMIN)  # no org
        await publish(
            http, gw.url, "bom-a", progress("bom-a", 3, organization_id="org-a"), token=ADMIN
        )
        assert (await s.next_event()).id == "bom-a-e3"
    # Single use: the same ticket again, on the stream or the poll endpoint.
    async with http.get(stream_url(gw, "bom-a", ticket)) as resp:
        assert resp.status == 401
        assert (await resp.json())["code"] == "unauthorized"
    async with http.get(f"{gw.url}/api/enrichment/events/bom-a?ticket={ticket}") as resp:
        assert resp.status == 401


async def test_ticket_works_for_polling_once(
    gateway_factory: StartGateway, http: aiohttp.ClientSession
) -> None:
    gw = await auth_gateway(gateway_factory)
    await publish(http, gw.url, "bom-a", progress("bom-a", 1, organization_id="org-a"), token=ADMIN)
    ticket = (await get_ticket(http, gw, "bom-a", org_token("org-a")))["ticket"]
    poll = f"{gw.url}/api/enrichment/events/bom-a?ticket={ticket}"
    async with http.get(poll) as resp:
        assert resp.status == 200
        assert [e["event_id"] for e in (await resp.json())["events"]] == ["bom-a-e1"]
    async with http.get(poll) as resp:
        assert resp.status == 401


async def test_ticket_for_another_bom_is_401_and_spent(
    gateway_factory: StartGateway, http: aiohttp.ClientSession
) -> None:
    gw = await auth_gateway(gateway_factory)
    ticket = (await get_ticket(http, gw, "bom-a", org_token("org-a")))["ticket"]
    async with http.get(stream_url(gw, "bom-b", ticket)) as resp:
        assert resp.status == 401
    async with http.get(stream_url(gw, "bom-a", ticket)) as resp:
        assert resp.status == 401


async def test_expired_or_made_up_ticket_is_401(
    gateway_factory: StartGateway, http: aiohttp.ClientSession
) -> None:
    gw = await auth_gateway(gateway_factory, auth__ticket_ttl_s=0.2)
    ticket = (await get_ticket(http, gw, "bom-a", org_token("org-a")))["ticket"]
    await asyncio.sleep(0.3)  # the ticket's lifetime is the thing under test
    async with http.get(stream_url(gw, "bom-a", ticket)) as resp:
        assert resp.status == 401
    for made_up in ("x", "A" * 43, ""):
        async with http.get(stream_url(gw, "bom-a", made_up)) as resp:
            assert resp.status == 401, made_up
    async with http.get(gw.url + "/metrics") as resp:
        assert 'bomstream_auth_failures_total{reason="ticket"}' in await resp.text()


async def test_ticket_endpoint_wants_the_token_in_the_header(
    gateway_factory: StartGateway, http: aiohttp.ClientSession
) -> None:
    gw = await auth_gateway(gateway_factory)
    token = org_token("org-a")
    async with http.post(gw.url + TICKETS, params={"token": token}, json={"bom_id": "b"}) as resp:
        assert resp.status == 401
    for body in (b"", b"not json", b"[]", b'{"bom_id": "-bad"}', b'{"bom_id": 7}'):
        async with http.post(
            gw.url + TICKETS, data=body, headers={"Authorization": f"Bearer {token}"}
        ) as resp:
            assert resp.status == 400, body
    async with http.post(
        gw.url + TICKETS,
        data=b'{"bom_id": "' + b"a" * 40_000 + b'"}',
        headers={"Authorization": f"Bearer {token}"},
    ) as resp:
        assert resp.status == 413
    await get_ticket(http, gw, "bom-a", hs256(claims(None)), expect=403)
    await get_ticket(http, gw, "bom-a", "garbage", expect=401)


async def test_ticket_stream_still_ends_when_the_issuing_token_expires(
    gateway_factory: StartGateway, http: aiohttp.ClientSession
) -> None:
    gw = await auth_gateway(gateway_factory, auth__leeway_s=0)
    token = hs256(claims("org-a", ttl=3))
    ticket = (await get_ticket(http, gw, "bom-a", token))["ticket"]
    async with http.get(stream_url(gw, "bom-a", ticket)) as resp:
        frames = await SSEStream(resp).events_until_end(timeout=10)
    assert [f.event for f in frames] == ["connected", "stream_end"]
    assert frames[-1].json()["reason"] == "token_expired"


async def test_admin_ticket_sees_every_org(
    gateway_factory: StartGateway, http: aiohttp.ClientSession
) -> None:
    gw = await auth_gateway(gateway_factory)
    await publish(http, gw.url, "bom-a", progress("bom-a", 1, organization_id="org-z"), token=ADMIN)
    ticket = (await get_ticket(http, gw, "bom-a", ADMIN))["ticket"]
    async with http.get(stream_url(gw, "bom-a", ticket)) as resp:
        s = SSEStream(resp)
        await s.next_event()
        assert (await s.next_event()).id == "bom-a-e1"


async def test_with_redis_a_ticket_from_one_instance_is_redeemed_once_at_any(
    gateway_factory: StartGateway, redis_server: RedisProcess, http: aiohttp.ClientSession
) -> None:
    a = await auth_gateway(gateway_factory, redis__url=redis_server.url)
    b = await auth_gateway(gateway_factory, redis__url=redis_server.url)
    await wait_health(http, a, 200)
    await wait_health(http, b, 200)
    ticket = (await get_ticket(http, a, "bom-a", org_token("org-a")))["ticket"]
    async with http.get(stream_url(b, "bom-a", ticket)) as resp:
        assert resp.status == 200
        assert (await SSEStream(resp).next_event()).event == "connected"
    for gw in (a, b):
        async with http.get(stream_url(gw, "bom-a", ticket)) as resp:
            assert resp.status == 401


async def test_memory_store_forgets_expired_tickets() -> None:
    store = MemoryTicketStore(ttl_s=0.05)
    for _ in range(100):
        await store.issue(Grant.one("bom-a"), ADMIN_PRINCIPAL)
    assert len(store) == 100
    await asyncio.sleep(0.1)
    await store.issue(Grant.one("bom-a"), ADMIN_PRINCIPAL)
    assert len(store) == 1


async def test_with_redis_down_tickets_get_503_with_retry_after(
    gateway_factory: StartGateway, http: aiohttp.ClientSession
) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    gw = await auth_gateway(gateway_factory, redis__url=dead)
    async with http.post(
        gw.url + TICKETS, json={"bom_id": "bom-a"}, headers={"Authorization": f"Bearer {ADMIN}"}
    ) as resp:
        assert resp.status == 503
        assert resp.headers["Retry-After"].isdigit()
        assert (await resp.json())["code"] == "ticket_store_unavailable"
    async with http.get(f"{gw.url}/api/enrichment/events/bom-a?ticket=whatever") as resp:
        assert resp.status == 503
