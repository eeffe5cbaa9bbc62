"""The index page and BomStream.openMany in a real headless Chromium against
real gateways (in-process, and a process restarted on its own port), fed by
the demo's enrichment simulator: many BOMs over one stream (spec section 9)."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from playwright.async_api import Browser, Page, Route

from bomstream.publisher import AsyncPublisher
from bomstream.simulator import SimulatedBom, run_job, run_rounds
from tests.browser import Publisher, RequestLog, chromium, contrast_ratios, screenshot, wait_until
from tests.conftest import StartGateway, open_stream, progress
from tests.gateway_proc import GatewayProcess
from tests.redis_proc import RedisProcess
from tests.waiting import eventually

pytestmark = pytest.mark.timeout(120)

WAIT_MS = 30_000
ADMIN = "index-live-admin"
TERMINAL = ("enrichment.completed", "enrichment.failed")

# Every event id and percent each row shows, in the order the page showed
# them: an event applied twice shows up twice.
RECORD_ROWS = """
window.__rows = {};
document.addEventListener("DOMContentLoaded", () => {
  const body = document.getElementById("boms-body");
  if (!body) return;
  new MutationObserver((records) => {
    // Records arrive in batches, after the fact: a record holds the value
    // before its change, so each value set is the next record's old value,
    // or, for the last one, the value now.
    const later = new Map();
    const values = [];
    for (let i = records.length - 1; i >= 0; i--) {
      const r = records[i];
      const key = r.attributeName + " " + r.target.closest("tr").dataset.bom;
      values[i] = later.has(key) ? later.get(key) : r.target.getAttribute(r.attributeName);
      later.set(key, r.oldValue);
    }
    records.forEach((r, i) => {
      const bom = r.target.closest("tr").dataset.bom;
      const row = window.__rows[bom] || (window.__rows[bom] = { events: [], percents: [] });
      if (r.attributeName === "data-event") row.events.push(values[i]);
      else row.percents.push(Number(values[i]));
    });
  }).observe(body, { subtree: true, attributes: true, attributeOldValue: true,
                     attributeFilter: ["data-event", "aria-valuenow"] });
});
"""
ALL_FINISHED = (
    "document.querySelectorAll('#boms-body tr[data-status=completed],"
    " #boms-body tr[data-status=failed]').length === {n}"
)


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with chromium() as b:
        yield b


def fleet(n: int) -> list[SimulatedBom]:
    """``n`` BOMs of different sizes; the fourth fails part way."""
    boms = [
        SimulatedBom(
            f"fleet-{i:02d}",
            f"fleet-{i:02d}.csv",
            10 + (i * 7) % 41,
            batch_size=4 + i % 5,
            fail_rate=0.05,
            not_found_rate=0.05,
        )
        for i in range(n)
    ]
    if n > 3:
        boms[3] = SimulatedBom("fleet-03", "fleet-03.csv", 30, batch_size=5, fail_job_at=0.5)
    return boms


def completed(bom_id: str) -> dict[str, Any]:
    event = progress(bom_id, 10, total=10, event_id=f"{bom_id}-done")
    event.update(event_type="enrichment.completed")
    event["state"].update(status="completed")
    return event


def by_bom(sent: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for event in sent:
        out[event["bom_id"]].append(event)
    return out


async def open_index(browser: Browser, url: str) -> tuple[Page, RequestLog]:
    page = await browser.new_page(viewport={"width": 1280, "height": 1400})
    await page.add_init_script(RECORD_ROWS)
    log = RequestLog()
    log.attach(page)
    await page.goto(url)
    return page, log


async def rows(page: Page) -> dict[str, dict[str, list[Any]]]:
    recorded: dict[str, dict[str, list[Any]]] = await page.evaluate("window.__rows")
    return recorded


async def check_row_shows(page: Page, bom_id: str, final: dict[str, Any]) -> None:
    row = f'tr[data-bom="{bom_id}"]'
    state = final["state"]
    status = "failed" if final["event_type"] == "enrichment.failed" else "completed"
    assert await page.get_attribute(row, "data-status") == status
    assert await page.get_attribute(row, "data-event") == final["event_id"]
    shown = int(min(100.0, state["percent_complete"]))
    assert await page.inner_text(f"{row} .pct") == f"{shown} %"
    items = await page.inner_text(f"{row} .items")
    assert items.startswith(f"{state['enriched_items']} of {state['total_items']} parts enriched")


async def test_index_shows_twenty_boms_live_over_one_stream_then_only_that_stream_stays(
    browser: Browser, gateway_factory: StartGateway, http: aiohttp.ClientSession
) -> None:
    gateway = await gateway_factory(server__heartbeat_s=1)
    page, log = await open_index(browser, f"{gateway.url}/")
    await page.wait_for_selector('#connection[data-conn="live"]', timeout=WAIT_MS)
    await page.wait_for_selector("text=No BOMs yet", timeout=WAIT_MS)

    boms = fleet(20)
    publisher = Publisher(http, gateway.url)
    run = asyncio.create_task(
        run_rounds(boms, publisher, speed=6, rounds=1, seed=20, stagger_s=0.6)
    )
    try:
        await wait_until(page, "document.querySelectorAll('#boms-body tr').length >= 12")
        await screenshot(page, "index-live-enriching.png")
    finally:
        await run
    await wait_until(page, ALL_FINISHED.format(n=20), timeout=30)
    await asyncio.sleep(0.4)  # the bars' 0.3 s transition
    await screenshot(page, "index-live-finished.png")

    sent = by_bom(publisher.sent)
    recorded = await rows(page)
    assert sorted(recorded) == sorted(b.bom_id for b in boms)
    for bom in boms:
        # Opened before any job started, the page saw every event live: each
        # once, in order, and the bar never went back.
        assert recorded[bom.bom_id]["events"] == [e["event_id"] for e in sent[bom.bom_id]]
        percents = recorded[bom.bom_id]["percents"]
        assert percents == sorted(percents), percents
        await check_row_shows(page, bom.bom_id, sent[bom.bom_id][-1])
    assert await page.inner_text("#boms-summary") == "20 BOMs · 0 enriching · 20 finished."
    assert await page.inner_text('tr[data-bom="fleet-03"] .badge') == "Failed"

    streams = log.to("/api/enrichment/stream")
    assert len(streams) == 1, [r.url for r in streams]
    assert "scope=org" in streams[0].url
    assert log.to("/api/enrichment/events") == []
    assert log.to("/api/enrichment/boms") == []

    # Finished is quiet: the one stream stays open and nothing else is asked.
    t0 = time.monotonic()
    await asyncio.sleep(4)  # four heartbeats
    assert [r.url for r in log.since(t0)] == []
    assert gateway.gateway.hub.stream_count == 1
    assert await page.evaluate("window.bomstreamClient.mode") == "sse"
    assert await page.evaluate("window.bomstreamClient.duplicates") == 0
    assert [r for r in await contrast_ratios(page) if r["ratio"] < 4.5] == []
    await page.set_viewport_size({"width": 360, "height": 780})
    overflow = await page.evaluate("document.documentElement.scrollWidth")
    assert overflow <= 360, f"page is {overflow}px wide at a 360px viewport"
    await screenshot(page, "index-live-360.png", full_page=False)


async def test_index_survives_a_gateway_restart_without_applying_any_event_twice(
    browser: Browser,
    redis_server: RedisProcess,
    gateways: list[GatewayProcess],
    http: aiohttp.ClientSession,
) -> None:
    gw = GatewayProcess(
        redis_url=redis_server.url,
        auth_admin_token=ADMIN,
        server_heartbeat_s=0.5,
        server_retry_ms=300,
        server_shutdown_grace_s=2,
    )
    gateways.append(gw)
    await gw.start(http)
    page, log = await open_index(browser, f"{gw.url}/?poll_ms=250&sse_retry_ms=1500#token={ADMIN}")
    await page.wait_for_selector('#connection[data-conn="live"]', timeout=WAIT_MS)

    boms = fleet(20)
    # Two BOMs whose jobs end while the gateway is down, and one whose whole
    # job runs then: nothing of them reaches the restarted gateway live.
    late = ["late-1", "late-2"]
    ghost = "ghost-1"
    sent: list[dict[str, Any]] = []
    # A worker publishing to Redis (history and channel), as in production:
    # it carries on while the gateway is down.
    async with AsyncPublisher(redis_server.url) as redis_publisher:

        async def publish(event: dict[str, Any]) -> None:
            await redis_publisher.publish(event["bom_id"], event)
            sent.append(event)

        for bom_id in late:
            await publish(progress(bom_id, 5, total=10))
        run = asyncio.create_task(
            run_rounds(boms, publish, speed=3, rounds=1, seed=21, stagger_s=0.5)
        )
        try:
            # Some jobs not started yet, most of them far from done.
            await wait_until(page, "Object.keys(window.__rows).length >= 10", timeout=30)
            ended = sum(e["event_type"] in TERMINAL for e in sent)
            gw.stop()
            await publish(progress(ghost, 3, total=10))
            for bom_id in [*late, ghost]:
                await publish(completed(bom_id))
            gw.env["BOMSTREAM_SERVER_PORT"] = str(gw.port)
            await gw.start(http)
        finally:
            await run
    assert ended <= 10, "the restart must come while most jobs run"
    per_bom = by_bom(sent)
    await wait_until(page, ALL_FINISHED.format(n=23), timeout=40)

    recorded = await rows(page)
    for bom_id in [b.bom_id for b in boms] + late + [ghost]:
        published = [e["event_id"] for e in per_bom[bom_id]]
        shown = recorded[bom_id]["events"]
        assert len(shown) == len(set(shown)), f"{bom_id}: an event was applied twice"
        # In publication order, with at most the restart's gap left out.
        positions = [published.index(e) for e in shown]
        assert positions == sorted(positions), bom_id
        assert shown[-1] == published[-1]
        percents = recorded[bom_id]["percents"]
        assert percents == sorted(percents), (bom_id, percents)
        await check_row_shows(page, bom_id, per_bom[bom_id][-1])

    streams = log.to("/api/enrichment/stream")
    assert len(streams) >= 2, [r.url for r in streams]
    # Every reopen that reached the gateway carried the cursor: the
    # browser's own Last-Event-ID, or the query of a stream opened anew.
    reached = [r for r in streams[1:] if r.failure is None]
    assert reached, [(r.url, r.failure) for r in streams]
    for req in reached:
        headers = await req.all_headers()
        assert headers.get("last-event-id") or "last_event_id=" in req.url, req.url
    await screenshot(page, "index-live-after-restart.png")


async def test_index_falls_back_to_polling_the_org_when_the_gateway_serves_no_streams(
    browser: Browser, gateway_factory: StartGateway, http: aiohttp.ClientSession
) -> None:
    gateway = await gateway_factory(server__disable_stream=True)
    async with http.get(f"{gateway.url}/api/enrichment/stream?scope=org") as resp:
        assert resp.status == 404  # the route is not there at all
    page, log = await open_index(
        browser, f"{gateway.url}/?poll_ms=250&fallback_after=3&sse_retry_ms=1500"
    )
    await page.wait_for_selector('#connection[data-conn="polling"]', timeout=WAIT_MS)
    assert await page.inner_text("#connection-text") == "Polling every 0.25 s"
    first_poll = next(t for t, r in log.entries if "/api/enrichment/events" in r.url)
    assert len([r for t, r in log.entries if "/stream" in r.url and t < first_poll]) == 3

    boms = fleet(6)
    publisher = Publisher(http, gateway.url)
    polling_from = time.monotonic()
    await run_rounds(boms, publisher, speed=6, rounds=1, seed=6, stagger_s=0.3)
    await wait_until(page, ALL_FINISHED.format(n=6), timeout=20)
    elapsed = time.monotonic() - polling_from

    sent = by_bom(publisher.sent)
    recorded = await rows(page)
    for bom in boms:
        shown = recorded[bom.bom_id]["events"]
        assert len(shown) == len(set(shown)), bom.bom_id
        await check_row_shows(page, bom.bom_id, sent[bom.bom_id][-1])
    polls = log.to("/api/enrichment/events", since=polling_from)
    # One request per interval for every BOM at once, from the last cursor.
    assert all("scope=org" in r.url and "/events?" in r.url for r in polls)
    assert len(polls) <= elapsed / 0.25 + 5, (len(polls), elapsed)
    assert sum("after=" in r.url for r in polls) >= len(polls) - 1
    assert log.to("/api/enrichment/boms") == []
    await asyncio.sleep(0.4)  # the bars' 0.3 s transition
    await screenshot(page, "index-polling.png")


async def test_open_many_closes_once_every_bom_is_finished_and_then_asks_nothing(
    browser: Browser, gateway_factory: StartGateway, http: aiohttp.ClientSession
) -> None:
    gateway = await gateway_factory(server__heartbeat_s=1)
    page = await browser.new_page()
    log = RequestLog()
    log.attach(page)

    async def blank(route: Route) -> None:
        # A page of the gateway's origin that includes the client and nothing else.
        scripts = "".join(
            f'<script src="/static/{name}"></script>'
            for name in ("bomstream-connection.js", "bomstream.js", "bomstream-many.js")
        )
        await route.fulfill(content_type="text/html", body=f"<!doctype html>{scripts}")

    await page.route(f"{gateway.url}/blank", blank)
    await page.goto(f"{gateway.url}/blank")
    boms = fleet(4)[:3]
    await page.evaluate(
        """(ids) => {
          window.done = [];
          window.client = BomStream.openMany({ bomIds: ids,
            onComplete: (state, bomId) => window.done.push(bomId) });
        }""",
        [b.bom_id for b in boms],
    )
    await wait_until(page, "window.client.connected")
    publisher = Publisher(http, gateway.url)
    rng = random.Random(4)
    await asyncio.gather(*(run_job(b, publisher, random.Random(rng.random()), 6) for b in boms))
    await wait_until(page, "window.client.mode === 'closed'", timeout=20)

    assert sorted(await page.evaluate("window.done")) == sorted(b.bom_id for b in boms)
    assert await page.evaluate("window.client.finishReason") == "finished"
    assert await page.evaluate("window.client.eventCount") == len(publisher.sent)
    assert len(log.to("/api/enrichment/stream")) == 1
    t0 = time.monotonic()
    await asyncio.sleep(5)
    assert [r.url for r in log.since(t0)] == []
    assert gateway.gateway.hub.stream_count == 0


async def test_index_lists_the_boms_when_the_gateway_serves_no_multi_bom_streams(
    browser: Browser,
    gateway_factory: StartGateway,
    redis_server: RedisProcess,
    http: aiohttp.ClientSession,
) -> None:
    # Per-BOM subscriptions (as on a Redis Cluster) refuse streams of several BOMs.
    gateway = await gateway_factory(redis__url=redis_server.url, redis__subscribe="interest")

    async def health() -> int:
        async with http.get(f"{gateway.url}/api/enrichment/health") as resp:
            return resp.status

    await eventually(health, lambda status: status == 200, timeout=10)
    async with http.get(f"{gateway.url}/api/enrichment/events?scope=org") as resp:
        assert resp.status == 400 and (await resp.json())["code"] == "multi_unavailable"
    publisher = Publisher(http, gateway.url)
    async with contextlib.AsyncExitStack() as watching:
        # This mode holds only what its clients watch: a monitor each.
        for bom in fleet(3):
            stream = await watching.enter_async_context(open_stream(http, gateway.url, bom.bom_id))
            assert (await stream.next_event()).event == "connected"
            await run_job(bom, publisher, random.Random(bom.items), speed=20)
    page, log = await open_index(browser, f"{gateway.url}/?poll_ms=250")
    await page.wait_for_selector('#connection[data-conn="polling"]', timeout=WAIT_MS)
    assert await page.inner_text("#connection-text") == "Refreshed every 5 s"
    sent = by_bom(publisher.sent)
    for bom_id, events in sent.items():
        await check_row_shows(page, bom_id, events[-1])
    assert await page.inner_text("#boms-summary") == "3 BOMs · 0 enriching · 3 finished."
    assert len(log.to("/api/enrichment/boms")) == 1
