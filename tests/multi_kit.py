"""Opening and reading multi-BOM streams and polls in tests (spec section 9)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import aiohttp

from tests.sse import Frame, SSEStream

STREAM = "/api/enrichment/stream"
POLL = "/api/enrichment/events"


def selection(boms: Sequence[str] | None) -> list[tuple[str, str]]:
    if boms is None:
        return [("scope", "org")]
    return [("bom_id", b) for b in boms]


@asynccontextmanager
async def open_multi(
    http: aiohttp.ClientSession,
    base: str,
    boms: Sequence[str] | None,
    *,
    token: str | None = None,
    last_event_id: str | None = None,
    expect: int = 200,
    params: Sequence[tuple[str, str]] = (),
) -> AsyncIterator[SSEStream]:
    """``boms=None``: ``scope=org``."""
    headers = {}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    if last_event_id is not None:
        headers["Last-Event-ID"] = last_event_id
    query = [*selection(boms), *params]
    async with http.get(base + STREAM, params=query, headers=headers) as resp:
        assert resp.status == expect, await resp.text()
        yield SSEStream(resp)


async def connected(stream: SSEStream) -> dict[str, Any]:
    frame = await stream.next_event()
    assert frame is not None and frame.event == "connected", frame
    body: dict[str, Any] = frame.json()
    return body


async def read_events(stream: SSEStream, count: int, timeout: float = 10.0) -> list[Frame]:
    """The next ``count`` event frames (a stream_end fails the test)."""
    out: list[Frame] = []
    while len(out) < count:
        frame = await stream.next_event(timeout)
        assert frame is not None, f"stream ended after {len(out)} of {count} events"
        assert frame.event != "stream_end", frame.data
        out.append(frame)
    return out


def by_bom(frames: Sequence[Frame]) -> dict[str, list[str]]:
    """event_ids per BOM, in the order received."""
    out: dict[str, list[str]] = {}
    for f in frames:
        data = json.loads(f.data)
        out.setdefault(data["bom_id"], []).append(data["event_id"])
    return out


async def poll_multi(
    http: aiohttp.ClientSession,
    base: str,
    boms: Sequence[str] | None,
    *,
    token: str | None = None,
    after: str | None = None,
    expect: int = 200,
    params: Sequence[tuple[str, str]] = (),
) -> Any:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    query = [*selection(boms), *params]
    if after is not None:
        query.append(("after", after))
    async with http.get(base + POLL, params=query, headers=headers) as resp:
        body = await resp.json()
        assert resp.status == expect, body
        return body


async def nothing_more(stream: SSEStream, within: float = 0.5) -> None:
    """No further event arrives for ``within`` seconds (the stream stays open)."""
    try:
        frame = await stream.next_event(within)
    except TimeoutError:
        return
    raise AssertionError(f"unexpected frame: {frame}")
