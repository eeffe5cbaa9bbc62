"""The request/response endpoints: publish, polling fallback, health, metrics."""

from __future__ import annotations

import hmac
import logging
import os
import time

import orjson
from aiohttp import web
from redis.exceptions import RedisError

from bomstream.errors import ApiError, json_response
from bomstream.events import Event, EventRejected, parse_event
from bomstream.logs import FIELDS
from bomstream.state import GATEWAY
from bomstream.stream import checked_bom_id
from bomstream.tickets import Grant

log = logging.getLogger("bomstream.api")

DEFAULT_POLL_LIMIT = 100
MAX_POLL_LIMIT = 1000


async def handle_publish(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    bom_id = checked_bom_id(request)
    principal = gw.auth.authenticate(request, publish=True)
    if not principal.can_publish:
        raise ApiError(403, "forbidden", "this token may not publish events")
    max_bytes = gw.cfg.limits.max_event_bytes
    if request.content_length is not None and request.content_length > max_bytes:
        gw.metrics.events_dropped.labels("too_large").inc()
        raise ApiError(413, "too_large", f"event is larger than {max_bytes} bytes")
    raw = await request.read()
    try:
        event = parse_event(
            raw, bom_id, max_bytes=max_bytes, terminal_types=gw.cfg.events.terminal_types
        )
    except EventRejected as exc:
        gw.metrics.events_dropped.labels(exc.code).inc()
        gw.http_drops.drop(exc.code)
        raise ApiError(exc.status, exc.code, exc.message) from None
    if principal.org is not None and event.org != principal.org:
        # A service token scoped to one org publishes for that org alone.
        raise ApiError(
            403, "forbidden", "this token may only publish its own organization's events"
        )
    try:
        await gw.broker.publish(event)
    except (RedisError, OSError) as exc:
        log.warning("publish failed: %s", type(exc).__name__, extra={FIELDS: {"bom_id": bom_id}})
        raise ApiError(
            503, "broker_unavailable", "the event broker is unavailable", {"Retry-After": "2"}
        ) from None
    return json_response({"event_id": event.event_id}, status=202)


def parse_limit(text: str | None) -> int:
    if text is None:
        return DEFAULT_POLL_LIMIT
    if not text.isdigit() or not 1 <= int(text) <= MAX_POLL_LIMIT:
        raise ApiError(400, "invalid_limit", f"limit must be an integer from 1 to {MAX_POLL_LIMIT}")
    return int(text)


async def handle_poll(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    bom_id = checked_bom_id(request)
    principal = await gw.auth.authenticate_reader(request, Grant.one(bom_id))
    limit = parse_limit(request.query.get("limit"))
    after = request.query.get("after") or None
    await gw.recall.ensure(bom_id)
    owner = gw.hub.owner(bom_id)
    if principal.org is not None and owner is not None and owner != principal.org:
        raise ApiError(403, "forbidden", "this BOM belongs to another organization")
    org = principal.org
    held = gw.hub.held(bom_id)
    visible: list[Event] = [e for e in held if org is None or e.org == org]
    start = 0
    resumed = False
    if after is not None:
        for i, ev in enumerate(visible):
            if ev.event_id == after:
                start, resumed = i + 1, True
                break
    page = visible[start : start + limit]
    latest = visible[-1] if visible else None
    state = orjson.loads(latest.data).get("state") if latest is not None else None
    last_id = page[-1].event_id if page else after
    # The run is over when the BOM's last event is terminal, even one this
    # caller may not see; the page is final when nothing visible follows it.
    terminal = bool(held) and held[-1].terminal and start + len(page) >= len(visible)
    body = {
        "bom_id": bom_id,
        "state": state,
        "events": [orjson.Fragment(e.data) for e in page],
        "last_event_id": last_id,
        "resumed": resumed,
        "terminal": terminal,
    }
    return json_response(body)


async def handle_health(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    healthy = gw.broker.healthy
    body = {
        "status": "healthy" if healthy else "unhealthy",
        "redis": gw.broker.status,
        "history": gw.recall.status,
        "streams": gw.hub.stream_count,
        "boms": gw.hub.bom_count,
        "uptime_s": round(time.monotonic() - gw.started_at, 1),
        # Which process answered: several workers share one port.
        "worker": gw.worker,
        "pid": os.getpid(),
    }
    return json_response(body, status=200 if healthy else 503)


async def handle_metrics(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    token = gw.cfg.metrics.token
    if token:
        header = request.headers.get("Authorization", "")
        given = header[7:] if header.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(given.encode(), token.encode()):
            raise ApiError(401, "unauthorized", "metrics need the metrics token")
    return web.Response(
        body=gw.metrics.render(),
        headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"},
    )
