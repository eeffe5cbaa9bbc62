"""Multi-BOM streams and polls: every refusal of spec section 9, tickets for a
list or an org, the cursor's size, and a listed BOM of another org."""

from __future__ import annotations

import json
from typing import Any

import aiohttp

from tests.authkit import ADMIN, SECRET, org_token
from tests.conftest import StartGateway, publish
from tests.multi_kit import (
    POLL,
    STREAM,
    by_bom,
    connected,
    nothing_more,
    open_multi,
    poll_multi,
    read_events,
)
from tests.redis_proc import RedisProcess
from tests.test_multi_stream import event

TICKETS = "/api/enrichment/tickets"


async def auth_gateway(gateway_factory: StartGateway, **extra: Any) -> Any:
    return await gateway_factory(auth__jwt_secret=SECRET, auth__admin_token=ADMIN, **extra)


async def status_and_code(
    http: aiohttp.ClientSession, url: str, query: list[tuple[str, str]], token: str | None
) -> tuple[int, str | None]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with http.get(url, params=query, headers=headers) as resp:
        body = await resp.json()
        return resp.status, body.get("code")


async def test_every_refusal_of_the_stream_and_the_poll(
    gateway_factory: StartGateway, http: aiohttp.ClientSession
) -> None:
    gw = await auth_gateway(gateway_factory, limits__max_streams_per_org=1)
    await publish(http, gw.url, "theirs", event("theirs", 1, organization_id="org-b"), token=ADMIN)
    mine = org_token("org-a")
    many = [("bom_id", f"b{i}") for i in range(101)]
    cases: list[tuple[list[tuple[str, str]], str | None, int, str]] = [
        ([], mine, 400, "missing_bom_id"),
        (many, mine, 400, "too_many_boms"),
        ([("bom_id", "a"), ("bom_id", "a")], mine, 400, "duplicate_bom_id"),
        ([("bom_id", "a"), ("bom_id", "-bad")], mine, 400, "invalid_bom_id"),
        ([("bom_id", "a"), ("bom_id", "x" * 129)], mine, 400, "invalid_bom_id"),
        ([("scope", "all")], mine, 400, "invalid_scope"),
        ([("scope", "org"), ("bom_id", "a")], mine, 400, "invalid_scope"),
        ([("bom_id", "a")], None, 401, "unauthorized"),
        ([("bom_id", "a")], "not-a-token", 401, "unauthorized"),
        ([("bom_id", "a"), ("bom_id", "theirs")], mine, 403, "forbidden"),
    ]
    for path in (STREAM, POLL):
        for query, token, status, code in cases:
            got = await status_and_code(http, gw.url + path, query, token)
            assert got == (status, code), (path, query, got)
    # The org's one stream may be a multi-BOM one; the next of any kind is 429.
    async with open_multi(http, gw.url, ["a", "b"], token=mine) as s:
        await connected(s)
        for query in ([("bom_id", "c")], [("scope", "org")]):
            assert await status_and_code(http, gw.url + STREAM, query, mine) == (
                429,
                "org_stream_limit",
            )
        async with http.get(gw.url + "/api/enrichment/stream/c", headers=_bearer(mine)) as r:
            assert r.status == 429
            assert r.headers["Retry-After"]


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_a_limit_of_boms_per_stream_is_configurable(
    gateway_factory: StartGateway, http: aiohttp.ClientSession
) -> None:
    gw = await gateway_factory(limits__max_boms_per_stream=3)
    four = [("bom_id", f"b{i}") for i in range(4)]
    assert await status_and_code(http, gw.url + STREAM, four, None) == (400, "too_many_boms")
    async with open_multi(http, gw.url, ["b0", "b1", "b2"]) as s:
        assert (await connected(s))["bom_ids"] == ["b0", "b1", "b2"]


async def test_the_cursor_stays_under_512_bytes_with_100_boms_of_128_characters(
    gateway_factory: StartGateway, http: aiohttp.ClientSession
) -> None:
    gw = await gateway_factory()
    boms = [f"{i:03d}" + "x" * 125 for i in range(100)]
    # Event ids of the longest kind: 128 characters, up to 3 bytes each in UTF-8.
    ids = {b: f"{i:03d}" + "€" * 125 for i, b in enumerate(boms)}
    async with open_multi(http, gw.url, boms) as s:
        hello = await connected(s)
        assert hello["bom_ids"] == boms
        for b in boms:
            await publish(
                http, gw.url, b, {"event_id": ids[b], "event_type": "enrichment.progress"}
            )
        frames = await read_events(s, 100)
    assert max(len((f.id or "").encode()) for f in frames) <= 512
    assert by_bom(frames) == {b: [ids[b]] for b in boms}
    # A cursor naming a long id by its digest resumes exactly too.
    await publish(http, gw.url, boms[7], {"event_id": "late", "event_type": "enrichment.progress"})
    async with open_multi(http, gw.url, boms, last_event_id=frames[50].id) as s:
        hello = await connected(s)
        assert hello["resumed"] is True
        got = by_bom(await read_events(s, 50))
        assert got == {**{b: [ids[b]] for b in boms[51:]}, boms[7]: ["late"]}
        await nothing_more(s, 0.3)


async def test_tickets_for_a_list_and_for_an_org(
    gateway_factory: StartGateway, http: aiohttp.ClientSession
) -> None:
    gw = await auth_gateway(gateway_factory)
    mine = org_token("org-a")
    await publish(http, gw.url, "a1", event("a1", 1, organization_id="org-a"), token=ADMIN)
    await publish(http, gw.url, "b1", event("b1", 1, organization_id="org-b"), token=ADMIN)

    async def ticket(body: dict[str, object], expect: int = 201) -> Any:
        async with http.post(gw.url + TICKETS, json=body, headers=_bearer(mine)) as resp:
            got = await resp.json()
            assert resp.status == expect, got
            return got

    listed = await ticket({"bom_ids": ["a1", "a2", "a3"]})
    assert listed["bom_ids"] == ["a1", "a2", "a3"]
    # A ticket for a list opens that list or part of it, once.
    params = [("ticket", listed["ticket"])]
    async with open_multi(http, gw.url, ["a1", "a2"], params=params) as s:
        assert (await connected(s))["bom_ids"] == ["a1", "a2"]
    async with open_multi(http, gw.url, ["a1", "a2"], params=params, expect=401):
        pass
    other = await ticket({"bom_ids": ["a1", "a2"]})
    async with open_multi(
        http, gw.url, ["a1", "a9"], params=[("ticket", other["ticket"])], expect=401
    ):
        pass
    org = await ticket({"scope": "org"})
    assert org["scope"] == "org"
    async with open_multi(http, gw.url, None, params=[("ticket", org["ticket"])]) as s:
        await connected(s)
        assert by_bom(await read_events(s, 1)) == {"a1": ["a1-e1"]}
    # Refusals: another org's BOM, bad lists, two kinds at once.
    await ticket({"bom_ids": ["a1", "b1"]}, expect=403)
    await ticket({"bom_ids": ["a1", "a1"]}, expect=400)
    await ticket({"bom_ids": []}, expect=400)
    await ticket({"bom_ids": "a1"}, expect=400)
    await ticket({"scope": "everything"}, expect=400)
    await ticket({"bom_id": "a1", "scope": "org"}, expect=400)


async def test_a_listed_bom_that_turns_out_foreign_is_left_out(
    gateway_factory: StartGateway, http: aiohttp.ClientSession
) -> None:
    gw = await auth_gateway(gateway_factory)
    async with open_multi(http, gw.url, ["mine", "unknown"], token=org_token("org-a")) as s:
        await connected(s)
        await publish(
            http, gw.url, "unknown", event("unknown", 1, organization_id="org-b"), token=ADMIN
        )
        await publish(
            http, gw.url, "unknown", event("unknown", 2, organization_id="org-b"), token=ADMIN
        )
        await publish(http, gw.url, "mine", event("mine", 1, organization_id="org-a"), token=ADMIN)
        (only,) = await read_events(s, 1)
        assert json.loads(only.data)["bom_id"] == "mine"
        await nothing_more(s, 0.3)


async def test_polling_many_boms_with_a_cursor(
    gateway_factory: StartGateway, http: aiohttp.ClientSession
) -> None:
    gw = await gateway_factory()
    for n in range(1, 4):
        await publish(http, gw.url, "a", event("a", n))
        await publish(http, gw.url, "b", event("b", n))
    first = await poll_multi(http, gw.url, ["a", "b", "c"])
    # Without a cursor: each BOM's snapshot.
    assert first["bom_ids"] == ["a", "b", "c"]
    assert [e["event_id"] for e in first["events"]] == ["a-e3", "b-e3"]
    assert first["resumed"] is False and first["finished"] == []
    cursor = first["cursor"]
    same = await poll_multi(http, gw.url, ["a", "b", "c"], after=cursor)
    assert same["events"] == [] and same["cursor"] == cursor and same["resumed"] is True
    await publish(http, gw.url, "c", event("c", 1))
    await publish(http, gw.url, "a", event("a", 4, event_type="enrichment.completed"))
    await publish(http, gw.url, "b", event("b", 4))
    page = await poll_multi(http, gw.url, ["a", "b", "c"], after=cursor, params=[("limit", "2")])
    assert [e["event_id"] for e in page["events"]] == ["c-e1", "a-e4"]
    rest = await poll_multi(http, gw.url, ["a", "b", "c"], after=page["cursor"])
    assert [e["event_id"] for e in rest["events"]] == ["b-e4"]
    assert rest["finished"] == ["a"]
    org = await poll_multi(http, gw.url, None)
    assert org["scope"] == "org" and {e["bom_id"] for e in org["events"]} == {"a", "b", "c"}


async def test_interest_subscriptions_refuse_multi_bom_streams_with_a_clear_error(
    gateway_factory: StartGateway, http: aiohttp.ClientSession, redis_server: RedisProcess
) -> None:
    gw = await gateway_factory(redis__url=redis_server.url, redis__subscribe="interest")
    for path in (STREAM, POLL):
        for query in ([("bom_id", "a"), ("bom_id", "b")], [("scope", "org")]):
            got = await status_and_code(http, gw.url + path, query, None)
            assert got == (400, "multi_unavailable"), (path, query)
    # Single-BOM streams are unaffected.
    async with http.get(gw.url + "/api/enrichment/events/a") as resp:
        assert resp.status == 200
