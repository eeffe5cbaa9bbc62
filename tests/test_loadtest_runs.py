"""Whole load-test runs: against a crafted SSE server whose faults are known,
and against a real gateway fed by a real redis-server."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from bomstream.loadtest.options import LoadOptions
from bomstream.loadtest.run import run_load
from tests.gateway_proc import GatewayProcess
from tests.redis_proc import RedisProcess

DROPPED, DOUBLED, HELD_BACK, RELEASER, CUT_AFTER = 3, 5, 7, 8, 10


def chunk(frame: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(frame), frame)


class CraftedServer:
    """Speaks the gateway's stream and publish API, but mangles every BOM's
    stream the same known way: drops one event, sends one twice, swaps two,
    and once cuts every stream of the first BOM so its clients must resume
    with Last-Event-ID."""

    def __init__(self) -> None:
        self.streams: dict[str, dict[asyncio.Transport, asyncio.Future[None]]] = {}
        self.sent: dict[str, list[tuple[str, bytes]]] = {}
        self.stash: dict[str, bytes] = {}
        self.resumed_from: list[str] = []
        self.cut_done = False
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/api/enrichment/stream/{bom_id}", self.stream)
        app.router.add_post("/api/enrichment/events/{bom_id}", self.publish)
        self._runner = web.AppRunner(app, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        for subs in self.streams.values():
            for t, done in list(subs.items()):
                t.close()
                if not done.done():
                    done.set_result(None)
        assert self._runner is not None
        await self._runner.cleanup()

    async def stream(self, request: web.Request) -> web.StreamResponse:
        bom = request.match_info["bom_id"]
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        transport = request.transport
        assert transport is not None
        blob = chunk(b"retry: 1000\n\n") + chunk(b'event: connected\ndata: {"resumed":false}\n\n')
        after = request.headers.get("Last-Event-ID")
        if after is not None:
            self.resumed_from.append(after)
            ids = [eid for eid, _ in self.sent.get(bom, [])]
            if after in ids:
                blob += b"".join(f for _, f in self.sent[bom][ids.index(after) + 1 :])
        transport.write(blob)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.streams.setdefault(bom, {})[transport] = done
        try:
            await done
        finally:
            self.streams[bom].pop(transport, None)
        return resp

    def _emit(self, bom: str, eid: str, frame: bytes) -> None:
        data = chunk(frame)
        self.sent.setdefault(bom, []).append((eid, data))
        for t in self.streams.get(bom, {}):
            t.write(data)

    async def publish(self, request: web.Request) -> web.Response:
        bom = request.match_info["bom_id"]
        event = await request.json()
        eid = event["event_id"]
        seq = int(eid.split("-")[2])
        frame = f"id: {eid}\nevent: {event['event_type']}\ndata: {json.dumps(event)}\n\n".encode()
        if seq == DOUBLED:
            self._emit(bom, eid, frame)
            self._emit(bom, eid, frame)
        elif seq == HELD_BACK:
            self.stash[bom] = frame
        elif seq == RELEASER:
            self._emit(bom, eid, frame)
            held = self.stash.pop(bom)
            self._emit(bom, held.split(b"\n")[0][4:].decode(), held)
        elif seq != DROPPED:
            self._emit(bom, eid, frame)
        if seq == CUT_AFTER and bom.endswith("-0") and not self.cut_done:
            self.cut_done = True
            for t, done in list(self.streams.get(bom, {}).items()):
                t.close()
                if not done.done():
                    done.set_result(None)
        return web.json_response({"event_id": eid}, status=202)


@pytest.fixture
async def crafted() -> AsyncIterator[CraftedServer]:
    server = CraftedServer()
    await server.start()
    yield server
    await server.stop()


async def test_accounting_matches_the_faults_the_server_injected(crafted: CraftedServer) -> None:
    opts = LoadOptions(
        url=crafted.url,
        connections=4,
        boms=2,
        source_ips=2,
        rate=40,
        duration=1.0,
        drain_s=3.0,
        publish_via="http",
        progress=False,
    )
    report = (await run_load(opts)).data
    per_bom = 20
    streams = 4
    assert report["publish"]["sent"] == 2 * per_bom
    assert report["connections"]["established"] == streams
    assert report["connections"]["reconnects"] == 2
    d = report["deliveries"]
    assert d["expected"] == streams * per_bom
    assert d["lost"] == streams  # the dropped event, once per stream
    assert d["duplicates"] == streams
    assert d["out_of_order"] == streams
    assert d["received"] == streams * (per_bom - 1)
    assert d["streams_with_loss"] == streams
    assert d["misrouted"] == 0
    assert report["latency_ms"]["samples"] == d["received"]
    # Both clients of the cut BOM resumed from the last event they had seen.
    assert len(crafted.resumed_from) == 2
    assert all(eid.split("-")[2] == str(CUT_AFTER) for eid in crafted.resumed_from)


@pytest.fixture
def redis_gateway(redis_server: RedisProcess) -> tuple[GatewayProcess, RedisProcess]:
    gw = GatewayProcess(
        env={
            "BOMSTREAM_REDIS_URL": redis_server.url,
            "BOMSTREAM_AUTH_ADMIN_TOKEN": "admin-secret",
            "BOMSTREAM_SERVER_ACCESS_LOG": "false",
        }
    )
    gw.start_sync()
    return gw, redis_server


def run_cli(args: list[str], tmp_path: Path, name: str) -> dict[str, object]:
    out = tmp_path / f"{name}.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bomstream", "loadtest", *args, "--json", str(out), "--no-progress"],
        capture_output=True,
        timeout=90,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout.decode() + proc.stderr.decode()
    assert b"deliveries" in proc.stdout
    result: dict[str, object] = json.loads(out.read_text())
    return result


@pytest.mark.parametrize("via", ["redis", "http"])
def test_small_run_against_a_real_gateway_and_redis_loses_nothing(
    redis_gateway: tuple[GatewayProcess, RedisProcess], tmp_path: Path, via: str
) -> None:
    gw, redis = redis_gateway
    assert gw.proc is not None
    args = [
        "--url", gw.url,
        "--connections", "60",
        "--boms", "6",
        "--source-ips", "3",
        "--rate", "120",
        "--duration", "1",
        "--token", "admin-secret",
        "--publish-token", "admin-secret",
        "--gateway-pid", str(gw.proc.pid),
    ]  # fmt: skip
    args += ["--redis", redis.url] if via == "redis" else ["--http-publish"]
    began = time.time()
    try:
        report = run_cli(args, tmp_path, via)
    finally:
        gw.stop()
    ended = time.time()
    conns, pub, d = report["connections"], report["publish"], report["deliveries"]
    assert isinstance(conns, dict) and isinstance(pub, dict) and isinstance(d, dict)
    assert conns["established"] == 60
    assert conns["failed"] == {}
    assert pub["via"] == via
    assert pub["sent"] == 120
    # One second of publishing, then the drain: inside the command's own run.
    start, end = pub["measured_window_unix"]
    assert began < start and start + 0.9 <= end < ended
    assert d["expected"] == 60 * 20
    assert d["received"] == d["expected"]
    assert (d["lost"], d["duplicates"], d["out_of_order"], d["misrouted"]) == (0, 0, 0, 0)
    gateway = report["gateway"]
    assert isinstance(gateway, dict)
    assert gateway["rss_kb_held"] > 0
    assert gateway["cpu_s_publish"] is not None
