"""A JWT stream ends when its token expires, on a gateway process configured as
an operator would (spec section 5): at ``exp`` by default, at ``exp`` plus
``auth.leeway_s`` when an operator sets a leeway."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp

from tests.authkit import ADMIN, SECRET, hs256
from tests.conftest import open_stream
from tests.gateway_proc import GatewayProcess

# The deadline timer ticks every 0.25 s; the rest is slack for a loaded machine.
# The defect this guards against was a stream outliving exp by 30 s.
LATE_BOUND_S = 2.5


@asynccontextmanager
async def jwt_gateway(http: aiohttp.ClientSession, **settings: Any) -> AsyncIterator[str]:
    gw = GatewayProcess(auth_jwt_secret=SECRET, auth_admin_token=ADMIN, **settings)
    try:
        await gw.start(http)
        yield gw.url
    finally:
        gw.stop()
        gw.close()


def token_expiring_at(exp: int) -> str:
    return hs256({"sub": "user-1", "iat": int(time.time()), "exp": exp, "organization_id": "o"})


async def ended_at(http: aiohttp.ClientSession, url: str, token: str) -> tuple[float, Any]:
    """Wall-clock time the stream's last frame arrived, and that frame's data."""
    async with open_stream(http, url, "bom-x", token=token) as s:
        assert (await s.next_event()).event == "connected"  # type: ignore[union-attr]
        frames = await s.events_until_end(timeout=40)
        when = time.time()
    assert frames, "the stream ended without a frame"
    assert frames[-1].event == "stream_end"
    return when, frames[-1].json()


def exp_in(seconds: int) -> int:
    return int(time.time()) + seconds


async def test_default_config_ends_a_jwt_stream_at_exp(http: aiohttp.ClientSession) -> None:
    async with jwt_gateway(http) as url:
        exp = exp_in(3)
        when, end = await ended_at(http, url, token_expiring_at(exp))
        assert end == {"type": "stream_end", "reason": "token_expired"}
        assert exp - 0.05 <= when < exp + LATE_BOUND_S, when - exp
        # The same token is refused from then on: no leeway by default.
        async with open_stream(http, url, "bom-x", token=token_expiring_at(exp), expect=401):
            pass


async def test_a_configured_leeway_widens_acceptance_and_the_stream_alike(
    http: aiohttp.ClientSession,
) -> None:
    leeway = 3
    async with jwt_gateway(http, auth_leeway_s=leeway) as url:
        # Expired two seconds ago, inside the leeway: accepted...
        exp = exp_in(-2)
        when, end = await ended_at(http, url, token_expiring_at(exp))
        assert end["reason"] == "token_expired"
        # ...and ended when the leeway runs out, not at once and not later.
        assert exp + leeway - 0.05 <= when < exp + leeway + LATE_BOUND_S, when - exp
        # Past exp plus the leeway a token is refused.
        async with open_stream(http, url, "bom-x", token=token_expiring_at(exp_in(-5)), expect=401):
            pass
