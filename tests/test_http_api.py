"""Publish, polling fallback and health endpoints (spec section 4)."""

from __future__ import annotations

import aiohttp
import pytest

from bomstream.server import RunningGateway
from tests.conftest import StartGateway, open_stream, progress, publish

BAD_BODIES: list[tuple[bytes, int, str]] = [
    (b"not json", 400, "invalid_json"),
    (b"[1,2]", 400, "not_an_object"),
    (b'"a string"', 400, "not_an_object"),
    (b"{}", 400, "invalid_event_type"),
    (b'{"event_type": "bad type with spaces"}', 400, "invalid_event_type"),
    (b'{"event_type": "x\\r\\nid: 666"}', 400, "invalid_event_type"),
    (b'{"event_type": "' + b"a" * 65 + b'"}', 400, "invalid_event_type"),
    (b'{"event_type": "enrichment.progress", "bom_id": "someone-else"}', 400, "bom_id_mismatch"),
    (
        b'{"event_type": "enrichment.progress", "organization_id": 5}',
        400,
        "invalid_organization_id",
    ),
    (b'{"event_type": "enrichment.progress", "s": "\xc3\x28"}', 400, "invalid_utf8"),
    (b'{"event_type": "enrichment.progress", "pad": "' + b"x" * 70000 + b'"}', 413, "too_large"),
]


@pytest.mark.parametrize(("body", "status", "code"), BAD_BODIES)
async def test_bad_event_over_http_gets_clear_json_error_and_reaches_no_one(
    gateway: RunningGateway, http: aiohttp.ClientSession, body: bytes, status: int, code: str
) -> None:
    async with open_stream(http, gateway.url, "bom-h") as s:
        await s.next_event()
        reply = await publish(http, gateway.url, "bom-h", body, expect=status)
        assert reply["code"] == code
        assert isinstance(reply["error"], str) and reply["error"]
        await publish(http, gateway.url, "bom-h", progress("bom-h", 1))
        assert (await s.next_event()).id == "bom-h-e1"


async def test_publish_returns_202_with_the_event_id_and_assigns_one_when_missing(
    gateway: RunningGateway, http: aiohttp.ClientSession
) -> None:
    reply = await publish(http, gateway.url, "bom-h", {"event_type": "enrichment.started"})
    assigned = reply["event_id"]
    assert isinstance(assigned, str) and 0 < len(assigned) <= 128
    unsafe = await publish(
        http, gateway.url, "bom-h", {"event_type": "enrichment.progress", "event_id": "a\nb"}
    )
    assert "\n" not in unsafe["event_id"] and unsafe["event_id"] != "a\nb"
    async with http.get(f"{gateway.url}/api/enrichment/events/bom-h") as resp:
        body = await resp.json()
    assert [e["event_id"] for e in body["events"]] == [assigned, unsafe["event_id"]]


async def test_unknown_fields_pass_through_untouched(
    gateway: RunningGateway, http: aiohttp.ClientSession
) -> None:
    event = progress(
        "bom-h", 1, routing_key="customer.enrichment.progress", nested={"a": [1, None, True]}
    )
    async with open_stream(http, gateway.url, "bom-h") as s:
        await s.next_event()
        await publish(http, gateway.url, "bom-h", event)
        assert (await s.next_event()).json() == event


async def test_poll_returns_events_after_cursor_with_state_and_terminal_flag(
    gateway: RunningGateway, http: aiohttp.ClientSession
) -> None:
    base = f"{gateway.url}/api/enrichment/events/bom-p"
    async with http.get(base) as resp:
        empty = await resp.json()
    assert empty == {
        "bom_id": "bom-p", "state": None, "events": [], "last_event_id": None,
        "resumed": False, "terminal": False,
    }  # fmt: skip
    for n in range(1, 6):
        await publish(http, gateway.url, "bom-p", progress("bom-p", n))
    async with http.get(base, params={"after": "bom-p-e2", "limit": "2"}) as resp:
        page = await resp.json()
    assert [e["event_id"] for e in page["events"]] == ["bom-p-e3", "bom-p-e4"]
    assert page["last_event_id"] == "bom-p-e4"
    assert page["resumed"] is True
    assert page["terminal"] is False
    assert page["state"]["enriched_items"] == 5

    await publish(
        http,
        gateway.url,
        "bom-p",
        {"event_id": "end", "event_type": "enrichment.completed", "state": {"status": "completed"}},
    )
    async with http.get(base, params={"after": "bom-p-e4"}) as resp:
        last = await resp.json()
    assert [e["event_id"] for e in last["events"]] == ["bom-p-e5", "end"]
    assert last["terminal"] is True
    assert last["state"] == {"status": "completed"}
    async with http.get(base, params={"after": "end"}) as resp:
        after_end = await resp.json()
    assert after_end["events"] == [] and after_end["last_event_id"] == "end"
    assert after_end["terminal"] is True

    async with http.get(base, params={"after": "unknown-id"}) as resp:
        unknown = await resp.json()
    assert unknown["resumed"] is False and len(unknown["events"]) == 6


@pytest.mark.parametrize("limit", ["0", "1001", "-1", "abc", "1.5", ""])
async def test_poll_limit_out_of_range_is_400(
    gateway: RunningGateway, http: aiohttp.ClientSession, limit: str
) -> None:
    async with http.get(
        f"{gateway.url}/api/enrichment/events/bom-p", params={"limit": limit}
    ) as resp:
        assert resp.status == 400
        assert (await resp.json())["code"] == "invalid_limit"


async def test_health_reports_embedded_broker(
    gateway: RunningGateway, http: aiohttp.ClientSession
) -> None:
    async with http.get(f"{gateway.url}/api/enrichment/health") as resp:
        assert resp.status == 200
        body = await resp.json()
    assert body["status"] == "healthy"
    assert body["redis"] == "disabled"
    assert body["history"] == "disabled"


async def test_admin_token_guards_stream_poll_and_publish(
    gateway_factory: StartGateway, http: aiohttp.ClientSession
) -> None:
    gw = await gateway_factory(auth__admin_token="s3cret-admin")
    paths = [
        ("GET", "/api/enrichment/stream/bom-t"),
        ("GET", "/api/enrichment/events/bom-t"),
        ("POST", "/api/enrichment/events/bom-t"),
    ]
    for method, path in paths:
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            async with http.request(method, gw.url + path, headers=headers, data=b"{}") as resp:
                assert resp.status == 401, (method, path, headers)
                assert (await resp.json())["code"] == "unauthorized"
    reply = await publish(http, gw.url, "bom-t", progress("bom-t", 1), token="s3cret-admin")
    assert reply == {"event_id": "bom-t-e1"}
    async with open_stream(http, gw.url, "bom-t", token="s3cret-admin") as s:
        await s.next_event()
        assert (await s.next_event()).id == "bom-t-e1"
    async with http.get(f"{gw.url}/api/enrichment/stream/bom-t?token=s3cret-admin") as resp:
        assert resp.status == 200
    async with http.get(f"{gw.url}/api/enrichment/health") as resp:
        assert resp.status == 200


async def test_unknown_route_and_wrong_method_are_json_errors(
    gateway: RunningGateway, http: aiohttp.ClientSession
) -> None:
    async with http.get(f"{gateway.url}/nope") as resp:
        assert resp.status == 404
        assert (await resp.json())["code"] == "not_found"
    async with http.delete(f"{gateway.url}/api/enrichment/events/bom-a") as resp:
        assert resp.status == 405
        assert (await resp.json())["code"] == "method_not_allowed"
