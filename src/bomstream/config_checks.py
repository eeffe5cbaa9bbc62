"""The rules a configuration must keep, each broken one a single line naming its key."""

from __future__ import annotations

import ipaddress
import re
from urllib.parse import urlsplit

from bomstream.config import (
    HISTORY_BACKENDS,
    MAX_BOMS_PER_STREAM,
    SUBSCRIBE_MODES,
    Config,
    ConfigError,
)
from bomstream.events import EVENT_TYPE_RE

# A table name, optionally schema-qualified; it is quoted into SQL, so nothing else passes.
TABLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}(\.[A-Za-z_][A-Za-z0-9_]{0,62})?")


def validate(cfg: Config) -> None:
    s = cfg.server
    _check(0 <= s.port <= 65535, "server.port", f"must be 0..65535, got {s.port}")
    _check(s.workers >= 0, "server.workers", "must be 0 (one per CPU) or more")
    _check(s.heartbeat_s > 0, "server.heartbeat_s", "must be greater than 0")
    _check(s.retry_ms >= 0, "server.retry_ms", "must not be negative")
    _check(s.max_stream_s >= 0, "server.max_stream_s", "must not be negative")
    _check(s.max_stream_jitter_s >= 0, "server.max_stream_jitter_s", "must not be negative")
    _check(s.max_connections > 0, "server.max_connections", "must be greater than 0")
    _check(s.send_queue_bytes >= 1024, "server.send_queue_bytes", "must be at least 1024")
    _check(s.shutdown_grace_s >= 0, "server.shutdown_grace_s", "must not be negative")
    _check(s.log_format in ("text", "json"), "server.log_format", "must be 'text' or 'json'")
    _check(
        s.log_level in ("debug", "info", "warning", "error"),
        "server.log_level",
        "must be debug, info, warning or error",
    )
    b = cfg.buffer
    _check(b.events_per_bom > 0, "buffer.events_per_bom", "must be greater than 0")
    _check(b.retention_s > 0, "buffer.retention_s", "must be greater than 0")
    _check(b.max_boms > 0, "buffer.max_boms", "must be greater than 0")
    r = cfg.redis
    if r.url:
        _check(
            r.url.startswith(("redis://", "rediss://", "unix://")),
            "redis.url",
            "must start with redis://, rediss:// or unix://",
        )
    _check(bool(r.channel_prefix), "redis.channel_prefix", "must not be empty")
    _check(r.backoff_initial_s > 0, "redis.backoff_initial_s", "must be greater than 0")
    _check(r.backoff_max_s >= r.backoff_initial_s, "redis.backoff_max_s", "must be >= initial")
    _check(r.health_check_s >= 0, "redis.health_check_s", "must not be negative")
    if s.workers != 1 and not r.url:
        many = "0 (one per CPU)" if s.workers == 0 else str(s.workers)
        raise ConfigError(
            f"server.workers: {many} needs redis.url; on the embedded broker an event"
            " published to one worker would never reach the others"
        )
    _validate_history(cfg)
    _validate_subscribe(cfg)
    _check(bool(cfg.auth.org_claim), "auth.org_claim", "must not be empty")
    _check(cfg.auth.leeway_s >= 0, "auth.leeway_s", "must not be negative")
    _check(cfg.auth.ticket_ttl_s > 0, "auth.ticket_ttl_s", "must be greater than 0")
    _check(
        cfg.limits.max_event_bytes >= 256, "limits.max_event_bytes", "must be at least 256 bytes"
    )
    _check(cfg.limits.max_streams_per_org >= 0, "limits.max_streams_per_org", "must be >= 0")
    _check(
        1 <= cfg.limits.max_boms_per_stream <= MAX_BOMS_PER_STREAM,
        "limits.max_boms_per_stream",
        f"must be from 1 to {MAX_BOMS_PER_STREAM}",
    )
    for t in cfg.events.terminal_types:
        _check(bool(EVENT_TYPE_RE.fullmatch(t)), "events.terminal_types", f"bad type {t!r}")
    if "*" in cfg.cors.allow_origins and cfg.cors.allow_credentials:
        raise ConfigError(
            "cors.allow_origins: '*' cannot be combined with cors.allow_credentials = true"
        )
    if cfg.open_mode and not _is_loopback(s.host):
        raise ConfigError(
            f"server.host: refusing to serve without auth on non-loopback host {s.host!r};"
            " set auth.admin_token or auth.jwt_secret"
        )


def _validate_history(cfg: Config) -> None:
    h = cfg.history
    if h.backend and h.backend not in HISTORY_BACKENDS:
        raise ConfigError(f"history.backend: must be none, redis or postgres, got {h.backend!r}")
    backend = cfg.history_backend
    if backend == "redis":
        _check(
            bool(cfg.redis.url),
            "history.backend",
            "'redis' keeps history in the Redis of redis.url, which is not set",
        )
    if backend == "postgres":
        _check(bool(h.url), "history.url", "required for history.backend = 'postgres'")
        try:
            parts = urlsplit(h.url)
            parts.port  # noqa: B018 - raises ValueError for a port that is not a number
        except ValueError:
            raise ConfigError("history.url: not a parsable URL") from None
        _check(
            parts.scheme in ("postgres", "postgresql"),
            "history.url",
            "must be a postgresql:// URL",
        )
    elif h.url:
        raise ConfigError(
            "history.url: only the postgres backend reads it"
            " (the redis backend uses redis.url, so it can append and PUBLISH in one step)"
        )
    _check(bool(h.key_prefix), "history.key_prefix", "must not be empty")
    _check(
        TABLE_NAME.fullmatch(h.table) is not None,
        "history.table",
        "must be a table name (letters, digits, _; optionally schema.table)",
    )
    _check(h.timeout_s > 0, "history.timeout_s", "must be greater than 0")
    _check(h.pool_size >= 1, "history.pool_size", "must be at least 1")


def _validate_subscribe(cfg: Config) -> None:
    r = cfg.redis
    if r.subscribe and r.subscribe not in SUBSCRIBE_MODES:
        raise ConfigError(f"redis.subscribe: must be pattern or interest, got {r.subscribe!r}")
    _check(r.unsubscribe_grace_s >= 0, "redis.unsubscribe_grace_s", "must not be negative")
    if r.cluster:
        _check(
            r.subscribe != "pattern",
            "redis.subscribe",
            "'pattern' cannot be used with redis.cluster = true (sharded pub/sub has no"
            " patterns); leave it empty or set 'interest'",
        )
        _check(bool(r.url), "redis.cluster", "needs redis.url (any one node of the cluster)")
        _check(
            r.url.startswith(("redis://", "rediss://")),
            "redis.cluster",
            "needs a redis:// or rediss:// URL of a cluster node",
        )
        # The channel's hash slot must be the one its history keys are tagged with.
        _check(
            "{" not in r.channel_prefix and "}" not in r.channel_prefix,
            "redis.channel_prefix",
            "must not contain { or } with redis.cluster = true",
        )
    if not r.interest:
        return
    _check(bool(r.url), "redis.subscribe", "'interest' needs redis.url")
    if cfg.history_backend == "none":
        raise ConfigError(
            "history.backend: 'none' cannot be used with interest subscriptions"
            f" (redis.subscribe = 'interest'{', implied by redis.cluster' if r.cluster else ''}):"
            " a newly watched BOM takes its catch-up from history"
        )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")
