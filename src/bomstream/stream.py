"""``GET /api/enrichment/stream/{bom_id}``: the SSE stream.

The handler decides whether a stream may open, sends the headers, and hands
the transport to the hub, which writes every frame from then on. The handler
itself only waits for the stream to end and logs one line when it does.
"""

from __future__ import annotations

import asyncio
import logging
import time

from aiohttp import web

from bomstream.errors import ApiError
from bomstream.events import is_valid_bom_id
from bomstream.hub import CLIENT_GONE
from bomstream.logs import FIELDS
from bomstream.state import GATEWAY, Gateway

log = logging.getLogger("bomstream.stream")

SSE_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache, no-transform",
    "X-Accel-Buffering": "no",
}
RETRY_AFTER_S = "2"


def checked_bom_id(request: web.Request) -> str:
    bom_id = request.match_info["bom_id"]
    if not is_valid_bom_id(bom_id):
        raise ApiError(
            400, "invalid_bom_id", "bom_id must match ^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"
        )
    return bom_id


def last_event_id(request: web.Request) -> str | None:
    """The header wins over the ``last_event_id`` query parameter when both are given."""
    value = request.headers.get("Last-Event-ID")
    if value is None:
        value = request.query.get("last_event_id")
    return value or None


def _refuse(gw: Gateway, status: int, code: str, message: str, retry: bool = False) -> ApiError:
    gw.metrics.streams_opened.labels(str(status)).inc()
    return ApiError(status, code, message, {"Retry-After": RETRY_AFTER_S} if retry else None)


async def handle_stream(request: web.Request) -> web.StreamResponse:
    gw = request.app[GATEWAY]
    try:
        bom_id = checked_bom_id(request)
        principal = await gw.auth.authenticate_reader(request, bom_id)
    except ApiError as err:
        gw.metrics.streams_opened.labels(str(err.status)).inc()
        raise
    hub = gw.hub
    if hub.closing:
        raise _refuse(gw, 503, "shutting_down", "the gateway is shutting down", retry=True)
    if not gw.broker.healthy:
        raise _refuse(gw, 503, "broker_unavailable", "the event feed is down; retry shortly", True)
    if hub.stream_count >= gw.cfg.server.max_connections:
        raise _refuse(gw, 503, "too_many_streams", "the gateway is at its stream limit", True)
    org_limit = gw.cfg.limits.max_streams_per_org
    if org_limit and principal.org is not None and hub.streams_by_org[principal.org] >= org_limit:
        raise _refuse(
            gw, 429, "org_stream_limit", "too many open streams for this organization", True
        )

    after = last_event_id(request)
    access = hub.check_access(bom_id, principal, after)
    if access == "forbidden":
        raise _refuse(gw, 403, "forbidden", "this BOM belongs to another organization")
    if access == "finished":
        # EventSource stops reconnecting for good on 204.
        gw.metrics.streams_opened.labels("204").inc()
        gw.metrics.replay.labels("hit").inc()
        return web.Response(status=204)

    resp = web.StreamResponse(headers=SSE_HEADERS)
    # A stream ends by closing its connection (spec section 4), so the
    # connection is never reused; this also drops aiohttp's idle-keep-alive
    # timer, which would otherwise sit on every open stream.
    resp.force_close()
    request.protocol.keep_alive(False)
    await resp.prepare(request)
    transport = request.transport
    if transport is None or transport.is_closing():
        return resp
    opened = hub.open(bom_id, principal, after, transport)
    transport.write(opened.initial)
    gw.metrics.streams_opened.labels("ok").inc()
    log.info(
        "stream opened",
        extra={
            FIELDS: {
                "bom_id": bom_id,
                "org": principal.org or "*",
                "auth": principal.kind,
                "resumed": opened.resumed,
                "catchup_events": opened.catchup_events,
            }
        },
    )
    sub = opened.sub
    started = time.monotonic()
    reason: str | None = opened.end_reason
    sent = opened.catchup_events
    resumed = opened.resumed
    # The first bytes are sent; a stream that stays open for hours need not hold them.
    del opened
    try:
        if sub is not None:
            # Shielded: a client disconnect cancels this handler, and must not
            # cancel the future the hub resolves with the reason.
            reason = await asyncio.shield(sub.done)
    finally:
        if sub is not None:
            hub.detach(sub)
            reason = sub.reason or CLIENT_GONE
            sent = hub.events_sent(sub)
        log.info(
            "stream closed",
            extra={
                FIELDS: {
                    "bom_id": bom_id,
                    "org": principal.org or "*",
                    "reason": reason,
                    "resumed": resumed,
                    "events_sent": sent,
                    "duration_s": round(time.monotonic() - started, 3),
                }
            },
        )
    if not transport.is_closing():
        await resp.write_eof()
    return resp
