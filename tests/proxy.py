"""A small reverse proxy in front of a gateway that can refuse the stream
route, the way a proxy that does not pass SSE would, and later let it through."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiohttp
from aiohttp import web

FORWARD_REQUEST = ("authorization", "last-event-id", "accept", "if-none-match", "content-type")
HOP_BY_HOP = ("content-length", "transfer-encoding", "connection", "keep-alive")


class StreamBlockingProxy:
    def __init__(self, upstream: str, session: aiohttp.ClientSession) -> None:
        self.upstream = upstream
        self.session = session
        self.block_stream = True
        self.refused = 0
        self.url = ""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if self.block_stream and request.path.startswith("/api/enrichment/stream/"):
            self.refused += 1
            return web.Response(status=502, text="this proxy does not pass event streams")
        headers = {k: v for k, v in request.headers.items() if k.lower() in FORWARD_REQUEST}
        body = await request.read() if request.can_read_body else None
        async with self.session.request(
            request.method, self.upstream + request.path_qs, headers=headers, data=body
        ) as up:
            out = {k: v for k, v in up.headers.items() if k.lower() not in HOP_BY_HOP}
            resp = web.StreamResponse(status=up.status, headers=out)
            await resp.prepare(request)
            async for data in up.content.iter_any():
                await resp.write(data)
            await resp.write_eof()
            return resp


@asynccontextmanager
async def stream_blocking_proxy(upstream: str) -> AsyncIterator[StreamBlockingProxy]:
    timeout = aiohttp.ClientTimeout(total=None, sock_read=None)
    async with aiohttp.ClientSession(timeout=timeout, auto_decompress=False) as session:
        proxy = StreamBlockingProxy(upstream, session)
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", proxy.handle)
        runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        proxy.url = f"http://{host}:{port}"
        try:
            yield proxy
        finally:
            await runner.cleanup()
