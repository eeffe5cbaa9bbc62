"""``GET /api/enrichment/stream`` and ``GET /api/enrichment/events`` for several
BOMs (``?bom_id=A&bom_id=B...``) or an org (``?scope=org``)."""

from __future__ import annotations

import asyncio

import orjson
from aiohttp import web

from bomstream.errors import ApiError, error_response, json_response
from bomstream.http_api import parse_limit
from bomstream.multi.cursor import cursor_of, multi_data, parse_cursor
from bomstream.multi.selection import Selection, from_query
from bomstream.principal import Principal
from bomstream.state import GATEWAY, Gateway
from bomstream.stream import last_event_id, refuse_when_full, start_stream

# A resume point that names nothing this process can place: every BOM then
# gets its snapshot and is reported as a gap.
UNPLACEABLE = ("", "")


def _anchor(text: str | None) -> tuple[str, str] | None:
    if not text:
        return None
    return parse_cursor(text) or UNPLACEABLE


async def _admit(
    request: web.Request, gw: Gateway, resume_from: str | None, stream: bool
) -> tuple[Selection, Principal, tuple[str, str] | None]:
    cfg = gw.cfg
    selection = from_query(request.query, cfg.limits.max_boms_per_stream)
    if cfg.redis.url and cfg.redis.interest:
        raise ApiError(
            400,
            "multi_unavailable",
            'streams of several BOMs need redis.subscribe = "pattern" on this gateway',
        )
    principal = await gw.auth.authenticate_reader(request, selection.grant)
    if stream:
        refuse_when_full(gw, principal)
    anchor = _anchor(resume_from)
    boms = selection.boms
    # Shared history fills in what this process has not seen of each BOM; for
    # an org, of its most recently updated BOMs (history's index) and the one
    # the cursor names.
    if boms is not None:
        wanted = list(boms)
    else:
        wanted = await gw.recall.recent_boms(principal.org, cfg.limits.max_boms_per_stream)
        if anchor and anchor[0] and anchor[0] not in wanted:
            wanted.append(anchor[0])
    await asyncio.gather(*(gw.recall.ensure(bom_id) for bom_id in wanted))
    if principal.org is not None and boms is not None:
        for bom_id in boms:
            owner = gw.hub.owner(bom_id)
            if owner is not None and owner != principal.org:
                raise ApiError(403, "forbidden", f"BOM {bom_id} belongs to another organization")
    return selection, principal, anchor


async def handle_multi_stream(request: web.Request) -> web.StreamResponse:
    """Answers its own refusals, as the single-BOM stream does."""
    gw = request.app[GATEWAY]
    try:
        selection, principal, anchor = await _admit(request, gw, last_event_id(request), True)
    except ApiError as err:
        gw.metrics.streams_opened.labels(str(err.status)).inc()
        return error_response(err)
    boms = selection.boms
    hub = gw.hub
    return await start_stream(
        request,
        gw,
        principal,
        "*" if boms is not None else "org:*",
        lambda t: hub.open_multi(boms, principal, anchor, t),
        {"boms": len(boms) if boms is not None else "org"},
    )


async def handle_multi_poll(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    after = request.query.get("after") or None
    limit = parse_limit(request.query.get("limit"))
    selection, principal, anchor = await _admit(request, gw, after, False)
    plan, finished = gw.hub.poll_multi(selection.boms, principal.org, anchor)
    page = plan.events[:limit]
    body: dict[str, object] = (
        {"scope": "org"} if selection.boms is None else {"bom_ids": list(selection.boms)}
    )
    body.update(
        events=[orjson.Fragment(multi_data(e)) for e in page],
        cursor=cursor_of(page[-1]) if page else after,
        resumed=plan.resumed,
        gaps=plan.gaps,
        finished=finished,
    )
    return json_response(body)
