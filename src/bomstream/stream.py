"""``GET /api/enrichment/stream/{bom_id}``: the SSE stream.

The handler decides whether a stream may open, sends the headers, and hands
the transport to the hub, which writes every frame from then on. The
connection itself is then handed over from aiohttp to an :class:`OpenStream`,
which waits for the stream to end, ends the response and logs one line; the
request, its parser and its tasks are freed as soon as the headers are sent.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from aiohttp import web

from bomstream.channel import Opened, Subscriber
from bomstream.errors import ApiError, error_response
from bomstream.events import is_valid_bom_id
from bomstream.hub import CLIENT_GONE
from bomstream.logs import FIELDS
from bomstream.principal import Principal
from bomstream.protocol import GatewayProtocol
from bomstream.state import GATEWAY, Gateway
from bomstream.tickets import Grant

log = logging.getLogger("bomstream.stream")

SSE_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache, no-transform",
    "X-Accel-Buffering": "no",
}
RETRY_AFTER_S = "2"
# The end of a chunked response.
LAST_CHUNK = b"0\r\n\r\n"


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


def _refuse(status: int, code: str, message: str, retry: bool = False) -> ApiError:
    return ApiError(status, code, message, {"Retry-After": RETRY_AFTER_S} if retry else None)


def refuse_when_full(gw: Gateway, principal: Principal) -> None:
    """The refusals every stream kind shares: shutting down, no feed, at a limit."""
    hub = gw.hub
    if hub.closing:
        raise _refuse(503, "shutting_down", "the gateway is shutting down", retry=True)
    if not gw.broker.healthy:
        raise _refuse(503, "broker_unavailable", "the event feed is down; retry shortly", True)
    if hub.stream_count >= gw.cfg.server.max_connections:
        raise _refuse(503, "too_many_streams", "the gateway is at its stream limit", True)
    org_limit = gw.cfg.limits.max_streams_per_org
    if org_limit and principal.org is not None and hub.streams_by_org[principal.org] >= org_limit:
        raise _refuse(429, "org_stream_limit", "too many open streams for this organization", True)


async def _admit(request: web.Request, gw: Gateway) -> tuple[str, Principal, str | None] | None:
    """Whether a stream may open: its BOM, caller and resume point, or None
    when the caller already holds the BOM's terminal event."""
    bom_id = checked_bom_id(request)
    principal = await gw.auth.authenticate_reader(request, Grant.one(bom_id))
    refuse_when_full(gw, principal)
    hub = gw.hub
    after = last_event_id(request)
    # A BOM this instance cannot answer for alone is loaded from shared
    # history first; every decision below is then the buffer's, as always.
    # False: interest mode, and the BOM's Redis subscription cannot be made.
    if not await gw.recall.ensure(bom_id):
        raise _refuse(503, "broker_unavailable", "the event feed is down; retry shortly", True)
    access = hub.check_access(bom_id, principal, after)
    if access == "forbidden":
        raise _refuse(403, "forbidden", "this BOM belongs to another organization")
    if access == "finished":
        return None
    return bom_id, principal, after


async def handle_stream(request: web.Request) -> web.StreamResponse:
    """Answers its own refusals (see :func:`error_middleware`)."""
    gw = request.app[GATEWAY]
    try:
        admitted = await _admit(request, gw)
    except ApiError as err:
        gw.metrics.streams_opened.labels(str(err.status)).inc()
        return error_response(err)
    if admitted is None:
        # EventSource stops reconnecting for good on 204.
        gw.metrics.streams_opened.labels("204").inc()
        gw.metrics.replay.labels("hit").inc()
        return web.Response(status=204)
    bom_id, principal, after = admitted
    del admitted
    hub = gw.hub
    return await start_stream(
        request, gw, principal, bom_id, lambda t: hub.open(bom_id, principal, after, t)
    )


async def start_stream(
    request: web.Request,
    gw: Gateway,
    principal: Principal,
    label: str,
    open_stream: Callable[[asyncio.WriteTransport], Opened],
    fields: dict[str, object] | None = None,
) -> web.StreamResponse:
    """Send a stream's headers, open it in the hub (``open_stream``) and hand
    its connection over. ``label``: the log lines' ``bom_id``; ``fields``: more for them."""
    protocol = request.protocol
    if not isinstance(protocol, GatewayProtocol):
        raise TypeError("the stream route needs the gateway's runner (bomstream.server.start)")
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
    hub = gw.hub
    opened = open_stream(transport)
    transport.write(opened.initial)
    gw.metrics.streams_opened.labels("ok").inc()
    resumed = opened.resumed
    log.info(
        "stream opened",
        extra={
            FIELDS: {
                "bom_id": label,
                **(fields or {}),
                "org": principal.org or "*",
                "auth": principal.kind,
                "resumed": resumed,
                "catchup_events": opened.catchup_events,
            }
        },
    )
    sub = opened.sub
    if sub is None:
        _log_closed(label, principal, opened.end_reason, resumed, opened.catchup_events, 0.0)
        if not transport.is_closing():
            await resp.write_eof()
        return resp
    # The first bytes are sent; a stream that stays open for hours need not hold them.
    del opened
    # Wait for the end on the connection itself, not in this handler: it
    # returns now, and aiohttp lets go of the request and the connection.
    conn = OpenStream(gw, sub, resumed)
    sub.on_end = conn.ended
    try:
        protocol.hand_over(conn)
    except ConnectionResetError:
        hub.detach(sub)  # as client_disconnected; conn.ended logs it
        return resp
    gw.handed_over.opened()
    return resp


class OpenStream(asyncio.Protocol):
    """A stream's connection once its headers are sent. The hub writes every
    frame to the transport; this learns of the client going away, and ends
    the response and closes the connection when the stream ends."""

    __slots__ = ("_gw", "_resumed", "_sub")

    def __init__(self, gw: Gateway, sub: Subscriber, resumed: bool) -> None:
        self._gw = gw
        self._sub = sub
        self._resumed = resumed

    def data_received(self, data: bytes) -> None:
        # A stream request has no body; whatever else a client sends is ignored.
        pass

    def eof_received(self) -> bool:
        return False  # the client is done: close, which ends the stream below

    def connection_lost(self, exc: BaseException | None) -> None:
        self._gw.hub.detach(self._sub)  # ends it as client_disconnected if still open
        self._gw.handed_over.closed()

    def ended(self) -> None:
        sub = self._sub
        transport = sub.transport
        if not transport.is_closing():
            transport.write(LAST_CHUNK)
            transport.close()
        _log_closed(
            sub.bom_id,
            sub.principal,
            sub.reason or CLIENT_GONE,
            self._resumed,
            self._gw.hub.events_sent(sub),
            time.monotonic() - sub.opened_at,
        )


def _log_closed(
    bom_id: str,
    principal: Principal,
    reason: str | None,
    resumed: bool,
    sent: int,
    duration_s: float,
) -> None:
    log.info(
        "stream closed",
        extra={
            FIELDS: {
                "bom_id": bom_id,
                "org": principal.org or "*",
                "reason": reason,
                "resumed": resumed,
                "events_sent": sent,
                "duration_s": round(duration_s, 3),
            }
        },
    )
