"""The pages, static assets and BOM list over plain HTTP against a real gateway."""

from __future__ import annotations

import aiohttp

from bomstream.server import RunningGateway
from tests.conftest import StartGateway, open_stream, progress, publish


async def test_pages_are_html_under_a_strict_content_security_policy(
    gateway: RunningGateway, http: aiohttp.ClientSession
) -> None:
    for path, marker in (("/", b"BOMs on this gateway"), ("/monitor", b"/static/bomstream.js")):
        async with http.get(gateway.url + path) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"] == "text/html; charset=utf-8"
            csp = resp.headers["Content-Security-Policy"]
            assert "script-src 'self'" in csp and "default-src 'none'" in csp
            assert resp.headers["X-Content-Type-Options"] == "nosniff"
            assert resp.headers["Referrer-Policy"] == "no-referrer"
            assert marker in await resp.read()


async def test_static_assets_have_types_and_revalidate_with_etag(
    gateway: RunningGateway, http: aiohttp.ClientSession
) -> None:
    types = {
        "bomstream-connection.js": "text/javascript; charset=utf-8",
        "bomstream.js": "text/javascript; charset=utf-8",
        "bomstream-many.js": "text/javascript; charset=utf-8",
        "monitor.js": "text/javascript; charset=utf-8",
        "index.js": "text/javascript; charset=utf-8",
        "monitor.css": "text/css; charset=utf-8",
    }
    for name, content_type in types.items():
        async with http.get(f"{gateway.url}/static/{name}") as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"] == content_type
            etag = resp.headers["ETag"]
            body = await resp.read()
        assert body
        async with http.get(
            f"{gateway.url}/static/{name}", headers={"If-None-Match": etag}
        ) as resp:
            assert resp.status == 304
            assert await resp.read() == b""


async def test_unknown_static_names_are_json_404s(
    gateway: RunningGateway, http: aiohttp.ClientSession
) -> None:
    for name in ("nope.js", "..%2Fconfig.py", "%2E%2E%2Fserver.py"):
        async with http.get(f"{gateway.url}/static/{name}") as resp:
            assert resp.status == 404
            assert (await resp.json())["code"] == "not_found"


async def test_bom_list_is_newest_first_with_latest_state_and_open_streams(
    gateway: RunningGateway, http: aiohttp.ClientSession
) -> None:
    await publish(http, gateway.url, "bom-old", progress("bom-old", 3, total=10))
    await publish(http, gateway.url, "bom-new", progress("bom-new", 1, total=4))
    done = {"event_id": "bom-old-end", "event_type": "enrichment.completed", "state": {}}
    async with open_stream(http, gateway.url, "bom-new") as stream:
        assert (await stream.next_event()).event == "connected"
        async with http.get(f"{gateway.url}/api/enrichment/boms") as resp:
            body = await resp.json()
    assert resp.status == 200
    assert [b["bom_id"] for b in body["boms"]] == ["bom-new", "bom-old"]
    assert body["total"] == 2
    newest = body["boms"][0]
    assert newest["streams"] == 1
    assert newest["event_id"] == "bom-new-e1"
    assert newest["state"]["total_items"] == 4
    assert newest["terminal"] is False

    await publish(http, gateway.url, "bom-old", done)
    async with http.get(f"{gateway.url}/api/enrichment/boms?limit=1") as resp:
        body = await resp.json()
    assert [(b["bom_id"], b["terminal"]) for b in body["boms"]] == [("bom-old", True)]
    assert body["total"] == 2


async def test_bom_list_needs_the_admin_token_when_auth_is_on(
    gateway_factory: StartGateway, http: aiohttp.ClientSession
) -> None:
    gw = await gateway_factory(auth__admin_token="s3cret")
    url = f"{gw.url}/api/enrichment/boms"
    async with http.get(url) as resp:
        assert resp.status == 401
    async with http.get(url, headers={"Authorization": "Bearer wrong"}) as resp:
        assert resp.status == 401
    async with http.get(url, headers={"Authorization": "Bearer s3cret"}) as resp:
        assert resp.status == 200
        assert (await resp.json())["boms"] == []
    for bad in ("0", "1001", "x"):
        async with http.get(f"{url}?limit={bad}", headers={"Authorization": "Bearer s3cret"}) as r:
            assert r.status == 400
            assert (await r.json())["code"] == "invalid_limit"
    # The pages themselves hold no data and load without a token.
    async with http.get(f"{gw.url}/monitor") as resp:
        assert resp.status == 200
