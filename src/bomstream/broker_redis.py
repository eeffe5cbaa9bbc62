"""The Redis broker: one pattern subscription per process feeds the hub.

Workers publish with plain ``PUBLISH enrichment:<bom_id> <json>``. This
process holds ONE connection running ``PSUBSCRIBE <prefix>*``. It is read by
an asyncio protocol with the hiredis parser: each socket read is parsed in one
go and every message in it is handed to the hub synchronously, so a burst of
events costs one wake-up, not one per message.

One owner task (:meth:`RedisBroker.run`) holds the connection, reconnects
with exponential backoff and full jitter, and pings an idle link so a dead
peer is noticed. Publishing (the HTTP publish endpoint) uses a separate,
ordinary redis-py client, since a subscribed connection cannot PUBLISH.
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast
from urllib.parse import unquote, urlsplit

import hiredis

from bomstream.config import Config
from bomstream.events import Event, EventRejected, is_valid_bom_id, parse_event
from bomstream.hub import Hub
from bomstream.logs import FIELDS, DropReporter
from bomstream.metrics import Metrics
from bomstream.publisher import AsyncPublisher, PublishSettings

log = logging.getLogger("bomstream.redis")

CONNECT_TIMEOUT_S = 5.0


class FeedError(Exception):
    """The subscription cannot go on (error reply, silent peer)."""


@dataclass(frozen=True, slots=True)
class RedisTarget:
    host: str
    port: int
    unix_path: str | None
    username: str | None
    password: str | None
    tls: bool

    @property
    def display(self) -> str:
        # Never the password.
        return self.unix_path or f"{self.host}:{self.port}"


def parse_redis_url(url: str) -> RedisTarget:
    parts = urlsplit(url)
    username = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password else None
    if parts.scheme == "unix":
        return RedisTarget("", 0, parts.path, username, password, False)
    return RedisTarget(
        parts.hostname or "127.0.0.1",
        parts.port or 6379,
        None,
        username,
        password,
        parts.scheme == "rediss",
    )


def encode_command(*args: bytes) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        out.append(b"$%d\r\n%s\r\n" % (len(a), a))
    return b"".join(out)


class _FeedProtocol(asyncio.Protocol):
    def __init__(self, broker: RedisBroker) -> None:
        loop = asyncio.get_running_loop()
        self._broker = broker
        self._reader = hiredis.Reader()
        # Both futures carry an exception as their result rather than raising it,
        # so one that nobody awaits (the link died first) is never reported as lost.
        self.subscribed: asyncio.Future[BaseException | None] = loop.create_future()
        self.closed: asyncio.Future[BaseException | None] = loop.create_future()
        self.last_seen = time.monotonic()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A cast, not an isinstance check: uvloop's TCP transport does not
        # derive from asyncio.Transport, and `bomstream serve` runs on uvloop.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.last_seen = time.monotonic()
        reader = self._reader
        try:
            reader.feed(data)
            while (reply := reader.gets()) is not False:
                self._on_reply(reply)
        except hiredis.ProtocolError as exc:
            self._fail(FeedError(f"protocol error from Redis: {exc}"))

    def _on_reply(self, reply: object) -> None:
        if isinstance(reply, list) and reply:
            kind = reply[0]
            if kind == b"pmessage" and len(reply) == 4:
                self._broker.on_message(reply[2], reply[3])
            elif kind == b"psubscribe" and not self.subscribed.done():
                self.subscribed.set_result(None)
            return
        if isinstance(reply, hiredis.ReplyError):
            self._fail(FeedError(f"Redis refused: {reply}"))

    def _fail(self, exc: BaseException) -> None:
        if not self.closed.done():
            self.closed.set_result(exc)
        if not self.subscribed.done():
            self.subscribed.set_result(exc)
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc: BaseException | None) -> None:
        if not self.closed.done():
            self.closed.set_result(exc or ConnectionResetError("Redis closed the connection"))
        if not self.subscribed.done():
            self.subscribed.set_result(ConnectionResetError("Redis closed the connection"))


class RedisBroker:
    def __init__(
        self,
        cfg: Config,
        hub: Hub,
        metrics: Metrics,
        record: Callable[[Event], None] | None = None,
    ) -> None:
        """``record`` stores each accepted feed event in shared history."""
        self._cfg = cfg
        self._record = record
        self._hub = hub
        self._metrics = metrics
        self._target = parse_redis_url(cfg.redis.url)
        self._prefix = cfg.redis.channel_prefix.encode()
        self._connected = False
        self._publisher: AsyncPublisher | None = None
        self._drops = DropReporter(log, "redis")
        self._max_bytes = cfg.limits.max_event_bytes
        self._terminal = frozenset(cfg.events.terminal_types)

    @property
    def status(self) -> str:
        return "connected" if self._connected else "disconnected"

    @property
    def healthy(self) -> bool:
        return self._connected

    # -- the feed ------------------------------------------------------------

    def on_message(self, channel: bytes, data: bytes) -> None:
        """One pub/sub message: validate, then hand to the hub. Never raises."""
        try:
            bom_id = channel[len(self._prefix) :].decode()
        except UnicodeDecodeError:
            bom_id = ""
        if not is_valid_bom_id(bom_id):
            self._drop("invalid_bom_id")
            return
        try:
            event = parse_event(
                data, bom_id, max_bytes=self._max_bytes, terminal_types=self._terminal
            )
        except EventRejected as exc:
            self._drop(exc.code)
            return
        if self._hub.ingest(event, "redis") and self._record is not None:
            self._record(event)

    def _drop(self, reason: str) -> None:
        self._metrics.events_dropped.labels(reason).inc()
        self._drops.drop(reason)

    async def run(self) -> None:
        """Owner task of the subscription: connect, read, and reconnect forever."""
        rc = self._cfg.redis
        failures = 0
        while True:
            try:
                await self._session()
                failures = 0
            except asyncio.CancelledError:
                raise
            except (OSError, FeedError, TimeoutError) as exc:
                if failures == 0:
                    log.warning(
                        "redis feed lost: %s",
                        str(exc) or type(exc).__name__,
                        extra={FIELDS: {"redis": self._target.display}},
                    )
                failures += 1
            finally:
                self._set_connected(False)
            ceiling = min(rc.backoff_max_s, rc.backoff_initial_s * (2 ** min(failures, 20)))
            # Full jitter: many gateways restarting together must not reconnect in step.
            await asyncio.sleep(random.uniform(rc.backoff_initial_s, ceiling))
            self._metrics.redis_reconnects.inc()

    async def _session(self) -> None:
        loop = asyncio.get_running_loop()
        t = self._target
        proto = _FeedProtocol(self)
        if t.unix_path:
            connect = loop.create_unix_connection(lambda: proto, t.unix_path)
        else:
            ctx = ssl.create_default_context() if t.tls else None
            connect = loop.create_connection(lambda: proto, t.host, t.port, ssl=ctx)
        # asyncio.timeout rather than wait_for: on 3.11, wait_for can swallow a
        # cancellation that arrives as the inner wait completes, and this task
        # must always stop when it is cancelled.
        async with asyncio.timeout(CONNECT_TIMEOUT_S):
            transport, _ = await connect
        try:
            if t.password is not None:
                auth = [b"AUTH"]
                if t.username:
                    auth.append(t.username.encode())
                auth.append(t.password.encode())
                transport.write(encode_command(*auth))
            transport.write(encode_command(b"PSUBSCRIBE", self._prefix + b"*"))
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                failure = await asyncio.shield(proto.subscribed)
            if failure is not None:
                raise failure
            self._set_connected(True)
            log.info(
                "redis feed subscribed",
                extra={FIELDS: {"redis": t.display, "pattern": self._prefix.decode() + "*"}},
            )
            await self._watch(proto, transport)
        finally:
            transport.abort()

    async def _watch(self, proto: _FeedProtocol, transport: asyncio.Transport) -> None:
        """Wait for the connection to end; ping it when idle so a dead peer shows."""
        interval = self._cfg.redis.health_check_s
        if interval <= 0:
            exc = await proto.closed
            raise exc if isinstance(exc, Exception) else ConnectionResetError("closed")
        while True:
            try:
                async with asyncio.timeout(interval):
                    exc = await asyncio.shield(proto.closed)
            except TimeoutError:
                idle = time.monotonic() - proto.last_seen
                if idle > 2 * interval:
                    raise FeedError(f"no reply from Redis for {idle:.1f}s") from None
                if idle >= interval:
                    transport.write(encode_command(b"PING"))
                continue
            raise exc if isinstance(exc, Exception) else ConnectionResetError("closed")

    def _set_connected(self, value: bool) -> None:
        if self._connected != value:
            self._connected = value
            self._metrics.redis_connected.set(1 if value else 0)

    # -- publishing ----------------------------------------------------------

    async def publish(self, event: Event) -> None:
        if self._publisher is None:
            # With Redis history on, this appends and PUBLISHes in one script.
            self._publisher = AsyncPublisher.from_settings(PublishSettings.from_config(self._cfg))
        await self._publisher.publish_event(event)
        # Counted here as taken in over HTTP; it is counted again as "redis" by
        # every instance (this one included) when it comes back through the feed.
        self._metrics.events_received.labels("http").inc()

    async def close(self) -> None:
        if self._publisher is not None:
            await self._publisher.close()
            self._publisher = None
