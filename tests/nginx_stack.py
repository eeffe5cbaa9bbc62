"""Two gateway processes sharing one redis-server behind a real nginx started
from deploy/nginx.conf, as in production, and a client that follows a stream
the way a browser's EventSource does."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import aiohttp

from tests.gateway_proc import GatewayProcess
from tests.nginx_proc import NginxProcess
from tests.redis_proc import RedisProcess, require_binary
from tests.sse import Frame, SSEStream

TERMINAL = {"enrichment.completed", "enrichment.failed", "enrichment.error"}


@dataclass
class Stack:
    redis: RedisProcess
    gateways: list[GatewayProcess]
    nginx: NginxProcess

    @property
    def url(self) -> str:
        return self.nginx.url

    def publish(self, bom_id: str, event: dict[str, object]) -> None:
        """What a worker does: PUBLISH straight to Redis."""
        self.redis.publish(f"enrichment:{bom_id}", json.dumps(event))

    async def serving(self, http: aiohttp.ClientSession) -> list[int]:
        """Open streams per gateway, from each one's own health check."""
        return [(await g.health(http))["streams"] for g in self.gateways]

    async def restart(self, index: int, http: aiohttp.ClientSession) -> None:
        """SIGTERM one instance and start a fresh process on the same port."""
        g = self.gateways[index]
        g.stop()
        g.env["BOMSTREAM_SERVER_PORT"] = str(g.port)
        await g.start(http)


@asynccontextmanager
async def nginx_stack(
    redis_server: RedisProcess,
    http: aiohttp.ClientSession,
    *,
    admin: str,
    grace_s: float,
    **settings: object,
) -> AsyncIterator[Stack]:
    gateways = [
        GatewayProcess(
            redis_url=redis_server.url,
            auth_admin_token=admin,
            server_heartbeat_s=0.2,
            server_retry_ms=100,
            server_shutdown_grace_s=grace_s,
            redis_backoff_initial_s=0.05,
            redis_backoff_max_s=0.5,
            **settings,
        )
        for _ in range(2)
    ]
    require_binary("nginx")
    nginx: NginxProcess | None = None
    try:
        await asyncio.gather(*(g.start(http) for g in gateways))
        assert gateways[0].port != gateways[1].port
        nginx = NginxProcess([g.port for g in gateways])
        nginx.start()
        yield Stack(redis_server, gateways, nginx)
    finally:
        if nginx is not None:
            nginx.close()
        for g in gateways:
            g.close()


@dataclass
class Follower:
    """Reads a stream as a browser client does: EventSource reconnects with
    Last-Event-ID after ``retry`` whenever the connection ends, and the page
    closes it for good at a ``stream_end`` whose reason is a terminal event."""

    url: str
    token: str
    events: list[Frame] = field(default_factory=list)
    connects: list[bool] = field(default_factory=list)  # the ``resumed`` flag of each
    ends: list[str] = field(default_factory=list)  # every stream_end reason seen
    end_reason: str | None = None

    async def run(self, http: aiohttp.ClientSession, max_connects: int = 20) -> None:
        last_id: str | None = None
        for _ in range(max_connects):
            headers = {"Authorization": f"Bearer {self.token}"}
            if last_id is not None:
                headers["Last-Event-ID"] = last_id
            try:
                async with http.get(self.url, headers=headers) as resp:
                    if resp.status == 200:
                        s = SSEStream(resp)
                        while (frame := await s.next_event(timeout=5)) is not None:
                            if frame.event == "connected":
                                self.connects.append(frame.json()["resumed"])
                            elif frame.event == "stream_end":
                                self.ends.append(frame.json()["reason"])
                                if self.ends[-1] in TERMINAL:
                                    self.end_reason = self.ends[-1]
                                    return
                            else:
                                self.events.append(frame)
                                last_id = frame.id
            except aiohttp.ClientError:
                pass  # the instance died mid-stream: reconnect, as EventSource does
            await asyncio.sleep(0.1)
        raise AssertionError(f"no stream_end after {max_connects} connections")
