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
    with Last-Event-ID.

    Streams of several BOMs (``/stream?bom_id=A&bom_id=B``) get the same
    faults per BOM, in frames shaped as the gateway's: a cursor for ``id:``
    (``1/<bom>/<event id>``) and the event's JSON, here with spaces after
    its colons as other JSON encoders write it. A resumed one gets every
    frame of its BOMs sent after its cursor, in the order they were sent."""

    def __init__(self) -> None:
        self.streams: dict[str, dict[asyncio.Transport, asyncio.Future[None]]] = {}
        self.sent: dict[str, list[tuple[str, bytes]]] = {}
        # Multi-BOM frames in the order sent: (bom, cursor, chunk).
        self.log: list[tuple[str, str, bytes]] = []
        self.multi: dict[asyncio.Transport, frozenset[str]] = {}
        self.stash: dict[str, dict[str, object]] = {}
        # Per BOM: events that came before their turn, and the next seq due.
        self.arrived: dict[str, dict[int, dict[str, object]]] = {}
        self.next_seq: dict[str, int] = {}
        self.resumed_from: list[str] = []
        self.cut_done = False
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/api/enrichment/stream", self.multi_stream)
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

    async def _hold(self, request: web.Request, blob: bytes, boms: list[str]) -> None:
        """Write ``blob``, then keep the stream registered under each of ``boms``."""
        transport = request.transport
        assert transport is not None
        transport.write(blob)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        for bom in boms:
            self.streams.setdefault(bom, {})[transport] = done
        try:
            await done
        finally:
            for bom in boms:
                self.streams[bom].pop(transport, None)
            self.multi.pop(transport, None)

    async def stream(self, request: web.Request) -> web.StreamResponse:
        bom = request.match_info["bom_id"]
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        blob = chunk(b"retry: 1000\n\n") + chunk(b'event: connected\ndata: {"resumed":false}\n\n')
        after = request.headers.get("Last-Event-ID")
        if after is not None:
            self.resumed_from.append(after)
            ids = [eid for eid, _ in self.sent.get(bom, [])]
            if after in ids:
                blob += b"".join(f for _, f in self.sent[bom][ids.index(after) + 1 :])
        await self._hold(request, blob, [bom])
        return resp

    async def multi_stream(self, request: web.Request) -> web.StreamResponse:
        boms = request.query.getall("bom_id")
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        blob = chunk(b"retry: 1000\n\n") + chunk(b'event: connected\ndata: {"resumed":false}\n\n')
        after = request.headers.get("Last-Event-ID")
        if after is not None:
            self.resumed_from.append(after)
            cursors = [c for _, c, _ in self.log]
            if after in cursors:
                last = len(cursors) - 1 - cursors[::-1].index(after)
                blob += b"".join(f for b, _, f in self.log[last + 1 :] if b in boms)
        assert request.transport is not None
        self.multi[request.transport] = frozenset(boms)
        await self._hold(request, blob, boms)
        return resp

    def _emit(self, bom: str, event: dict[str, object]) -> None:
        eid, kind = event["event_id"], event["event_type"]
        data = chunk(f"id: {eid}\nevent: {kind}\ndata: {json.dumps(event)}\n\n".encode())
        cursor = f"1/{bom}/{eid}"
        mdata = chunk(f"id: {cursor}\nevent: {kind}\ndata: {json.dumps(event)}\n\n".encode())
        self.sent.setdefault(bom, []).append((str(eid), data))
        self.log.append((bom, cursor, mdata))
        for t in self.streams.get(bom, {}):
            t.write(mdata if t in self.multi else data)

    async def publish(self, request: web.Request) -> web.Response:
        bom = request.match_info["bom_id"]
        event = await request.json()
        eid = event["event_id"]
        # Concurrent publishes may arrive out of turn on a busy machine; the
        # faults are applied to each BOM's events in their published order.
        waiting = self.arrived.setdefault(bom, {})
        waiting[int(eid.split("-")[2])] = event
        while (due := self.next_seq.get(bom, 1)) in waiting:
            self.next_seq[bom] = due + 1
            self._mangle(bom, waiting.pop(due), due)
        return web.json_response({"event_id": eid}, status=202)

    def _mangle(self, bom: str, event: dict[str, object], seq: int) -> None:
        if seq == DOUBLED:
            self._emit(bom, event)
            self._emit(bom, event)
        elif seq == HELD_BACK:
            self.stash[bom] = event
        elif seq == RELEASER:
            self._emit(bom, event)
            self._emit(bom, self.stash.pop(bom))
        elif seq != DROPPED:
            self._emit(bom, event)
        if seq == CUT_AFTER and bom.endswith("-0") and not self.cut_done:
            self.cut_done = True
            for t, done in list(self.streams.get(bom, {}).items()):
                t.close()
                if not done.done():
                    done.set_result(None)


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
