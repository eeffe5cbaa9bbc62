"""Builds the aiohttp application and runs it: routes, lifecycle, shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass

from aiohttp import web

from bomstream.access_log import AccessLogger
from bomstream.auth import Authenticator
from bomstream.broker import Broker
from bomstream.broker_memory import MemoryBroker
from bomstream.broker_redis import RedisBroker
from bomstream.config import Config
from bomstream.cors import setup_cors
from bomstream.errors import error_middleware
from bomstream.history import make_backend
from bomstream.history.recall import Recall
from bomstream.http_api import handle_health, handle_metrics, handle_poll, handle_publish
from bomstream.hub import SERVER_SHUTDOWN, Hub
from bomstream.logs import FIELDS
from bomstream.metrics import Metrics
from bomstream.pages import add_pages
from bomstream.state import GATEWAY, Gateway
from bomstream.stream import handle_stream
from bomstream.ticket_api import handle_ticket
from bomstream.tickets import make_ticket_store

log = logging.getLogger("bomstream.server")

# The HTTP read buffer aiohttp allows per request body; the publish handler
# enforces limits.max_event_bytes itself, this only keeps a hard ceiling.
BODY_SLACK = 1024
IDLE_KEEPALIVE_S = 75.0


def make_app(cfg: Config) -> web.Application:
    metrics = Metrics()
    hub = Hub(cfg, metrics)
    history = make_backend(cfg, metrics)
    broker: Broker
    interest = None
    if cfg.redis.url:
        redis_broker = RedisBroker(cfg, hub, metrics, record=history.record if history else None)
        broker, interest = redis_broker, redis_broker.interest
    else:
        broker = MemoryBroker(hub)
    recall = Recall(cfg, hub, metrics, history, watcher=interest)
    tickets = make_ticket_store(cfg.redis.url, cfg.auth.ticket_ttl_s, cfg.redis.cluster)
    auth = Authenticator(cfg, metrics, tickets)
    gw = Gateway(cfg=cfg, hub=hub, broker=broker, metrics=metrics, auth=auth, recall=recall)
    app = web.Application(
        middlewares=[error_middleware(streams={handle_stream})],
        client_max_size=cfg.limits.max_event_bytes + BODY_SLACK,
    )
    app[GATEWAY] = gw
    browser_routes = []
    if not cfg.server.disable_stream:
        browser_routes.append(app.router.add_get("/api/enrichment/stream/{bom_id}", handle_stream))
    browser_routes.append(app.router.add_get("/api/enrichment/events/{bom_id}", handle_poll))
    browser_routes.append(app.router.add_post("/api/enrichment/events/{bom_id}", handle_publish))
    browser_routes.append(app.router.add_post("/api/enrichment/tickets", handle_ticket))
    setup_cors(app, cfg.cors, browser_routes)
    app.router.add_get("/api/enrichment/health", handle_health)
    app.router.add_get("/metrics", handle_metrics)
    add_pages(app)
    app.cleanup_ctx.append(_background_tasks)
    app.on_shutdown.append(_end_streams)
    return app


async def _background_tasks(app: web.Application) -> AsyncIterator[None]:
    """Owner tasks of the broker connection, the history connections and the buffer sweeper."""
    gw = app[GATEWAY]
    tasks = [
        asyncio.create_task(gw.broker.run(), name="broker"),
        asyncio.create_task(gw.recall.run(), name="history"),
        asyncio.create_task(gw.hub.run_sweeper(), name="sweeper"),
    ]
    yield
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task
    await gw.broker.close()
    await gw.recall.close()
    await gw.auth.tickets.close()


async def _end_streams(app: web.Application) -> None:
    ended = app[GATEWAY].hub.end_all(SERVER_SHUTDOWN)
    log.info("shutting down", extra={FIELDS: {"streams_ended": ended}})


@dataclass(slots=True)
class RunningGateway:
    runner: web.AppRunner
    app: web.Application
    host: str
    port: int

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def gateway(self) -> Gateway:
        return self.app[GATEWAY]

    async def stop(self) -> None:
        await self.runner.cleanup()


async def start(cfg: Config) -> RunningGateway:
    """Start listening; ``server.port = 0`` picks a free port."""
    app = make_app(cfg)
    runner = web.AppRunner(
        app,
        # A client that goes away cancels its stream handler, which is how a
        # stream learns of the disconnect at once rather than at its next write.
        handler_cancellation=True,
        shutdown_timeout=cfg.server.shutdown_grace_s,
        # aiohttp's handler default is an hour; a proxy in front (nginx keeps
        # idle upstream connections 60 s) should always be the side that closes.
        keepalive_timeout=IDLE_KEEPALIVE_S,
        access_log=logging.getLogger("bomstream.access") if cfg.server.access_log else None,
        access_log_class=AccessLogger,
        handle_signals=False,
    )
    await runner.setup()
    site = web.TCPSite(runner, cfg.server.host, cfg.server.port, backlog=4096, reuse_address=True)
    try:
        await site.start()
    except BaseException:
        # setup() already started the owner tasks (Redis feed, sweeper); a
        # failed bind must stop them, or the process would never exit.
        await runner.cleanup()
        raise
    host, port = runner.addresses[0][:2]
    return RunningGateway(runner, app, str(host), int(port))


async def serve(cfg: Config) -> None:
    """Run until SIGTERM or SIGINT, then shut down gracefully."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    running = await start(cfg)
    log.info(
        "bomstream listening",
        extra={
            FIELDS: {
                "url": running.url,
                "broker": "redis" if cfg.redis.url else "embedded",
                "subscribe": cfg.redis.subscribe_mode if cfg.redis.url else "-",
                "history": cfg.history_backend,
                "auth": "open" if cfg.open_mode else "token",
            }
        },
    )
    try:
        await stop.wait()
    finally:
        await running.stop()
        log.info("bomstream stopped")
