"""CORS with aiohttp-cors: listed origins get headers and preflight answers, others none."""

from __future__ import annotations

import aiohttp
import pytest

from bomstream.server import RunningGateway
from tests.authkit import ADMIN, SECRET, org_token
from tests.conftest import StartGateway

APP = "https://app.example.com"
EVIL = "https://evil.example.net"
ROUTES = [
    ("GET", "/api/enrichment/stream/bom-a"),
    ("GET", "/api/enrichment/events/bom-a"),
    ("POST", "/api/enrichment/events/bom-a"),
    ("POST", "/api/enrichment/tickets"),
    ("GET", "/api/enrichment/stream?bom_id=bom-a&bom_id=bom-b"),
    ("GET", "/api/enrichment/events?scope=org"),
]


async def cors_gateway(gateway_factory: StartGateway, **extra: object) -> RunningGateway:
    return await gateway_factory(
        auth__jwt_secret=SECRET, auth__admin_token=ADMIN, cors__allow_origins=[APP], **extra
    )


async def preflight(
    http: aiohttp.ClientSession, url: str, origin: str, method: str
) -> aiohttp.ClientResponse:
    async with http.options(
        url,
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": method,
            "Access-Control-Request-Headers": "authorization, last-event-id",
        },
    ) as resp:
        await resp.read()
        return resp


@pytest.mark.parametrize(("method", "path"), ROUTES)
async def test_preflight_allows_authorization_and_last_event_id_for_listed_origin(
    gateway_factory: StartGateway, http: aiohttp.ClientSession, method: str, path: str
) -> None:
    gw = await cors_gateway(gateway_factory)
    resp = await preflight(http, gw.url + path, APP, method)
    assert resp.status == 200
    assert resp.headers["Access-Control-Allow-Origin"] == APP
    allowed = {h.strip().lower() for h in resp.headers["Access-Control-Allow-Headers"].split(",")}
    assert {"authorization", "last-event-id"} <= allowed
    assert method in resp.headers["Access-Control-Allow-Methods"]
    assert "Access-Control-Allow-Credentials" not in resp.headers


@pytest.mark.parametrize(("method", "path"), ROUTES)
async def test_other_origin_gets_no_allow_origin(
    gateway_factory: StartGateway, http: aiohttp.ClientSession, method: str, path: str
) -> None:
    gw = await cors_gateway(gateway_factory)
    resp = await preflight(http, gw.url + path, EVIL, method)
    assert "Access-Control-Allow-Origin" not in resp.headers
    async with http.request(
        method, gw.url + path, headers={"Origin": EVIL, "Authorization": f"Bearer {ADMIN}"}
    ) as resp:
        assert "Access-Control-Allow-Origin" not in resp.headers


async def test_actual_responses_carry_cors_headers_even_errors(
    gateway_factory: StartGateway, http: aiohttp.ClientSession
) -> None:
    gw = await cors_gateway(gateway_factory, cors__allow_credentials=True)
    token = org_token("org-a")
    async with http.get(
        gw.url + "/api/enrichment/stream/bom-a",
        headers={"Origin": APP, "Authorization": f"Bearer {token}"},
    ) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "text/event-stream"
        assert resp.headers["Access-Control-Allow-Origin"] == APP
        assert resp.headers["Access-Control-Allow-Credentials"] == "true"
    # A page must be able to read why it was turned away, and when to retry.
    async with http.get(gw.url + "/api/enrichment/events/bom-a", headers={"Origin": APP}) as resp:
        assert resp.status == 401
        assert resp.headers["Access-Control-Allow-Origin"] == APP
    async with http.post(
        gw.url + "/api/enrichment/tickets",
        json={"bom_id": "bom-a"},
        headers={"Origin": APP, "Authorization": f"Bearer {token}"},
    ) as resp:
        assert resp.status == 201
        assert resp.headers["Access-Control-Allow-Origin"] == APP


async def test_no_cors_headers_when_no_origin_is_configured(
    gateway_factory: StartGateway, http: aiohttp.ClientSession
) -> None:
    gw = await gateway_factory()
    async with http.get(gw.url + "/api/enrichment/events/bom-a", headers={"Origin": APP}) as resp:
        assert resp.status == 200
        assert not any(h.lower().startswith("access-control-") for h in resp.headers)
