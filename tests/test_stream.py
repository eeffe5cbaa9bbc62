"""The stream contract (spec section 4) against a real listening gateway."""

from __future__ import annotations

import asyncio

import aiohttp

from bomstream.server import RunningGateway
from tests.conftest import StartGateway, open_stream, progress, publish
from tests.waiting import eventually


async def test_stream_starts_with_retry_then_connected(
    gateway: RunningGateway, http: aiohttp.ClientSession
) -> None:
    async with http.get(f"{gateway.url}/api/enrichment/stream/bom-a") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "text/event-stream"
        assert "no-cache" in resp.headers["Cache-Control"]
        assert "no-transform" in resp.headers["Cache-Control"]
        assert resp.headers["X-Accel-Buffering"] == "no"
        assert "Content-Encoding" not in resp.headers
        first = await resp.content.readline()
        assert first == b"retry: 3000\n"
        assert await resp.content.readline() == b"\n"
        assert await resp.content.readline() == b"event: connected\n"
        data = await resp.content.readline()
        assert data == (
            b'data: {"type":"connected","bom_id":"bom-a",'
            b'"message":"Stream connected","resumed":false}\n'
        )


async def test_live_event_frames_carry_id_event_and_one_line_of_json(
    gateway: RunningGateway, http: aiohttp.ClientSession
) -> None:
    async with open_stream(http, gateway.url, "bom-a") as s:
        assert (await s.next()).retry == 3000
        assert (await s.next()).event == "connected"
        await publish(http, gateway.url, "bom-a", progress("bom-a", 1))
        frame = await s.next()
        assert frame.id == "bom-a-e1"
        assert frame.event == "enrichment.progress"
        assert "\n" not in frame.data
        assert frame.json()["state"]["percent_complete"] == 1.0


async def test_late_joiner_gets_latest_event_as_snapshot(
    gateway: RunningGateway, http: aiohttp.ClientSession
) -> None:
    for n in range(1, 4):
        await publish(http, gateway.url, "bom-a", progress("bom-a", n))
    async with open_stream(http, gateway.url, "bom-a") as s:
        connected = await s.next_event()
        assert connected.json()["resumed"] is False
        snapshot = await s.next_event()
        assert snapshot.id == "bom-a-e3"


async def test_last_event_id_header_replays_everything_after_it(
    gateway: RunningGateway, http: aiohttp.ClientSession
) -> None:
    for n in range(1, 6):
        await publish(http, gateway.url, "bom-a", progress("bom-a", n))
    async with open_stream(http, gateway.url, "bom-a", last_event_id="bom-a-e2") as s:
        assert (await s.next_event()).json()["resumed"] is True
        ids = [(await s.next_event()).id for _ in range(3)]
        assert ids == ["bom-a-e3", "bom-a-e4", "bom-a-e5"]
        await publish(http, gateway.url, "bom-a", progress("bom-a", 6))
        assert (await s.next_event()).id == "bom-a-e6"


async def test_last_event_id_query_parameter_and_header_wins(
    gateway: RunningGateway, http: aiohttp.ClientSession
) -> None:
    for n in range(1, 4):
        await publish(http, gateway.url, "bom-a", progress("bom-a", n))
    url = f"{gateway.url}/api/enrichment/stream/bom-a?last_event_id=bom-a-e1"
    async with http.get(url) as resp:
        from tests.sse import SSEStream

        s = SSEStream(resp)
        assert (await s.next_event()).json()["resumed"] is True
        assert (await s.next_event()).id == "bom-a-e2"
    async with http.get(url, headers={"Last-Event-ID": "bom-a-e2"}) as resp:
        s = SSEStream(resp)
        assert (await s.next_event()).json()["resumed"] is True
        assert (await s.next_event()).id == "bom-a-e3"


async def test_unknown_last_event_id_is_reported_as_not_resumed(
    gateway: RunningGateway, http: aiohttp.ClientSession
) -> None:
    await publish(http, gateway.url, "bom-a", progress("bom-a", 1))
    await publish(http, gateway.url, "bom-a", progress("bom-a", 2))
    async with open_stream(http, gateway.url, "bom-a", last_event_id="never-seen") as s:
        assert (await s.next_event()).json()["resumed"] is False
        assert (await s.next_event()).id == "bom-a-e2"


async def test_heartbeat_comment_every_heartbeat_s(
    gateway_factory: StartGateway, http: aiohttp.ClientSession
) -> None:
    gw = await gateway_factory(server__heartbeat_s=0.2)
    async with open_stream(http, gw.url, "bom-a") as s:
        await s.next()
        await s.next()
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        beats = []
        for _ in range(3):
            frame = await s.next(timeout=2)
            assert frame.comments == ["keepalive"]
            beats.append(loop.time() - t0)
        assert 0.3 < beats[-1] < 2.0


async def test_terminal_event_sends_stream_end_and_closes(
    gateway: RunningGateway, http: aiohttp.ClientSession
) -> None:
    async with open_stream(http, gateway.url, "bom-a") as s:
        await s.next_event()
        await publish(http, gateway.url, "bom-a", progress("bom-a", 1))
        await publish(
            http, gateway.url, "bom-a", {"event_id": "done", "event_type": "enrichment.completed"}
        )
        frames = await s.events_until_end()
        assert [f.event for f in frames] == [
            "enrichment.progress",
            "enrichment.completed",
            "stream_end",
        ]
        assert frames[-1].json() == {"type": "stream_end", "reason": "enrichment.completed"}
        assert frames[-1].id is None


async def test_late_joiner_after_terminal_gets_it_then_stream_end(
    gateway: RunningGateway, http: aiohttp.ClientSession
) -> None:
    await publish(http, gateway.url, "bom-a", progress("bom-a", 1))
    await publish(
        http, gateway.url, "bom-a", {"event_id": "fail", "event_type": "enrichment.failed"}
    )
    async with open_stream(http, gateway.url, "bom-a") as s:
        frames = await s.events_until_end()
    assert [f.event for f in frames] == ["connected", "enrichment.failed", "stream_end"]
    assert frames[-1].json()["reason"] == "enrichment.failed"


async def test_reconnect_holding_the_terminal_event_gets_204(
    gateway: RunningGateway, http: aiohttp.ClientSession
) -> None:
    await publish(
        http, gateway.url, "bom-a", {"event_id": "done", "event_type": "enrichment.completed"}
    )
    async with http.get(
        f"{gateway.url}/api/enrichment/stream/bom-a", headers={"Last-Event-ID": "done"}
    ) as resp:
        assert resp.status == 204
        assert await resp.read() == b""


async def test_new_run_after_terminal_streams_as_usual(
    gateway: RunningGateway, http: aiohttp.ClientSession
) -> None:
    await publish(
        http, gateway.url, "bom-a", {"event_id": "done", "event_type": "enrichment.completed"}
    )
    await publish(
        http, gateway.url, "bom-a", {"event_id": "run2", "event_type": "enrichment.started"}
    )
    async with open_stream(http, gateway.url, "bom-a", last_event_id="done") as s:
        assert (await s.next_event()).json()["resumed"] is True
        assert (await s.next_event()).id == "run2"
        await publish(http, gateway.url, "bom-a", progress("bom-a", 1))
        assert (await s.next_event()).id == "bom-a-e1"


async def test_duplicate_event_id_is_delivered_once(
    gateway: RunningGateway, http: aiohttp.ClientSession
) -> None:
    async with open_stream(http, gateway.url, "bom-a") as s:
        await s.next_event()
        first = await publish(http, gateway.url, "bom-a", progress("bom-a", 1))
        again = await publish(http, gateway.url, "bom-a", progress("bom-a", 1))
        assert first == again == {"event_id": "bom-a-e1"}
        await publish(http, gateway.url, "bom-a", progress("bom-a", 2))
        assert (await s.next_event()).id == "bom-a-e1"
        assert (await s.next_event()).id == "bom-a-e2"


async def test_invalid_bom_id_in_path_is_400(
    gateway: RunningGateway, http: aiohttp.ClientSession
) -> None:
    for bad in ("-leading-dash", "a" * 129, "sp%20ace", "semi;colon", ".dot"):
        async with http.get(f"{gateway.url}/api/enrichment/stream/{bad}") as resp:
            assert resp.status == 400, bad
            assert (await resp.json())["code"] == "invalid_bom_id"
    async with http.get(f"{gateway.url}/api/enrichment/stream/") as resp:
        assert resp.status == 404
        assert (await resp.json())["code"] == "not_found"


async def test_open_streams_are_handed_over_and_a_hang_up_still_ends_them(
    gateway: RunningGateway, http: aiohttp.ClientSession
) -> None:
    """Once its headers are sent a stream's connection is the gateway's own:
    aiohttp tracks none of them, yet events flow, a hang-up is noticed, and
    the response ends with chunked encoding's last chunk."""
    gw = gateway.gateway
    server = gateway.runner.server
    assert server is not None

    async def state() -> tuple[int, int, int]:
        return gw.hub.stream_count, gw.handed_over.count, len(server.connections)

    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    writer.write(b"GET /api/enrichment/stream/bom-a HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)).startswith(b"HTTP/1.1 200")
    async with open_stream(http, gateway.url, "bom-a") as s:
        await s.next_event()
        # Two open streams, both handed over, none left in aiohttp's connections.
        await eventually(state, lambda st: st == (2, 2, 0))
        await publish(http, gateway.url, "bom-a", progress("bom-a", 1))
        assert (await s.next_event()).id == "bom-a-e1"  # type: ignore[union-attr]
        writer.close()  # the raw client hangs up
        await eventually(state, lambda st: st[:2] == (1, 1))
        done = {"event_id": "t", "event_type": "enrichment.completed"}
        await publish(http, gateway.url, "bom-a", done)
        frames = await s.events_until_end()  # ends cleanly: the client saw the last chunk
        assert [f.event for f in frames] == ["enrichment.completed", "stream_end"]
    await eventually(state, lambda st: st[:2] == (0, 0))
