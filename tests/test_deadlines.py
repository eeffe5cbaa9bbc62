"""The shared deadline timer behind stream max_duration and token expiry."""

from __future__ import annotations

import asyncio

import aiohttp

from bomstream.deadlines import Deadlines
from tests.conftest import StartGateway, open_stream


async def test_each_member_is_called_once_with_its_reason_in_deadline_order() -> None:
    done = asyncio.Event()
    calls: list[tuple[str, str]] = []

    def due(member: str, reason: str) -> None:
        calls.append((member, reason))
        if len(calls) == 3:
            done.set()

    d: Deadlines[str] = Deadlines(due, tick=0.01)
    d.add("late", 0.15, "max_duration")
    d.add("early", 0.02, "token_expired")
    d.add("middle", 0.08, "max_duration")
    assert len(d) == 3
    await asyncio.wait_for(done.wait(), 5)
    assert calls == [
        ("early", "token_expired"),
        ("middle", "max_duration"),
        ("late", "max_duration"),
    ]
    assert len(d) == 0
    await asyncio.sleep(0.05)
    assert len(calls) == 3


async def test_a_removed_member_is_never_called() -> None:
    fired = asyncio.Event()
    calls: list[str] = []

    def due(member: str, reason: str) -> None:
        calls.append(member)
        fired.set()

    d: Deadlines[str] = Deadlines(due, tick=0.01)
    gone = d.add("gone", 0.02, "max_duration")
    d.add("stays", 0.06, "max_duration")
    d.remove("gone", gone)
    await asyncio.wait_for(fired.wait(), 5)
    assert calls == ["stays"]


async def test_removing_the_last_member_drops_the_timer() -> None:
    d: Deadlines[str] = Deadlines(lambda m, r: None, tick=0.01)
    key = d.add("a", 30, "token_expired")
    assert d._handle is not None
    d.remove("a", key)
    d.remove("a", key)
    assert d._handle is None
    assert len(d) == 0


async def test_a_past_deadline_fires_on_the_next_tick() -> None:
    fired = asyncio.Event()
    d: Deadlines[str] = Deadlines(lambda m, r: fired.set(), tick=0.01)
    d.add("a", -5, "token_expired")
    await asyncio.wait_for(fired.wait(), 5)


async def test_stream_ends_with_max_duration_through_a_real_gateway(
    gateway_factory: StartGateway, http: aiohttp.ClientSession
) -> None:
    gw = await gateway_factory(server__max_stream_s=0.3)
    async with open_stream(http, gw.url, "bom-d") as s:
        frames = await s.events_until_end(timeout=5)
    assert [f.event for f in frames] == ["connected", "stream_end"]
    assert frames[-1].json() == {"type": "stream_end", "reason": "max_duration"}
    assert gw.gateway.hub.stream_count == 0


async def test_a_closed_stream_leaves_no_deadline_behind(
    gateway_factory: StartGateway, http: aiohttp.ClientSession
) -> None:
    gw = await gateway_factory(server__max_stream_s=3600)
    hub = gw.gateway.hub
    async with open_stream(http, gw.url, "bom-e") as s:
        await s.next_event()
        assert len(hub._timers._deadlines) == 1
    for _ in range(100):
        if hub.stream_count == 0:
            break
        await asyncio.sleep(0.02)
    assert hub.stream_count == 0
    assert len(hub._timers._deadlines) == 0
