"""``POST /api/enrichment/tickets``: trade a token (in a header) for a stream ticket."""

from __future__ import annotations

import orjson
from aiohttp import web

from bomstream.errors import ApiError, json_response
from bomstream.events import is_valid_bom_id
from bomstream.state import GATEWAY
from bomstream.tickets import TicketStoreFull, TicketStoreUnavailable

MAX_BODY_BYTES = 1024


async def handle_ticket(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    # The token must come in the header: the point of a ticket is to keep
    # tokens out of URLs.
    principal = gw.auth.authenticate(request, header_only=True)
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        raise ApiError(413, "too_large", f"request body is larger than {MAX_BODY_BYTES} bytes")
    raw = await request.content.read(MAX_BODY_BYTES + 1)
    if len(raw) > MAX_BODY_BYTES:
        raise ApiError(413, "too_large", f"request body is larger than {MAX_BODY_BYTES} bytes")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise ApiError(400, "invalid_json", 'body must be JSON: {"bom_id": "..."}') from None
    bom_id = body.get("bom_id") if isinstance(body, dict) else None
    if not isinstance(bom_id, str) or not is_valid_bom_id(bom_id):
        raise ApiError(
            400, "invalid_bom_id", "bom_id must match ^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"
        )
    await gw.recall.ensure(bom_id)
    owner = gw.hub.owner(bom_id)
    if principal.org is not None and owner is not None and owner != principal.org:
        raise ApiError(403, "forbidden", "this BOM belongs to another organization")
    tickets = gw.auth.tickets
    try:
        ticket = await tickets.issue(bom_id, principal)
    except TicketStoreFull:
        raise ApiError(
            429, "too_many_tickets", "too many outstanding tickets", {"Retry-After": "5"}
        ) from None
    except TicketStoreUnavailable:
        raise ApiError(
            503,
            "ticket_store_unavailable",
            "tickets cannot be issued right now",
            {"Retry-After": "2"},
        ) from None
    return json_response(
        {"ticket": ticket, "bom_id": bom_id, "expires_in": tickets.ttl_s},
        status=201,
        headers={"Cache-Control": "no-store"},
    )
