"""The browser side: the monitor and index pages, their static assets, and the
list of held BOMs that the index page reads.

Assets are read once when the app is built and served from memory with an
ETag, so a page load costs no disk access and a revisit is a 304.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources

import orjson
from aiohttp import web
from aiohttp.typedefs import Handler

from bomstream.errors import ApiError, json_response
from bomstream.state import GATEWAY

_CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
}

# The pages load only their own scripts and styles and talk only to this
# gateway; nothing in them may be framed or sent as a referrer (a token may
# travel in the fragment of the page address).
_PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self' data:; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}

DEFAULT_LIST_LIMIT = 100
MAX_LIST_LIMIT = 1000


@dataclass(frozen=True, slots=True)
class Asset:
    body: bytes
    content_type: str
    etag: str


class Assets:
    """The files under ``bomstream/static``, by name."""

    def __init__(self) -> None:
        self._files: dict[str, Asset] = {}
        root = resources.files("bomstream").joinpath("static")
        for entry in root.iterdir():
            suffix = "." + entry.name.rpartition(".")[2]
            if not entry.is_file() or suffix not in _CONTENT_TYPES:
                continue
            body = entry.read_bytes()
            etag = '"' + hashlib.sha256(body).hexdigest()[:20] + '"'
            self._files[entry.name] = Asset(body, _CONTENT_TYPES[suffix], etag)

    def get(self, name: str) -> Asset | None:
        return self._files.get(name)

    def names(self) -> list[str]:
        return sorted(self._files)


ASSETS = web.AppKey("assets", Assets)


def add_pages(app: web.Application) -> None:
    app[ASSETS] = Assets()
    app.router.add_get("/", _page("index.html"))
    app.router.add_get("/monitor", _page("monitor.html"))
    app.router.add_get("/static/{name}", handle_static)
    app.router.add_get("/api/enrichment/boms", handle_boms)


def _serve(request: web.Request, asset: Asset) -> web.Response:
    headers = {**_PAGE_HEADERS, "ETag": asset.etag, "Cache-Control": "no-cache"}
    if asset.etag in request.headers.get("If-None-Match", ""):
        return web.Response(status=304, headers=headers)
    headers["Content-Type"] = asset.content_type
    return web.Response(body=asset.body, headers=headers)


def _page(name: str) -> Handler:
    async def handler(request: web.Request) -> web.Response:
        asset = request.app[ASSETS].get(name)
        if asset is None:
            raise ApiError(404, "not_found", "page not found")
        return _serve(request, asset)

    return handler


async def handle_static(request: web.Request) -> web.Response:
    asset = request.app[ASSETS].get(request.match_info["name"])
    if asset is None:
        raise ApiError(404, "not_found", "no such static file")
    return _serve(request, asset)


async def handle_boms(request: web.Request) -> web.Response:
    """``GET /api/enrichment/boms``: every BOM held, newest first (admin or open mode).

    A JWT caller is scoped to one org and the list would reveal other orgs'
    BOM ids, so it is refused rather than filtered.
    """
    gw = request.app[GATEWAY]
    principal = gw.auth.authenticate(request)
    if principal.org is not None:
        raise ApiError(403, "forbidden", "listing BOMs needs the admin token")
    text = request.query.get("limit")
    limit = DEFAULT_LIST_LIMIT
    if text is not None:
        if not text.isdigit() or not 1 <= int(text) <= MAX_LIST_LIMIT:
            raise ApiError(
                400, "invalid_limit", f"limit must be an integer from 1 to {MAX_LIST_LIMIT}"
            )
        limit = int(text)
    boms = []
    held = gw.hub.boms()
    for bom_id, streams, latest in held[:limit]:
        item: dict[str, object] = {"bom_id": bom_id, "streams": streams}
        if latest is not None:
            data = orjson.loads(latest.data)
            item.update(
                event_id=latest.event_id,
                event_type=latest.event_type,
                state=data.get("state"),
                updated_at=data.get("created_at"),
                terminal=latest.terminal,
            )
        boms.append(item)
    return json_response({"boms": boms, "total": len(held)})
