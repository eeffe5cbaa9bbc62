"""Graceful shutdown of a real gateway process: SIGTERM/SIGINT with open streams."""

from __future__ import annotations

import asyncio
import signal
from contextlib import AsyncExitStack

import aiohttp
import pytest

from tests.conftest import open_stream
from tests.gateway_proc import GatewayProcess
from tests.sse import SSEStream
from tests.waiting import eventually

GRACE_S = 5.0


@pytest.mark.parametrize(("sig", "streams"), [(signal.SIGTERM, 50), (signal.SIGINT, 5)])
async def test_signal_ends_every_open_stream_with_server_shutdown_and_exits_0(
    http: aiohttp.ClientSession, sig: signal.Signals, streams: int
) -> None:
    gw = GatewayProcess("--log-format", "json", server_shutdown_grace_s=GRACE_S)
    try:
        await gw.start(http)
        async with AsyncExitStack() as stack:
            opened: list[SSEStream] = []
            for i in range(streams):
                s = await stack.enter_async_context(open_stream(http, gw.url, f"bom-{i % 7}"))
                assert (await s.next_event()).event == "connected"
                opened.append(s)
            health = await gw.health(http)
            assert health["streams"] == streams

            loop = asyncio.get_running_loop()
            t0 = loop.time()
            gw.signal(sig)
            # events_until_end returns at a clean end of the chunked body; a cut
            # connection would raise instead.
            ends = await asyncio.gather(*(s.events_until_end(timeout=GRACE_S) for s in opened))
            rc = await gw.wait(timeout=GRACE_S + 5)
            elapsed = loop.time() - t0
        print(f"{sig.name} with {streams} streams: exit {rc} after {elapsed:.3f}s")
        assert rc == 0
        assert elapsed < GRACE_S, f"took {elapsed:.2f}s, grace is {GRACE_S}s"
        for frames in ends:
            assert [(f.event, f.json()) for f in frames] == [
                ("stream_end", {"type": "stream_end", "reason": "server_shutdown"})
            ]
        lines = gw.json_log()
        shutting = [line for line in lines if line["msg"] == "shutting down"]
        assert [line["streams_ended"] for line in shutting] == [streams]
        closed = [line for line in lines if line["msg"] == "stream closed"]
        assert len(closed) == streams
        assert {line["reason"] for line in closed} == {"server_shutdown"}
        assert lines[-1]["msg"] == "bomstream stopped"
    finally:
        gw.close()


async def test_new_streams_are_refused_once_shutdown_begins(http: aiohttp.ClientSession) -> None:
    """After the signal the listener is closed first: nobody new gets in."""
    gw = GatewayProcess(server_shutdown_grace_s=GRACE_S)
    try:
        await gw.start(http)
        async with open_stream(http, gw.url, "bom-a") as s:
            assert (await s.next_event()).event == "connected"
            gw.signal(signal.SIGTERM)
            frames = await s.events_until_end(timeout=GRACE_S)
            assert frames[-1].json()["reason"] == "server_shutdown"

        async def refused() -> bool:
            try:
                async with http.get(f"{gw.url}/api/enrichment/stream/bom-b") as resp:
                    return resp.status == 503
            except aiohttp.ClientConnectionError:
                return True

        assert await eventually(refused, bool, timeout=GRACE_S)
        assert await gw.wait(timeout=GRACE_S + 5) == 0
    finally:
        gw.close()
