"""CORS for the browser-facing routes, with aiohttp-cors.

Only origins listed in ``cors.allow_origins`` get ``Access-Control-Allow-Origin``
and preflight answers; any other origin gets no CORS header at all, so the
browser keeps the response from the page.
"""

from __future__ import annotations

import aiohttp_cors
from aiohttp import web

from bomstream.config import CorsConfig

# What a page sends: a token header, a resume position, and JSON bodies.
ALLOW_HEADERS = ("Authorization", "Last-Event-ID", "Content-Type")
# What a page may read besides the simple headers: when to come back after 429/503.
EXPOSE_HEADERS = ("Retry-After",)
PREFLIGHT_MAX_AGE_S = 600


def setup_cors(app: web.Application, cfg: CorsConfig, routes: list[web.AbstractRoute]) -> None:
    """Apply the CORS policy to ``routes``; nothing at all when no origin is allowed."""
    if not cfg.allow_origins:
        return
    # aiohttp-cors turns each mapping into its ResourceOptions.
    options = {
        "allow_credentials": cfg.allow_credentials,
        "allow_headers": ALLOW_HEADERS,
        "expose_headers": EXPOSE_HEADERS,
        "max_age": PREFLIGHT_MAX_AGE_S,
    }
    cors = aiohttp_cors.setup(app, defaults=dict.fromkeys(cfg.allow_origins, options))
    for route in routes:
        cors.add(route)
