"""The monitor page and bomstream.js in a real headless Chromium against a
real listening gateway, fed through the real publish endpoint."""

from __future__ import annotations

import asyncio
import json
import logging
import random
import signal
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest
from aiohttp import web
from playwright.async_api import Browser, Page

from bomstream.server import RunningGateway
from bomstream.simulator import DEMO_BOMS, SimulatedBom, run_job
from tests.browser import (
    RECORD_PROGRESS,
    Publisher,
    RequestLog,
    chromium,
    contrast_ratios,
    feed_line_items,
    screenshot,
    wait_until,
)
from tests.conftest import StartGateway
from tests.proxy import stream_blocking_proxy

pytestmark = pytest.mark.timeout(90)

WAIT_MS = 20_000


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with chromium() as b:
        yield b


async def open_monitor(
    browser: Browser, gateway: RunningGateway, bom_id: str, query: str = "", width: int = 1280
) -> tuple[Page, RequestLog]:
    page = await browser.new_page(viewport={"width": width, "height": 900})
    await page.add_init_script(RECORD_PROGRESS)
    log = RequestLog()
    log.attach(page)
    await page.goto(f"{gateway.url}/monitor?bom={bom_id}{query}")
    return page, log


def stream_opens(gateway: RunningGateway) -> float:
    registry = gateway.gateway.metrics.registry
    return registry.get_sample_value("bomstream_streams_opened_total", {"result": "ok"}) or 0.0


async def test_monitor_climbs_to_100_percent_and_then_makes_no_more_requests(
    browser: Browser, gateway_factory: StartGateway, http: aiohttp.ClientSession
) -> None:
    gateway = await gateway_factory(server__heartbeat_s=1)
    bom = SimulatedBom(
        "board-7", "board-7.csv", 30, batch_size=6, fail_rate=0.1, not_found_rate=0.1
    )
    page, log = await open_monitor(browser, gateway, bom.bom_id)
    await page.wait_for_selector('#connection[data-conn="live"]', timeout=WAIT_MS)

    publisher = Publisher(http, gateway.url)
    job = asyncio.create_task(run_job(bom, publisher, random.Random(7), speed=3))
    try:
        await wait_until(page, "Number(document.getElementById('bar').ariaValueNow) >= 40")
        await screenshot(page, "monitor-enriching-desktop.png")
    finally:
        ending = await job
    assert ending == "enrichment.completed"
    await page.wait_for_selector('#status[data-status="completed"]', timeout=WAIT_MS)

    assert await page.inner_text("#percent") == "100 %"
    assert await page.inner_text("#status") == "Completed"
    percents: list[float] = await page.evaluate("window.__percents")
    assert percents == sorted(percents), percents
    assert any(0 < p < 100 for p in percents), percents
    assert percents[-1] == 100
    final = publisher.sent[-1]["state"]
    assert await page.inner_text("#count-enriched") == str(final["enriched_items"])
    assert await page.inner_text("#count-failed") == str(final["failed_items"])
    assert await page.inner_text("#count-not-found") == str(final["not_found_items"])
    assert await page.inner_text("#count-pending") == "0"
    assert final["failed_items"] > 0 and final["not_found_items"] > 0
    # Newest first, each component once.
    assert await feed_line_items(page) == publisher.line_items()[::-1]
    assert await page.get_attribute("#connection", "data-conn") == "closed"

    await screenshot(page, "monitor-completed-desktop.png")
    ratios = await contrast_ratios(page)
    assert len(ratios) > 20
    assert [r for r in ratios if r["ratio"] < 4.5] == []
    await page.set_viewport_size({"width": 360, "height": 780})
    overflow = await page.evaluate("document.documentElement.scrollWidth")
    assert overflow <= 360, f"page is {overflow}px wide at a 360px viewport"
    await screenshot(page, "monitor-completed-360.png", full_page=False)

    # Finished means finished: no reconnects, no polls, for 10 s.
    t0 = time.monotonic()
    opens = stream_opens(gateway)
    await asyncio.sleep(10)
    assert [r.url for r in log.since(t0)] == []
    assert stream_opens(gateway) == opens
    assert gateway.gateway.hub.stream_count == 0
    assert await page.evaluate("window.bomstreamClient.mode") == "closed"


async def test_native_reconnects_carry_last_event_id_and_feed_has_each_component_once(
    browser: Browser, gateway_factory: StartGateway, http: aiohttp.ClientSession
) -> None:
    gateway = await gateway_factory(
        server__max_stream_s=2, server__retry_ms=200, server__heartbeat_s=1
    )
    bom = SimulatedBom("board-8", "board-8.csv", 40, batch_size=8)
    page, log = await open_monitor(browser, gateway, bom.bom_id)
    await page.wait_for_selector('#connection[data-conn="live"]', timeout=WAIT_MS)

    publisher = Publisher(http, gateway.url)
    started = time.monotonic()
    await run_job(bom, publisher, random.Random(8), speed=1.5)
    assert time.monotonic() - started > 4, "the job must outlive two stream lifetimes"
    await page.wait_for_selector('#status[data-status="completed"]', timeout=WAIT_MS)

    streams = log.to("/api/enrichment/stream/")
    assert len(streams) >= 3, [r.url for r in streams]
    sent_ids = {e["event_id"] for e in publisher.sent}
    first = await streams[0].all_headers()
    assert "last-event-id" not in first
    for req in streams[1:]:
        headers = await req.all_headers()
        assert headers.get("last-event-id") in sent_ids, headers
    # Every reconnect resumed from the buffer; nothing fell back to polling.
    registry = gateway.gateway.metrics.registry
    hits = registry.get_sample_value("bomstream_replay_total", {"result": "hit"})
    assert hits is not None and hits >= len(streams) - 1
    assert log.to("/api/enrichment/events/") == []

    items = await feed_line_items(page)
    assert Counter(items) == Counter(publisher.line_items())
    assert len(items) == 40
    assert await page.evaluate("window.bomstreamClient.eventCount") == len(publisher.sent)
    assert await page.is_hidden("#gap")
    assert await page.inner_text("#percent") == "100 %"


async def test_client_falls_back_to_polling_when_the_stream_route_is_refused(
    browser: Browser, gateway_factory: StartGateway, http: aiohttp.ClientSession
) -> None:
    gateway = await gateway_factory(server__disable_stream=True)
    bom = SimulatedBom("board-9", "board-9.csv", 30, batch_size=6, not_found_rate=0.1)
    page, log = await open_monitor(
        browser, gateway, bom.bom_id, "&poll_ms=250&fallback_after=3&sse_retry_ms=1500"
    )
    await page.wait_for_selector('#connection[data-conn="polling"]', timeout=WAIT_MS)
    assert await page.inner_text("#connection-text") == "Polling every 0.25 s"
    fallback_at = time.monotonic()
    # Exactly pollFallbackAfter refused stream attempts before the first poll.
    first_poll = next(t for t, r in log.entries if "/api/enrichment/events/" in r.url)
    assert len([r for t, r in log.entries if "/stream/" in r.url and t < first_poll]) == 3

    publisher = Publisher(http, gateway.url)
    await run_job(bom, publisher, random.Random(9), speed=1.5)
    await page.wait_for_selector('#status[data-status="completed"]', timeout=WAIT_MS)

    assert await page.inner_text("#percent") == "100 %"
    assert await feed_line_items(page) == publisher.line_items()[::-1]
    assert len(log.to("/api/enrichment/events/", since=fallback_at)) >= 5
    # While polling it tried the stream again now and then.
    assert len(log.to("/api/enrichment/stream/", since=fallback_at)) >= 1
    assert await page.get_attribute("#connection", "data-conn") == "closed"
    await screenshot(page, "monitor-polling-completed.png")

    t0 = time.monotonic()
    await asyncio.sleep(5)  # 20 poll intervals, 3 stream retry intervals
    assert [r.url for r in log.since(t0)] == []


async def test_admin_token_in_the_fragment_opens_stream_and_index_and_leaves_the_address_bar(
    browser: Browser,
    gateway_factory: StartGateway,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="bomstream.access")
    gateway = await gateway_factory(auth__admin_token="s3cret", server__access_log=True)
    page, log = await open_monitor(browser, gateway, "board-a", "#token=s3cret")
    await page.wait_for_selector('#connection[data-conn="live"]', timeout=WAIT_MS)
    assert "s3cret" not in await page.evaluate("location.href")

    bom = SimulatedBom("board-a", "board-a.csv", 8, batch_size=4)
    await run_job(bom, Publisher(http, gateway.url, token="s3cret"), random.Random(1), speed=6)
    await page.wait_for_selector('#status[data-status="completed"]', timeout=WAIT_MS)
    # EventSource cannot send headers, so the token rides in the stream's query...
    assert "token=s3cret" in log.to("/api/enrichment/stream/")[0].url
    # ...and the access log shows it redacted.
    access = [r.getMessage() + str(r.__dict__) for r in caplog.records]
    assert any("/api/enrichment/stream/board-a" in line for line in access)
    assert not any("s3cret" in line for line in access)

    # The index reuses the token kept for this tab.
    await page.goto(f"{gateway.url}/")
    row = await page.wait_for_selector('tr[data-bom="board-a"]', timeout=WAIT_MS)
    assert row is not None
    assert await row.inner_text() != ""
    assert await page.inner_text('tr[data-bom="board-a"] .badge') == "Completed"
    await screenshot(page, "index-desktop.png")

    # A fresh tab without the token is told what it needs, not shown BOMs.
    context = await browser.new_context()
    other = await context.new_page()
    await other.goto(f"{gateway.url}/")
    await other.wait_for_selector("text=needs a token", timeout=WAIT_MS)
    assert await other.is_hidden("#boms")
    await context.close()


async def test_demo_runs_every_job_to_its_end_and_the_page_shows_the_failed_one(
    browser: Browser, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    stderr = (tmp_path / "demo.log").open("wb")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bomstream", "demo", "--port", "0", "--speed", "15",
        "--rounds", "1", "--seed", "5",
        stdout=asyncio.subprocess.PIPE, stderr=stderr, cwd=tmp_path,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        lines = []
        while not lines or not lines[-1].startswith("Ctrl-C"):
            line = await asyncio.wait_for(proc.stdout.readline(), 20)
            assert line, "demo exited early: " + (tmp_path / "demo.log").read_text()
            lines.append(line.decode().strip())
        base = lines[0].split(" gateway on ")[1].split()[0]
        monitors = [ln.split()[-1] for ln in lines if ln.startswith("monitor:")]
        assert len(monitors) == len(DEMO_BOMS)

        failing = next(s for s in DEMO_BOMS if s.fail_job_at is not None)
        page = await browser.new_page(viewport={"width": 1280, "height": 900})
        await page.goto(f"{base}/monitor?bom={failing.bom_id}")
        await page.wait_for_selector('#status[data-status="failed"]', timeout=WAIT_MS)
        assert failing.job_error in await page.inner_text("#alert-text")
        assert await page.get_attribute("#connection", "data-conn") == "closed"
        await screenshot(page, "monitor-failed-desktop.png")
        assert [r for r in await contrast_ratios(page) if r["ratio"] < 4.5] == []

        # Every job reaches its end: one failure, the rest completed, with
        # failed and not-found parts along the way.
        async def listing() -> list[dict[str, Any]]:
            async with http.get(f"{base}/api/enrichment/boms") as resp:
                boms: list[dict[str, Any]] = (await resp.json())["boms"]
                return boms

        boms = await listing()
        for _ in range(300):
            if len(boms) == len(DEMO_BOMS) and all(b["terminal"] for b in boms):
                break
            await asyncio.sleep(0.1)
            boms = await listing()
        ends = Counter(b["event_type"] for b in boms)
        assert ends == {"enrichment.completed": len(DEMO_BOMS) - 1, "enrichment.failed": 1}
        assert sum(b["state"]["failed_items"] for b in boms) > 0
        assert sum(b["state"]["not_found_items"] for b in boms) > 0
        sizes = {b["state"]["total_items"] for b in boms}
        assert len(sizes) == len(DEMO_BOMS)

        await page.goto(f"{base}/")
        await page.wait_for_selector("#boms tbody tr", timeout=WAIT_MS)
        assert await page.locator("#boms tbody tr").count() == len(DEMO_BOMS)
        await page.set_viewport_size({"width": 360, "height": 780})
        await screenshot(page, "index-360.png")
        assert [r for r in await contrast_ratios(page) if r["ratio"] < 4.5] == []

        proc.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(proc.wait(), 15) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        stderr.close()


async def test_polling_client_goes_back_to_the_stream_when_a_proxy_lets_it_through(
    browser: Browser, gateway_factory: StartGateway, http: aiohttp.ClientSession
) -> None:
    gateway = await gateway_factory(server__heartbeat_s=1)
    bom = SimulatedBom("board-p", "board-p.csv", 36, batch_size=6)
    async with stream_blocking_proxy(gateway.url) as proxy:
        page = await browser.new_page()
        log = RequestLog()
        log.attach(page)
        await page.goto(f"{proxy.url}/monitor?bom={bom.bom_id}&poll_ms=250&sse_retry_ms=800")
        await page.wait_for_selector('#connection[data-conn="polling"]', timeout=WAIT_MS)

        publisher = Publisher(http, gateway.url)
        job = asyncio.create_task(run_job(bom, publisher, random.Random(3), speed=1.5))
        try:
            await wait_until(page, "Number(document.getElementById('bar').ariaValueNow) >= 20")
            assert await page.get_attribute("#connection", "data-conn") == "polling"
            refused = proxy.refused
            assert refused >= 4  # three before polling, then the periodic retries
            proxy.block_stream = False
            await page.wait_for_selector('#connection[data-conn="live"]', timeout=WAIT_MS)
        finally:
            await job
        await page.wait_for_selector('#status[data-status="completed"]', timeout=WAIT_MS)

        # The stream opened where polling left off: no duplicates, no holes.
        sent_ids = {e["event_id"] for e in publisher.sent}
        opened = log.to("/api/enrichment/stream/")[refused]
        resumed_from = parse_qs(urlsplit(opened.url).query)["last_event_id"][0]
        assert resumed_from in sent_ids
        assert await feed_line_items(page) == publisher.line_items()[::-1]
        assert await page.evaluate("window.bomstreamClient.eventCount") == len(publisher.sent)
        assert await page.is_hidden("#gap")
        assert await page.evaluate("window.bomstreamClient.mode") == "closed"


@pytest.mark.parametrize(
    ("reason", "reconnects"),
    [("token_expired", False), ("forbidden", False), ("max_duration", True)],
)
async def test_client_stops_on_forbidden_and_token_expired_but_resumes_after_max_duration(
    browser: Browser, reason: str, reconnects: bool
) -> None:
    # The gateway sends forbidden and token_expired only to JWT streams, so a
    # server that ends every stream with the given reason stands in for it.
    requests: list[str | None] = []

    async def stream(request: web.Request) -> web.StreamResponse:
        requests.append(request.headers.get("Last-Event-ID"))
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        n = len(requests)
        event = {"event_id": f"e{n}", "event_type": "enrichment.progress", "state": {}}
        await resp.write(
            b"retry: 100\n\nevent: connected\ndata: {}\n\n"
            + f"id: e{n}\nevent: enrichment.progress\ndata: {json.dumps(event)}\n\n".encode()
            + f'event: stream_end\ndata: {{"type":"stream_end","reason":"{reason}"}}\n\n'.encode()
        )
        return resp

    async def page_html(request: web.Request) -> web.Response:
        static = resources.files("bomstream") / "static"
        scripts = "".join(
            f"<script>{(static / name).read_text()}</script>"
            for name in ("bomstream-connection.js", "bomstream.js")
        )
        return web.Response(text=f"<!doctype html>{scripts}", content_type="text/html")

    app = web.Application()
    app.router.add_get("/", page_html)
    app.router.add_get("/api/enrichment/stream/{bom_id}", stream)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        page = await browser.new_page()
        await page.goto(f"http://{host}:{port}/")
        await page.evaluate(
            """() => {
              window.errors = [];
              window.client = BomStream.open({
                bomId: "b1", onError: (e) => window.errors.push(e.code) });
            }"""
        )
        await wait_until(page, "window.client.eventCount >= 1")
        await asyncio.sleep(1.5)  # 15 retry intervals
        mode = await page.evaluate("window.client.mode")
        errors = await page.evaluate("window.errors")
        if reconnects:
            assert len(requests) >= 3
            assert requests[1:3] == ["e1", "e2"]
            assert mode == "sse" and errors == []
        else:
            assert requests == [None]
            assert mode == "closed" and errors == [reason]
    finally:
        await runner.cleanup()


async def test_monitor_without_a_bom_asks_for_one_and_opens_it(
    browser: Browser, gateway: RunningGateway
) -> None:
    page = await browser.new_page(viewport={"width": 360, "height": 640})
    log = RequestLog()
    log.attach(page)
    await page.goto(f"{gateway.url}/monitor")
    field = page.get_by_label("BOM id")
    assert await field.is_visible()
    assert await page.is_hidden("#monitor")
    assert log.to("/api/enrichment/") == []
    await field.fill("bom-from-form")
    await page.get_by_role("button", name="Open monitor").click()
    await page.wait_for_selector('#connection[data-conn="live"]', timeout=WAIT_MS)
    assert await page.inner_text("#bom-id") == "bom-from-form"
    assert "/api/enrichment/stream/bom-from-form" in log.to("/api/enrichment/stream/")[0].url
