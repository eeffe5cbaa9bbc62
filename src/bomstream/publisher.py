"""Publishing from Python workers (spec 8.1).

``Publisher`` (sync) and ``AsyncPublisher`` send one event the way the
gateway expects it: validated by the gateway's own :func:`parse_event`
(a bad event raises :class:`EventRejected` before anything is sent), an
``event_id`` assigned when missing, and, with Redis history on, appended to
the BOM's history and PUBLISHed in one atomic script, so a retried call with
the same ``event_id`` is stored and delivered once. On a Redis Cluster
(``redis.cluster = true``) the same goes through the cluster client, with
SPUBLISH to the BOM's shard channel and history keys in that channel's slot::

    from bomstream.publisher import Publisher

    publisher = Publisher.from_config()          # same config file and BOMSTREAM_* env
    publisher.publish(bom_id, {"event_type": "enrichment.progress", "state": {...}})
"""

from __future__ import annotations

import dataclasses
import json
import os
import uuid
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Self

import orjson
import redis
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ConstantBackoff
from redis.cluster import RedisCluster
from redis.retry import Retry as SyncRetry

from bomstream.config import DEFAULT_TERMINAL_TYPES, Config, ConfigError, load_config
from bomstream.events import Event, EventRejected, is_safe_event_id, is_valid_bom_id, parse_event
from bomstream.history.redis_scripts import (
    APPEND_AND_PUBLISH,
    APPEND_AND_SPUBLISH,
    append_keys,
)

__all__ = ["AsyncPublisher", "EventRejected", "Published", "Publisher", "prepare_event"]

# A connection dropped since its last use (Redis restarted, a failover) is
# retried on a fresh one, once, soon: a publish must fail fast when Redis is
# really down. Safe: the script stores an event_id once, and without history
# the gateways drop a repeated event_id.
RETRY_ON = [redis.ConnectionError, redis.TimeoutError]
SYNC_RETRY = SyncRetry(ConstantBackoff(0.05), retries=1)
ASYNC_RETRY = AsyncRetry(ConstantBackoff(0.05), retries=1)


@dataclass(frozen=True, slots=True)
class Published:
    event_id: str
    # True when the event_id was already stored: nothing was sent again.
    duplicate: bool
    # Subscribers the PUBLISH reached (gateway processes, with pattern subscriptions).
    receivers: int


def prepare_event(
    bom_id: str,
    event: Mapping[str, Any],
    *,
    max_event_bytes: int = 65536,
    terminal_types: Collection[str] = DEFAULT_TERMINAL_TYPES,
) -> Event:
    """The event as the gateway will accept it, or :class:`EventRejected`.

    Fills in what a worker may leave out: ``event_id`` (a UUID), ``bom_id``
    and ``created_at`` (now, UTC).
    """
    if not is_valid_bom_id(bom_id):
        raise EventRejected(
            "invalid_bom_id", "bom_id must match ^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"
        )
    obj = dict(event)
    if isinstance(obj.get("event_id"), uuid.UUID):
        obj["event_id"] = str(obj["event_id"])
    if not is_safe_event_id(obj.get("event_id")):
        obj["event_id"] = str(uuid.uuid4())
    obj.setdefault("bom_id", bom_id)
    obj.setdefault("created_at", _now())
    try:
        raw = orjson.dumps(obj)
    except orjson.JSONEncodeError:
        # Integers beyond 64 bits, which the standard library writes exactly.
        try:
            raw = json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()
        except (TypeError, ValueError) as exc:
            raise EventRejected("invalid_json", f"event is not JSON-serialisable: {exc}") from None
    return parse_event(raw, bom_id, max_bytes=max_event_bytes, terminal_types=terminal_types)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class PublishSettings:
    redis_url: str
    channel_prefix: str = "enrichment:"
    # None: PUBLISH only (history off, or kept elsewhere, e.g. the workers' Postgres table).
    history_key_prefix: str | None = "enrichment-history:"
    events_per_bom: int = 1000
    retention_s: float = 3600.0
    max_event_bytes: int = 65536
    terminal_types: tuple[str, ...] = DEFAULT_TERMINAL_TYPES
    timeout_s: float = 5.0
    # Redis Cluster: SPUBLISH, and history keys hash-tagged with the channel.
    cluster: bool = False
    # BOMs kept in history's recency indexes (buffer.max_boms).
    max_boms: int = 10_000

    @classmethod
    def from_config(cls, cfg: Config) -> PublishSettings:
        if not cfg.redis.url:
            raise ConfigError("redis.url: the publisher needs Redis")
        return cls(
            redis_url=cfg.redis.url,
            channel_prefix=cfg.redis.channel_prefix,
            history_key_prefix=cfg.history.key_prefix if cfg.history_backend == "redis" else None,
            events_per_bom=cfg.buffer.events_per_bom,
            retention_s=cfg.buffer.retention_s,
            max_event_bytes=cfg.limits.max_event_bytes,
            terminal_types=cfg.events.terminal_types,
            cluster=cfg.redis.cluster,
            max_boms=cfg.buffer.max_boms,
        )

    @property
    def script(self) -> str:
        return APPEND_AND_SPUBLISH if self.cluster else APPEND_AND_PUBLISH

    def prepare(self, bom_id: str, event: Mapping[str, Any]) -> Event:
        return prepare_event(
            bom_id,
            event,
            max_event_bytes=self.max_event_bytes,
            terminal_types=self.terminal_types,
        )

    def script_call(self, ev: Event, prefix: str) -> tuple[list[str], list[Any]]:
        channel = self.channel_prefix + ev.bom_id
        tag = channel if self.cluster else None
        ttl_ms = int(self.retention_s * 1000)
        args = [
            ev.event_id,
            ev.data,
            self.events_per_bom,
            ttl_ms,
            channel,
            self.max_boms,
            ev.bom_id,
        ]
        return append_keys(prefix, ev, tag), args


def _published(ev: Event, reply: Any) -> Published:
    entry, receivers = reply
    return Published(ev.event_id, duplicate=not entry, receivers=int(receivers))


class _PublisherBase:
    def __init__(
        self,
        redis_url: str,
        *,
        channel_prefix: str = "enrichment:",
        history_key_prefix: str | None = "enrichment-history:",
        events_per_bom: int = 1000,
        retention_s: float = 3600.0,
        max_event_bytes: int = 65536,
        terminal_types: tuple[str, ...] = DEFAULT_TERMINAL_TYPES,
        timeout_s: float = 5.0,
        cluster: bool = False,
        max_boms: int = 10_000,
    ) -> None:
        self.settings = PublishSettings(
            redis_url,
            channel_prefix,
            history_key_prefix,
            events_per_bom,
            retention_s,
            max_event_bytes,
            tuple(terminal_types),
            timeout_s,
            cluster,
            max_boms,
        )

    @classmethod
    def from_config(cls, path: str | os.PathLike[str] | None = None) -> Self:
        """Configured like the gateway: the config file (``./config.toml`` when
        present) and ``BOMSTREAM_*`` variables."""
        return cls.from_settings(PublishSettings.from_config(load_config(path)))

    @classmethod
    def from_settings(cls, settings: PublishSettings) -> Self:
        return cls(**dataclasses.asdict(settings))

    def _channel(self, ev: Event) -> str:
        return self.settings.channel_prefix + ev.bom_id


class Publisher(_PublisherBase):
    """Synchronous publisher (a Temporal activity, a script, a test)."""

    def __init__(self, redis_url: str, **options: Any) -> None:
        super().__init__(redis_url, **options)
        s = self.settings
        self._client: redis.Redis | RedisCluster
        if s.cluster:
            # Follows MOVED and failovers itself, re-reading the slot map.
            self._client = RedisCluster.from_url(
                s.redis_url, socket_connect_timeout=s.timeout_s, socket_timeout=s.timeout_s
            )
        else:
            self._client = redis.Redis.from_url(
                s.redis_url,
                socket_connect_timeout=s.timeout_s,
                socket_timeout=s.timeout_s,
                retry_on_error=RETRY_ON,
                retry=SYNC_RETRY,
            )
        self._script = self._client.register_script(s.script)

    def publish(self, bom_id: str, event: Mapping[str, Any]) -> Published:
        """Validate, then send. Raises :class:`EventRejected` (nothing sent) or a
        ``redis`` error; retrying with the same ``event_id`` is safe."""
        return self.publish_event(self.settings.prepare(bom_id, event))

    def publish_event(self, ev: Event) -> Published:
        """Send an event already checked by :func:`prepare_event`."""
        prefix = self.settings.history_key_prefix
        if prefix is None:
            if isinstance(self._client, RedisCluster):
                receivers = self._client.spublish(self._channel(ev), ev.data)
            else:
                receivers = self._client.publish(self._channel(ev), ev.data)
            return Published(ev.event_id, duplicate=False, receivers=int(receivers))
        keys, args = self.settings.script_call(ev, prefix)
        return _published(ev, self._script(keys=keys, args=args))

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncPublisher(_PublisherBase):
    """The same for asyncio code; the gateway's publish endpoint uses it too."""

    def __init__(self, redis_url: str, **options: Any) -> None:
        super().__init__(redis_url, **options)
        s = self.settings
        self._client: aioredis.Redis | AsyncRedisCluster
        if s.cluster:
            self._client = AsyncRedisCluster.from_url(
                s.redis_url, socket_connect_timeout=s.timeout_s, socket_timeout=s.timeout_s
            )
        else:
            self._client = aioredis.Redis.from_url(
                s.redis_url,
                socket_connect_timeout=s.timeout_s,
                socket_timeout=s.timeout_s,
                retry_on_error=RETRY_ON,
                retry=ASYNC_RETRY,
            )
        self._script = self._client.register_script(s.script)

    async def publish(self, bom_id: str, event: Mapping[str, Any]) -> Published:
        return await self.publish_event(self.settings.prepare(bom_id, event))

    async def publish_event(self, ev: Event) -> Published:
        prefix = self.settings.history_key_prefix
        if prefix is None:
            if isinstance(self._client, AsyncRedisCluster):
                receivers = await self._client.spublish(self._channel(ev), ev.data)
            else:
                receivers = await self._client.publish(self._channel(ev), ev.data)
            return Published(ev.event_id, duplicate=False, receivers=int(receivers))
        keys, args = self.settings.script_call(ev, prefix)
        return _published(ev, await self._script(keys=keys, args=args))

    async def close(self) -> None:
        await self._client.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
