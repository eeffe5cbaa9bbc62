"""``POST /api/enrichment/tickets``: trade a token (in a header) for a stream ticket."""

from __future__ import annotations

import asyncio

import orjson
from aiohttp import web

from bomstream.errors import ApiError, json_response
from bomstream.events import is_valid_bom_id
from bomstream.multi.selection import ORG_SCOPE, checked_ids
from bomstream.state import GATEWAY
from bomstream.tickets import Grant, TicketStoreFull, TicketStoreUnavailable

# Room for a list of limits.max_boms_per_stream (at most 200) ids of 128 characters.
MAX_BODY_BYTES = 32 * 1024


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
    grant, named = _grant(body, gw.cfg.limits.max_boms_per_stream)
    await asyncio.gather(*(gw.recall.ensure(bom_id) for bom_id in grant.boms))
    for bom_id in grant.boms:
        owner = gw.hub.owner(bom_id)
        if principal.org is not None and owner is not None and owner != principal.org:
            raise ApiError(403, "forbidden", f"BOM {bom_id} belongs to another organization")
    tickets = gw.auth.tickets
    try:
        ticket = await tickets.issue(grant, principal)
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
        {"ticket": ticket, **named, "expires_in": tickets.ttl_s},
        status=201,
        headers={"Cache-Control": "no-store"},
    )


def _grant(body: object, max_boms: int) -> tuple[Grant, dict[str, object]]:
    """What the ticket opens (``bom_id``, ``bom_ids`` or ``scope``), as the answer names it."""
    named = len({"bom_id", "bom_ids", "scope"} & body.keys()) if isinstance(body, dict) else 0
    if not isinstance(body, dict) or named > 1:
        raise ApiError(
            400, "invalid_body", 'the body names one of "bom_id", "bom_ids" or "scope": "org"'
        )
    if "scope" in body:
        if body["scope"] != ORG_SCOPE:
            raise ApiError(400, "invalid_scope", "scope must be 'org'")
        return Grant(org_scope=True), {"scope": ORG_SCOPE}
    if "bom_ids" in body:
        ids = body["bom_ids"]
        if not isinstance(ids, list):
            raise ApiError(400, "invalid_bom_id", "bom_ids must be a list of BOM ids")
        boms = checked_ids(ids, max_boms)
        return Grant(frozenset(boms)), {"bom_ids": list(boms)}
    bom_id = body.get("bom_id")
    if not isinstance(bom_id, str) or not is_valid_bom_id(bom_id):
        raise ApiError(
            400, "invalid_bom_id", "bom_id must match ^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"
        )
    return Grant.one(bom_id), {"bom_id": bom_id}
