"""Structured logs of a real gateway process: JSON lines, one per stream open and
close, Redis and dropped-input lines, and never a token or an event's payload."""

from __future__ import annotations

import json
import logging
import signal

import aiohttp
import pytest

from bomstream.logs import FIELDS, DropReporter
from tests.conftest import StartGateway, open_stream, progress, publish
from tests.gateway_proc import GatewayProcess
from tests.metrics_scrape import parse, value
from tests.redis_proc import RedisProcess
from tests.waiting import eventually

ADMIN = "adm-7f3c9e1b-never-logged"
WRONG = "wrong-token-5d2a-never-logged"
MARKER = "payload-marker-91b4-never-logged"


async def test_json_log_lines_describe_streams_and_never_hold_tokens_or_payloads(
    redis_server: RedisProcess, http: aiohttp.ClientSession
) -> None:
    gw = GatewayProcess(
        "--log-format",
        "json",
        redis_url=redis_server.url,
        auth_admin_token=ADMIN,
        server_access_log="true",
    )
    try:
        await gw.start(http)
        url = f"{gw.url}/api/enrichment/stream/bom-l?token={ADMIN}"
        async with http.get(url) as resp:
            assert resp.status == 200
            from tests.sse import SSEStream

            s = SSEStream(resp)
            assert (await s.next_event()).event == "connected"
            for n in range(1, 11):
                event = progress("bom-l", n, payload={"secret": MARKER}, state={"note": MARKER})
                redis_server.publish("enrichment:bom-l", json.dumps(event))
            redis_server.publish("enrichment:bom-l", "{" + MARKER)
            await publish(
                http, gw.url, "bom-l", progress("bom-l", 11, payload={"m": MARKER}), token=ADMIN
            )
            ids = [(await s.next_event()).id for _ in range(11)]
            assert ids == [f"bom-l-e{n}" for n in range(1, 12)]
        async with open_stream(http, gw.url, "bom-l", token=WRONG, expect=401):
            pass
        await publish(http, gw.url, "bom-l", ("[" + MARKER).encode(), token=ADMIN, expect=400)
        async with http.get(f"{gw.url}/api/enrichment/events/bom-l?limit=2&token={ADMIN}") as r:
            assert r.status == 200

        def closed_lines() -> list[dict[str, object]]:
            return [line for line in gw.json_log() if line["msg"] == "stream closed"]

        async def probe() -> list[dict[str, object]]:
            return closed_lines()

        await eventually(probe, bool)
        gw.signal(signal.SIGTERM)
        assert await gw.wait(timeout=10) == 0

        text = gw.log_text()
        lines = gw.json_log()  # every line is one JSON object
        assert ADMIN not in text
        assert WRONG not in text
        assert MARKER not in text
        # Nothing per event at info: no event id shows up in any line.
        assert "bom-l-e" not in text
        assert {line["level"] for line in lines} <= {"info", "warning"}

        by_msg: dict[str, list[dict[str, object]]] = {}
        for line in lines:
            by_msg.setdefault(str(line["msg"]), []).append(line)
        (opened,) = by_msg["stream opened"]
        assert opened["bom_id"] == "bom-l"
        assert opened["org"] == "*"
        assert opened["auth"] == "admin"
        assert opened["resumed"] is False
        (closed,) = by_msg["stream closed"]
        assert closed["bom_id"] == "bom-l"
        assert closed["reason"] == "client_disconnected"
        assert closed["events_sent"] == 11
        assert isinstance(closed["duration_s"], float)
        assert by_msg["redis feed subscribed"][0]["redis"] == f"127.0.0.1:{redis_server.port}"
        drops = by_msg["dropped 1 bad events from redis"]
        assert drops[0]["reasons"] == {"invalid_json": 1}
        polls = [line for line in by_msg["request"] if "/events/" in str(line["path"])]
        # The accepted publish (one event) is below info; the poll is logged, redacted.
        assert [(line["method"], line["status"], line["path"]) for line in polls] == [
            ("POST", 400, "/api/enrichment/events/bom-l"),
            ("GET", 200, "/api/enrichment/events/bom-l?limit=2&token=[redacted]"),
        ]
        assert by_msg["dropped 1 bad events from http"][0]["reasons"] == {"invalid_json": 1}
        assert by_msg["bomstream stopped"]
    finally:
        gw.close()


async def test_text_log_is_the_default_and_carries_the_same_fields(
    http: aiohttp.ClientSession,
) -> None:
    gw = GatewayProcess()
    try:
        await gw.start(http)
        async with open_stream(http, gw.url, "bom-t") as s:
            assert (await s.next_event()).event == "connected"

        async def log_text() -> str:
            return gw.log_text()

        # The client has gone; the gateway notices on its own schedule.
        await eventually(log_text, lambda text: "stream closed" in text)
        gw.signal(signal.SIGTERM)
        assert await gw.wait(timeout=10) == 0
        text = gw.log_text()
        opened = [line for line in text.splitlines() if "stream opened" in line]
        assert len(opened) == 1
        assert "bom_id=bom-t" in opened[0]
        assert "org=*" in opened[0]
        closed = [line for line in text.splitlines() if "stream closed" in line]
        assert len(closed) == 1
        assert "reason=client_disconnected" in closed[0]
    finally:
        gw.close()


async def test_redis_feed_loss_is_logged_once_and_the_return_again(
    gateway_factory: StartGateway,
    redis_server: RedisProcess,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="bomstream.redis")
    gw = await gateway_factory(
        redis__url=redis_server.url, redis__backoff_initial_s=0.02, redis__backoff_max_s=0.05
    )
    broker = gw.gateway.broker

    async def healthy() -> bool:
        return broker.healthy

    await eventually(healthy, bool)
    redis_server.kill()
    await eventually(healthy, lambda ok: not ok)
    metrics = gw.gateway.metrics

    async def attempts() -> float:
        return value(parse(metrics.render().decode()), "bomstream_redis_reconnects_total")

    await eventually(attempts, lambda n: n >= 5)  # several failed retries
    redis_server.start()
    await eventually(healthy, bool)
    messages = [r.getMessage() for r in caplog.records if r.name == "bomstream.redis"]
    assert [m for m in messages if m.startswith("redis feed lost")] == [
        "redis feed lost: Redis closed the connection"
    ]
    assert messages.count("redis feed subscribed") == 2


async def test_a_burst_of_bad_input_is_reported_in_full_without_a_line_per_message(
    caplog: pytest.LogCaptureFixture,
) -> None:
    logger = logging.getLogger("bomstream.test-drops")
    caplog.set_level(logging.WARNING, logger=logger.name)
    reporter = DropReporter(logger, "redis", interval=0.05)
    for _ in range(30):
        reporter.drop("invalid_json")
    for _ in range(20):
        reporter.drop("too_large")

    async def reported() -> int:
        return len(caplog.records)

    await eventually(reported, lambda n: n >= 2, timeout=2)
    fields = [getattr(r, FIELDS)["reasons"] for r in caplog.records]
    assert fields == [{"invalid_json": 1}, {"invalid_json": 29, "too_large": 20}]
