"""Builds the aiohttp application and runs it: routes, lifecycle, shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
from collections.abc import AsyncIterator, Callable
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
from bomstream.looplag import probe_loop_lag
from bomstream.metrics import Metrics
from bomstream.multi.routes import handle_multi_poll, handle_multi_stream
from bomstream.pages import add_pages
from bomstream.protocol import GatewayRunner, name_server
from bomstream.state import GATEWAY, Gateway
from bomstream.stream import handle_stream
from bomstream.ticket_api import handle_ticket
from bomstream.tickets import make_ticket_store

log = logging.getLogger("bomstream.server")

# The HTTP read buffer aiohttp allows per request body; the publish handler
# enforces limits.max_event_bytes itself, this only keeps a hard ceiling.
BODY_SLACK = 1024
IDLE_KEEPALIVE_S = 75.0
# The collector's generation thresholds while serving (CPython's are 700, 10,
# 10). Thousands of streams connecting make objects fast, and with the
# defaults a young collection ran every few connects and a full one, walking
# every open stream's objects, several times per 10k streams, pausing the loop
# for 50-500 ms each time. Reference counting frees almost everything a
# request makes; these only bound how long the few cycles wait.
GC_THRESHOLDS = (10_000, 20, 100)


def tune_gc() -> None:
    """Start-up is over: what exists now (modules, config, the app) lives as
    long as the process, so no collection needs to walk it again."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


@dataclass(frozen=True, slots=True)
class WorkerRole:
    """What makes a gateway one of the workers of ``bomstream serve --workers N``."""

    index: int
    # prometheus-client's multiprocess directory, shared by all the workers.
    metrics_dir: str


def make_app(cfg: Config, role: WorkerRole | None = None) -> web.Application:
    metrics = Metrics(multiprocess_dir=role.metrics_dir if role is not None else None)
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
    gw = Gateway(
        cfg=cfg,
        hub=hub,
        broker=broker,
        metrics=metrics,
        auth=auth,
        recall=recall,
        worker=role.index if role is not None else None,
    )
    app = web.Application(
        middlewares=[error_middleware(streams={handle_stream, handle_multi_stream})],
        client_max_size=cfg.limits.max_event_bytes + BODY_SLACK,
    )
    app[GATEWAY] = gw
    browser_routes = []
    if not cfg.server.disable_stream:
        browser_routes.append(app.router.add_get("/api/enrichment/stream/{bom_id}", handle_stream))
        browser_routes.append(app.router.add_get("/api/enrichment/stream", handle_multi_stream))
    # A path's methods are added one after the other: aiohttp makes them one
    # resource only then, and CORS answers a preflight per resource.
    browser_routes.append(app.router.add_get("/api/enrichment/events/{bom_id}", handle_poll))
    browser_routes.append(app.router.add_post("/api/enrichment/events/{bom_id}", handle_publish))
    browser_routes.append(app.router.add_get("/api/enrichment/events", handle_multi_poll))
    browser_routes.append(app.router.add_post("/api/enrichment/tickets", handle_ticket))
    setup_cors(app, cfg.cors, browser_routes)
    app.router.add_get("/api/enrichment/health", handle_health)
    app.router.add_get("/metrics", handle_metrics)
    add_pages(app)
    app.cleanup_ctx.append(_background_tasks)
    app.on_response_prepare.append(name_server)
    app.on_shutdown.append(_end_streams)
    return app


async def _background_tasks(app: web.Application) -> AsyncIterator[None]:
    """Owner tasks of the broker connection, the history connections, the buffer
    sweeper and the loop-lag probe."""
    gw = app[GATEWAY]
    tasks = [
        asyncio.create_task(gw.broker.run(), name="broker"),
        asyncio.create_task(gw.recall.run(), name="history"),
        asyncio.create_task(gw.hub.run_sweeper(), name="sweeper"),
        asyncio.create_task(probe_loop_lag(gw.metrics.loop_lag), name="loop-lag"),
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
    gw = app[GATEWAY]
    ended = gw.hub.end_all(SERVER_SHUTDOWN)
    log.info("shutting down", extra={FIELDS: {"streams_ended": ended}})
    # Ended streams close their connections once their last frame is sent;
    # aiohttp no longer tracks those connections, so wait for them here.
    await gw.handed_over.wait_closed(gw.cfg.server.shutdown_grace_s)


@dataclass(slots=True)
class RunningGateway:
    runner: web.AppRunner
    app: web.Application
    host: str
    port: int

    @property
    def url(self) -> str:
        return http_url(self.host, self.port)

    @property
    def gateway(self) -> Gateway:
        return self.app[GATEWAY]

    async def stop(self) -> None:
        await self.runner.cleanup()


def http_url(host: str, port: int) -> str:
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{port}"


def listening_fields(cfg: Config) -> dict[str, str]:
    """What the ``bomstream listening`` line says besides the address."""
    return {
        "broker": "redis" if cfg.redis.url else "embedded",
        "subscribe": cfg.redis.subscribe_mode if cfg.redis.url else "-",
        "history": cfg.history_backend,
        "auth": "open" if cfg.open_mode else "token",
    }


async def start(cfg: Config, role: WorkerRole | None = None) -> RunningGateway:
    """Start listening; ``server.port = 0`` picks a free port.

    A worker (``role``) joins the other workers on the port its supervisor
    reserved: SO_REUSEPORT lets each bind it, and the kernel spreads new
    connections over them.
    """
    app = make_app(cfg, role)
    runner = GatewayRunner(
        app,
        shutdown_timeout=cfg.server.shutdown_grace_s,
        # aiohttp's handler default is an hour; a proxy in front (nginx keeps
        # idle upstream connections 60 s) should always be the side that closes.
        keepalive_timeout=IDLE_KEEPALIVE_S,
        access_log=logging.getLogger("bomstream.access") if cfg.server.access_log else None,
        access_log_class=AccessLogger,
    )
    await runner.setup()
    site = web.TCPSite(
        runner,
        cfg.server.host,
        cfg.server.port,
        backlog=4096,
        reuse_address=True,
        reuse_port=role is not None,
    )
    try:
        await site.start()
    except BaseException:
        # setup() already started the owner tasks (Redis feed, sweeper); a
        # failed bind must stop them, or the process would never exit.
        await runner.cleanup()
        raise
    host, port = runner.addresses[0][:2]
    return RunningGateway(runner, app, str(host), int(port))


async def serve(
    cfg: Config,
    role: WorkerRole | None = None,
    *,
    stop: asyncio.Event | None = None,
    on_listening: Callable[[RunningGateway], None] | None = None,
) -> None:
    """Run until SIGTERM or SIGINT (or until ``stop`` is set), then shut down gracefully.

    A worker leaves the ``bomstream listening`` line to its supervisor, which
    logs it once every worker listens; ``on_listening`` is how a worker says so.
    """
    if stop is None:
        stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    running = await start(cfg, role)
    tune_gc()
    if role is None:
        log.info(
            "bomstream listening", extra={FIELDS: {"url": running.url, **listening_fields(cfg)}}
        )
    try:
        if on_listening is not None:
            on_listening(running)
        await stop.wait()
    finally:
        await running.stop()
        log.info("bomstream stopped" if role is None else "worker stopped")
