"""Org scoping and token expiry (spec section 5), with events coming in through a
real Redis exactly as workers publish them."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp

from bomstream.server import RunningGateway
from tests.authkit import ADMIN, SECRET, claims, hs256, org_token
from tests.conftest import StartGateway, open_stream, progress
from tests.redis_proc import RedisProcess
from tests.test_redis_feed import wait_health


async def redis_gateway(
    gateway_factory: StartGateway, redis_server: RedisProcess, **extra: Any
) -> RunningGateway:
    gw = await gateway_factory(
        redis__url=redis_server.url, auth__jwt_secret=SECRET, auth__admin_token=ADMIN, **extra
    )
    async with aiohttp.ClientSession() as http:
        # Subscribed before any worker publishes: pub/sub keeps nothing for later.
        await wait_health(http, gw, 200)
    return gw


def worker_publish(redis_server: RedisProcess, bom_id: str, event: dict[str, Any]) -> None:
    redis_server.publish(f"enrichment:{bom_id}", json.dumps(event))


async def poll(
    http: aiohttp.ClientSession, gw: RunningGateway, bom_id: str, token: str
) -> tuple[int, Any]:
    async with http.get(
        f"{gw.url}/api/enrichment/events/{bom_id}", headers={"Authorization": f"Bearer {token}"}
    ) as resp:
        return resp.status, await resp.json()


async def wait_held(gw: RunningGateway, bom_id: str, count: int) -> None:
    """Wait until the gateway holds ``count`` events of a BOM (Redis is asynchronous)."""
    hub = gw.gateway.hub
    for _ in range(500):
        if len(hub.held(bom_id)) >= count:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{bom_id}: {len(hub.held(bom_id))} events held, wanted {count}")


async def test_jwt_stream_receives_only_its_orgs_events_and_admin_sees_all(
    gateway_factory: StartGateway, redis_server: RedisProcess, http: aiohttp.ClientSession
) -> None:
    gw = await redis_gateway(gateway_factory, redis_server)
    async with (
        open_stream(http, gw.url, "bom-a", token=org_token("org-a")) as mine,
        open_stream(http, gw.url, "bom-a", token=ADMIN) as admin,
    ):
        assert (await mine.next_event()).event == "connected"
        assert (await admin.next_event()).event == "connected"
        worker_publish(redis_server, "bom-a", progress("bom-a", 1, organization_id="org-a"))
        worker_publish(redis_server, "bom-a", progress("bom-a", 2))  # no org: admin only
        worker_publish(redis_server, "bom-a", progress("bom-a", 3, organization_id="org-a"))
        worker_publish(
            redis_server,
            "bom-a",
            {"event_id": "end", "event_type": "enrichment.completed", "organization_id": "org-a"},
        )
        mine_frames = await mine.events_until_end()
        admin_frames = await admin.events_until_end()
    assert [f.id for f in mine_frames] == ["bom-a-e1", "bom-a-e3", "end", None]
    assert [f.id for f in admin_frames] == ["bom-a-e1", "bom-a-e2", "bom-a-e3", "end", None]
    assert mine_frames[-1].json() == {"type": "stream_end", "reason": "enrichment.completed"}
    assert all(f.json().get("organization_id") in ("org-a", None) for f in mine_frames)


async def test_another_orgs_bom_is_403_on_stream_poll_and_ticket(
    gateway_factory: StartGateway, redis_server: RedisProcess, http: aiohttp.ClientSession
) -> None:
    gw = await redis_gateway(gateway_factory, redis_server)
    worker_publish(redis_server, "bom-b", progress("bom-b", 1, organization_id="org-b"))
    await wait_held(gw, "bom-b", 1)
    intruder = org_token("org-a")
    async with open_stream(http, gw.url, "bom-b", token=intruder, expect=403) as s:
        assert (await s.resp.json())["code"] == "forbidden"
    status, body = await poll(http, gw, "bom-b", intruder)
    assert (status, body["code"]) == (403, "forbidden")
    async with http.post(
        f"{gw.url}/api/enrichment/tickets",
        json={"bom_id": "bom-b"},
        headers={"Authorization": f"Bearer {intruder}"},
    ) as resp:
        assert resp.status == 403
    status, body = await poll(http, gw, "bom-b", org_token("org-b"))
    assert status == 200
    assert [e["event_id"] for e in body["events"]] == ["bom-b-e1"]


async def test_poll_shows_only_the_callers_org(
    gateway_factory: StartGateway, redis_server: RedisProcess, http: aiohttp.ClientSession
) -> None:
    gw = await redis_gateway(gateway_factory, redis_server)
    worker_publish(redis_server, "bom-a", progress("bom-a", 1, organization_id="org-a"))
    worker_publish(redis_server, "bom-a", progress("bom-a", 2))
    await wait_held(gw, "bom-a", 2)
    status, body = await poll(http, gw, "bom-a", org_token("org-a"))
    assert status == 200
    assert [e["event_id"] for e in body["events"]] == ["bom-a-e1"]
    assert body["state"]["enriched_items"] == 1
    status, body = await poll(http, gw, "bom-a", ADMIN)
    assert [e["event_id"] for e in body["events"]] == ["bom-a-e1", "bom-a-e2"]


async def test_open_stream_ends_forbidden_when_its_bom_turns_out_to_be_another_orgs(
    gateway_factory: StartGateway, redis_server: RedisProcess, http: aiohttp.ClientSession
) -> None:
    gw = await redis_gateway(gateway_factory, redis_server)
    async with (
        open_stream(http, gw.url, "bom-x", token=org_token("org-a")) as early,
        open_stream(http, gw.url, "bom-x", token=org_token("org-b")) as owner,
    ):
        await early.next_event()
        await owner.next_event()
        worker_publish(redis_server, "bom-x", progress("bom-x", 1, organization_id="org-b"))
        frames = await early.events_until_end()
        assert [f.event for f in frames] == ["stream_end"]
        assert frames[0].json() == {"type": "stream_end", "reason": "forbidden"}
        assert (await owner.next_event()).id == "bom-x-e1"


async def test_jwt_stream_ends_on_a_terminal_event_it_may_not_see(
    gateway_factory: StartGateway, redis_server: RedisProcess, http: aiohttp.ClientSession
) -> None:
    gw = await redis_gateway(gateway_factory, redis_server)
    async with open_stream(http, gw.url, "bom-a", token=org_token("org-a")) as s:
        await s.next_event()
        worker_publish(redis_server, "bom-a", progress("bom-a", 1, organization_id="org-a"))
        worker_publish(redis_server, "bom-a", {"event_id": "f", "event_type": "enrichment.failed"})
        frames = await s.events_until_end()
    assert [f.event for f in frames] == ["enrichment.progress", "stream_end"]
    assert frames[-1].json()["reason"] == "enrichment.failed"


async def test_jwt_stream_ends_with_token_expired_when_exp_passes(
    gateway_factory: StartGateway, redis_server: RedisProcess, http: aiohttp.ClientSession
) -> None:
    gw = await redis_gateway(gateway_factory, redis_server, auth__leeway_s=0)
    token = hs256(claims("org-a", ttl=3))
    async with open_stream(http, gw.url, "bom-a", token=token) as s:
        await s.next_event()
        worker_publish(redis_server, "bom-a", progress("bom-a", 1, organization_id="org-a"))
        frames = await s.events_until_end(timeout=10)
    assert [f.event for f in frames] == ["enrichment.progress", "stream_end"]
    assert frames[-1].json() == {"type": "stream_end", "reason": "token_expired"}
    # EventSource reconnects with the same URL; the expired token is turned away.
    async with open_stream(http, gw.url, "bom-a", token=token, expect=401):
        pass


async def test_admin_stream_has_no_expiry(
    gateway_factory: StartGateway, redis_server: RedisProcess, http: aiohttp.ClientSession
) -> None:
    gw = await redis_gateway(gateway_factory, redis_server, server__heartbeat_s=0.2)
    async with open_stream(http, gw.url, "bom-a", token=ADMIN) as s:
        await s.next_event()
        hub = gw.gateway.hub
        assert hub.stream_count == 1
        # Several heartbeats in, the stream is still open and not ended.
        for _ in range(3):
            frame = await s.next(timeout=5)
            assert frame is not None and frame.comments == ["keepalive"]


async def test_late_jwt_joiner_after_a_terminal_event_it_may_not_see_gets_stream_end(
    gateway_factory: StartGateway, redis_server: RedisProcess, http: aiohttp.ClientSession
) -> None:
    gw = await redis_gateway(gateway_factory, redis_server)
    worker_publish(redis_server, "bom-a", progress("bom-a", 1, organization_id="org-a"))
    worker_publish(redis_server, "bom-a", {"event_id": "f", "event_type": "enrichment.failed"})
    await wait_held(gw, "bom-a", 2)
    token = org_token("org-a")
    async with open_stream(http, gw.url, "bom-a", token=token) as s:
        frames = await s.events_until_end()
    assert [f.event for f in frames] == ["connected", "enrichment.progress", "stream_end"]
    assert frames[-1].json()["reason"] == "enrichment.failed"
    # Holding the last event it may see of a finished run: nothing more will come.
    async with open_stream(
        http, gw.url, "bom-a", token=token, last_event_id="bom-a-e1", expect=204
    ):
        pass


async def test_jwt_reconnect_after_invisible_events_and_terminal_gets_stream_end(
    gateway_factory: StartGateway, redis_server: RedisProcess, http: aiohttp.ClientSession
) -> None:
    gw = await redis_gateway(gateway_factory, redis_server)
    worker_publish(redis_server, "bom-a", progress("bom-a", 1, organization_id="org-a"))
    worker_publish(redis_server, "bom-a", progress("bom-a", 2, organization_id="org-a"))
    worker_publish(redis_server, "bom-a", progress("bom-a", 3))
    worker_publish(redis_server, "bom-a", {"event_id": "f", "event_type": "enrichment.failed"})
    await wait_held(gw, "bom-a", 4)
    async with open_stream(
        http, gw.url, "bom-a", token=org_token("org-a"), last_event_id="bom-a-e1"
    ) as s:
        frames = await s.events_until_end()
    assert [f.id for f in frames] == [None, "bom-a-e2", None]
    assert frames[0].json()["resumed"] is True
    assert frames[-1].json() == {"type": "stream_end", "reason": "enrichment.failed"}


async def test_jwt_reconnect_across_an_invisible_terminal_into_a_new_run_stays_open(
    gateway_factory: StartGateway, redis_server: RedisProcess, http: aiohttp.ClientSession
) -> None:
    gw = await redis_gateway(gateway_factory, redis_server)
    worker_publish(redis_server, "bom-a", progress("bom-a", 1, organization_id="org-a"))
    worker_publish(redis_server, "bom-a", {"event_id": "f", "event_type": "enrichment.failed"})
    started = {"event_id": "run2", "event_type": "enrichment.started", "organization_id": "org-a"}
    worker_publish(redis_server, "bom-a", started)
    await wait_held(gw, "bom-a", 3)
    async with open_stream(
        http, gw.url, "bom-a", token=org_token("org-a"), last_event_id="bom-a-e1"
    ) as s:
        assert (await s.next_event()).json()["resumed"] is True
        assert (await s.next_event()).id == "run2"
        worker_publish(redis_server, "bom-a", progress("bom-a", 2, organization_id="org-a"))
        assert (await s.next_event()).id == "bom-a-e2"


async def test_poll_reports_terminal_when_the_run_ended_with_an_event_it_may_not_see(
    gateway_factory: StartGateway, redis_server: RedisProcess, http: aiohttp.ClientSession
) -> None:
    gw = await redis_gateway(gateway_factory, redis_server)
    worker_publish(redis_server, "bom-a", progress("bom-a", 1, organization_id="org-a"))
    worker_publish(redis_server, "bom-a", progress("bom-a", 2, organization_id="org-a"))
    await wait_held(gw, "bom-a", 2)
    token = org_token("org-a")
    status, body = await poll(http, gw, "bom-a", token)
    assert (status, body["terminal"]) == (200, False)
    worker_publish(redis_server, "bom-a", {"event_id": "f", "event_type": "enrichment.failed"})
    await wait_held(gw, "bom-a", 3)
    async with http.get(
        f"{gw.url}/api/enrichment/events/bom-a?limit=1",
        headers={"Authorization": f"Bearer {token}"},
    ) as resp:
        first_page = await resp.json()
    assert [e["event_id"] for e in first_page["events"]] == ["bom-a-e1"]
    assert first_page["terminal"] is False
    status, body = await poll(http, gw, "bom-a", token)
    assert [e["event_id"] for e in body["events"]] == ["bom-a-e1", "bom-a-e2"]
    assert body["terminal"] is True
    status, body = await poll(http, gw, "bom-a", ADMIN)
    assert [e["event_id"] for e in body["events"]] == ["bom-a-e1", "bom-a-e2", "f"]
    assert body["terminal"] is True
