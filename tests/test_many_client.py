"""BomStream.openMany and openOrg in a real headless Chromium, against a small
scripted server that speaks the multi-BOM contract (spec section 9) and
misbehaves on purpose: repeats events across a reconnect, refuses the stream,
answers a poll with events already seen."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import pytest
from aiohttp import web
from playwright.async_api import Browser, Page

from tests.browser import chromium, wait_until

pytestmark = pytest.mark.timeout(60)

SCRIPTS = ("bomstream-connection.js", "bomstream.js", "bomstream-many.js")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# Records what every callback was given, the BOM id argument included.
RECORDER = """(opts) => {
  window.calls = [];
  const names = ["onStarted", "onProgress", "onComponentCompleted", "onComponentFailed",
                 "onComplete", "onError", "onEvent", "onForget", "onConnectionChange"];
  for (const name of names) {
    opts[name] = (arg, bomId) => window.calls.push([name, bomId === undefined ? "-" : bomId,
      name === "onEvent" ? arg.event_id : name === "onError" ? arg.code :
      name === "onConnectionChange" ? arg.mode : name === "onForget" ? arg : null]);
  }
  return opts;
}"""


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with chromium() as b:
        yield b


@dataclass
class Seen:
    """Every request the scripted server got, in order."""

    streams: list[web.Request] = field(default_factory=list)
    polls: list[web.Request] = field(default_factory=list)


@asynccontextmanager
async def scripted(stream: Handler, poll: Handler | None = None) -> AsyncIterator[str]:
    static = resources.files("bomstream") / "static"

    async def page(request: web.Request) -> web.Response:
        tags = "".join(f'<script src="/static/{name}"></script>' for name in SCRIPTS)
        return web.Response(text=f"<!doctype html>{tags}", content_type="text/html")

    async def asset(request: web.Request) -> web.Response:
        body = (static / request.match_info["name"]).read_text()
        return web.Response(text=body, content_type="text/javascript")

    async def no_polling(request: web.Request) -> web.Response:
        raise AssertionError("this test expects no poll")

    app = web.Application()
    app.router.add_get("/", page)
    app.router.add_get("/static/{name}", asset)
    app.router.add_get("/api/enrichment/stream", stream)
    app.router.add_get("/api/enrichment/events", poll or no_polling)
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()


def frame(cursor: str, bom_id: str, event_id: str, event_type: str, pct: float) -> bytes:
    event = {
        "event_id": event_id,
        "event_type": event_type,
        "bom_id": bom_id,
        "state": {"status": "enriching", "percent_complete": pct, "total_items": 10},
    }
    return f"id: {cursor}\nevent: {event_type}\ndata: {json.dumps(event)}\n\n".encode()


def connected(bom_ids: list[str] | None, resumed: bool = False) -> bytes:
    data: dict[str, Any] = {"type": "connected", "resumed": resumed, "gaps": []}
    if bom_ids is None:
        data["scope"] = "org"
    else:
        data["bom_ids"] = bom_ids
    return b"retry: 100\n\nevent: connected\ndata: " + json.dumps(data).encode() + b"\n\n"


async def sse_response(request: web.Request, body: bytes) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    await resp.write(body)
    return resp


async def hold_open(resp: web.StreamResponse) -> web.StreamResponse:
    # Until the client goes away (the handler is cancelled then).
    await asyncio.sleep(30)
    return resp


def applied(calls: list[list[Any]], bom_id: str) -> list[str]:
    return [c[2] for c in calls if c[0] == "onEvent" and c[1] == bom_id]


async def open_client(page: Page, base: str, kind: str, opts: dict[str, Any]) -> None:
    await page.goto(base + "/")
    await page.evaluate(
        f"""(opts) => {{
          window.client = BomStream.{kind}(({RECORDER})(opts));
        }}""",
        opts,
    )


async def test_open_many_resumes_from_the_cursor_drops_repeats_per_bom_and_stops_when_all_finish(
    browser: Browser,
) -> None:
    seen = Seen()

    async def stream(request: web.Request) -> web.StreamResponse:
        seen.streams.append(request)
        if len(seen.streams) == 1:
            # Then the connection drops; the browser reconnects by itself.
            return await sse_response(
                request,
                connected(["a", "b"])
                + frame("c1", "a", "a1", "enrichment.started", 0)
                + frame("c2", "b", "b1", "enrichment.progress", 20)
                # The same event_id on another BOM is another event.
                + frame("c3", "a", "x", "enrichment.progress", 30)
                + frame("c4", "b", "x", "enrichment.progress", 40),
            )
        resp = await sse_response(
            request,
            connected(["a", "b"], resumed=True)
            # Repeated across the reconnect: must not be applied twice.
            + frame("c3", "a", "x", "enrichment.progress", 30)
            + frame("c4", "b", "x", "enrichment.progress", 40)
            + frame("c5", "a", "a2", "enrichment.progress", 60)
            + frame("c6", "b", "b-done", "enrichment.completed", 100)
            + frame("c7", "a", "a-done", "enrichment.completed", 100),
        )
        return await hold_open(resp)

    async with scripted(stream) as base:
        page = await browser.new_page()
        await open_client(page, base, "openMany", {"bomIds": ["a", "b", "a"]})
        await wait_until(page, "window.client.mode === 'closed'")
        await asyncio.sleep(1.5)  # 15 retry intervals

        calls = await page.evaluate("window.calls")
        assert applied(calls, "a") == ["a1", "x", "a2", "a-done"]
        assert applied(calls, "b") == ["b1", "x", "b-done"]
        assert await page.evaluate("window.client.duplicates") == 2
        assert await page.evaluate("window.client.finishReason") == "finished"
        assert await page.evaluate("window.client.bomIds") == ["a", "b"]

        assert len(seen.streams) == 2
        first, second = seen.streams
        assert first.query.getall("bom_id") == ["a", "b"]
        assert "Last-Event-ID" not in first.headers
        assert second.headers["Last-Event-ID"] == "c4"
        assert second.query.getall("bom_id") == ["a", "b"]

        # Each callback gets BomStream.open's argument first, the BOM id second.
        assert [c[1] for c in calls if c[0] == "onComplete"] == ["b", "a"]
        assert [c[1] for c in calls if c[0] == "onStarted"] == ["a"]
        progress = [c[1] for c in calls if c[0] == "onProgress"]
        assert progress == ["a", "b", "a", "b", "a", "b", "a"]
        assert {c[1] for c in calls if c[0] == "onConnectionChange"} == {"-"}
        assert await page.evaluate("window.client.bom('a').state.percent_complete") == 100


async def test_open_many_polls_one_request_for_the_list_from_the_cursor_then_resumes_the_stream(
    browser: Browser,
) -> None:
    seen = Seen()
    refuse = True
    pages: dict[str | None, dict[str, Any]] = {
        None: {"events": [("a", "a1", 10), ("b", "b1", 10)], "cursor": "p2"},
        # Overlaps the first page by one event.
        "p2": {"events": [("a", "a1", 10), ("a", "a2", 50)], "cursor": "p3"},
        "p3": {"events": [], "cursor": "p3"},
    }

    async def stream(request: web.Request) -> web.StreamResponse:
        seen.streams.append(request)
        if refuse:
            return web.json_response({"error": "no such route", "code": "not_found"}, status=404)
        resp = await sse_response(
            request,
            connected(["a", "b"], resumed=True)
            + frame("c4", "b", "b-done", "enrichment.completed", 100)
            + frame("c5", "a", "a-done", "enrichment.completed", 100),
        )
        return await hold_open(resp)

    async def poll(request: web.Request) -> web.Response:
        seen.polls.append(request)
        spec = pages[request.query.get("after")]
        events = [
            {"event_id": e, "event_type": "enrichment.progress", "bom_id": b,
             "state": {"status": "enriching", "percent_complete": p}}
            for b, e, p in spec["events"]
        ]  # fmt: skip
        body = {"bom_ids": ["a", "b"], "events": events, "cursor": spec["cursor"],
                "resumed": True, "gaps": [], "finished": []}  # fmt: skip
        return web.json_response(body)

    async with scripted(stream, poll) as base:
        page = await browser.new_page()
        opts = {"bomIds": ["a", "b"], "pollInterval": 150, "sseRetryInterval": 1200}
        await open_client(page, base, "openMany", opts)
        await wait_until(page, "window.client.mode === 'polling'")
        assert len(seen.streams) == 3  # pollFallbackAfter refused connects
        await wait_until(page, "window.client.lastEventId === 'p3'")
        refuse = False
        await wait_until(page, "window.client.mode === 'closed'", timeout=10)
        settled = (len(seen.streams), len(seen.polls))
        await asyncio.sleep(1.5)  # 10 poll intervals, one stream retry interval
        assert (len(seen.streams), len(seen.polls)) == settled

        calls = await page.evaluate("window.calls")
        assert applied(calls, "a") == ["a1", "a2", "a-done"]
        assert applied(calls, "b") == ["b1", "b-done"]
        assert await page.evaluate("window.client.duplicates") == 1
        # One request per interval for the whole list, each from the last cursor.
        afters = [r.query.get("after") for r in seen.polls]
        assert afters[:3] == [None, "p2", "p3"]
        assert set(afters[2:]) == {"p3"}
        for r in seen.polls:
            assert r.query.getall("bom_id") == ["a", "b"]
            assert r.query["limit"] == "100"
        # The stream came back from where polling left off.
        resumed = seen.streams[-1]
        assert resumed.query["last_event_id"] == "p3"
        modes = [c[2] for c in calls if c[0] == "onConnectionChange"]
        assert "polling" in modes and modes[-1] == "closed"


async def test_open_org_keeps_its_stream_after_every_bom_finished_and_takes_in_new_boms(
    browser: Browser,
) -> None:
    seen = Seen()
    more = asyncio.Event()

    async def stream(request: web.Request) -> web.StreamResponse:
        seen.streams.append(request)
        resp = await sse_response(
            request,
            connected(None)
            + frame("c1", "a", "a-done", "enrichment.completed", 100)
            + frame("c2", "b", "b-done", "enrichment.failed", 40),
        )
        await more.wait()
        await resp.write(
            frame("c3", "new-1", "n1", "enrichment.started", 0)
            + frame("c4", "new-2", "n2", "enrichment.started", 0)
        )
        return await hold_open(resp)

    async with scripted(stream) as base:
        page = await browser.new_page()
        await open_client(page, base, "openOrg", {"maxBoms": 3})
        await wait_until(page, "window.client.bomIds.length === 2")
        await asyncio.sleep(1)
        assert await page.evaluate("window.client.mode") == "sse"
        assert await page.evaluate("window.client.connected") is True
        more.set()
        await wait_until(page, "window.client.bom('new-2') !== undefined")

        req = seen.streams[0]
        assert req.query.get("scope") == "org" and "bom_id" not in req.query
        assert len(seen.streams) == 1
        # Past maxBoms the finished BOM updated longest ago is forgotten.
        assert await page.evaluate("window.client.bomIds") == ["b", "new-1", "new-2"]
        calls = await page.evaluate("window.calls")
        assert [c[2] for c in calls if c[0] == "onForget"] == ["a"]
        assert [c[1:] for c in calls if c[0] == "onError"] == [["b", "job_failed"]]
        assert await page.evaluate("window.client.mode") == "sse"


async def test_open_many_gives_up_on_a_list_the_gateway_refuses_and_says_why(
    browser: Browser,
) -> None:
    seen = Seen()

    async def stream(request: web.Request) -> web.Response:
        seen.streams.append(request)
        return web.json_response({"error": "at most 2", "code": "too_many_boms"}, status=400)

    async def poll(request: web.Request) -> web.Response:
        seen.polls.append(request)
        return web.json_response({"error": "at most 2", "code": "too_many_boms"}, status=400)

    async with scripted(stream, poll) as base:
        page = await browser.new_page()
        await open_client(page, base, "openMany", {"bomIds": ["a", "b", "c"], "pollInterval": 100})
        await wait_until(page, "window.client.mode === 'closed'")
        await asyncio.sleep(1)
        calls = await page.evaluate("window.calls")
        assert [c[1:] for c in calls if c[0] == "onError"] == [[None, "too_many_boms"]]
        assert len(seen.polls) == 1
        assert len(seen.streams) == 3
        assert await page.evaluate("window.client.error.message") == "at most 2"
