"""Typed configuration: ``config.toml``, then ``BOMSTREAM_<SECTION>_<KEY>``, then CLI flags.

The whole tree is parsed once into frozen dataclasses; every component reads
its own section. Anything wrong raises :class:`ConfigError` whose message is a
single line naming the key or file, which the CLI prints before exiting 2.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import tomllib
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from bomstream.events import EVENT_TYPE_RE

ENV_PREFIX = "BOMSTREAM_"
DEFAULT_CONFIG_FILE = "config.toml"
# Credentials: a config error about one of these never repeats its value.
SECRET_KEYS = frozenset({"auth.admin_token", "auth.jwt_secret", "metrics.token", "history.url"})
DEFAULT_TERMINAL_TYPES = ("enrichment.completed", "enrichment.failed", "enrichment.error")
HISTORY_BACKENDS = ("none", "redis", "postgres")
SUBSCRIBE_MODES = ("pattern", "interest")
# 200 ids of 128 characters ("bom_id=...&" each) make a 27.4 KB URL, inside the
# 32 KiB request line the gateway accepts (bomstream.protocol).
MAX_BOMS_PER_STREAM = 200
# A table name, optionally schema-qualified; it is quoted into SQL, so nothing else passes.
_TABLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}(\.[A-Za-z_][A-Za-z0-9_]{0,62})?")


class ConfigError(Exception):
    """A configuration problem, phrased as one line that names the key or file."""


@dataclass(frozen=True, slots=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    # Gateway processes on the port; 0 = one per CPU this process may run on.
    workers: int = 1
    heartbeat_s: float = 15.0
    retry_ms: int = 3000
    max_stream_s: float = 0.0
    max_stream_jitter_s: float = 0.0
    max_connections: int = 50000
    send_queue_bytes: int = 1048576
    shutdown_grace_s: float = 10.0
    log_format: str = "text"
    log_level: str = "info"
    access_log: bool = True
    disable_stream: bool = False


@dataclass(frozen=True, slots=True)
class BufferConfig:
    events_per_bom: int = 1000
    retention_s: float = 3600.0
    max_boms: int = 10000


@dataclass(frozen=True, slots=True)
class RedisConfig:
    url: str = ""
    channel_prefix: str = "enrichment:"
    backoff_initial_s: float = 0.1
    backoff_max_s: float = 5.0
    health_check_s: float = 10.0
    # "" picks the default: "interest" with cluster = true, else "pattern".
    subscribe: str = ""
    unsubscribe_grace_s: float = 30.0
    cluster: bool = False

    @property
    def subscribe_mode(self) -> str:
        """``pattern`` or ``interest``, with the default resolved."""
        return self.subscribe or ("interest" if self.cluster else "pattern")

    @property
    def interest(self) -> bool:
        """Per-BOM subscriptions (``interest`` mode), which Redis Cluster implies."""
        return self.subscribe_mode == "interest"


@dataclass(frozen=True, slots=True)
class HistoryConfig:
    # "" picks the default: "redis" when redis.url is set, else "none".
    backend: str = ""
    url: str = ""
    key_prefix: str = "enrichment-history:"
    table: str = "enrichment_events"
    timeout_s: float = 2.0
    pool_size: int = 4

    def resolved_backend(self, redis_url: str) -> str:
        return self.backend or ("redis" if redis_url else "none")


@dataclass(frozen=True, slots=True)
class AuthConfig:
    admin_token: str = ""
    jwt_secret: str = ""
    jwt_public_key_file: str = ""
    jwks_file: str = ""
    jwt_algorithms: tuple[str, ...] = ()
    audience: str = ""
    issuer: str = ""
    # As PyJWT's own default: a token is refused, and its stream ended, at exp.
    leeway_s: float = 0.0
    org_claim: str = "organization_id"
    ticket_ttl_s: float = 60.0


@dataclass(frozen=True, slots=True)
class EventsConfig:
    terminal_types: tuple[str, ...] = DEFAULT_TERMINAL_TYPES


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    max_event_bytes: int = 65536
    max_streams_per_org: int = 0
    max_boms_per_stream: int = 100


@dataclass(frozen=True, slots=True)
class CorsConfig:
    allow_origins: tuple[str, ...] = ()
    allow_credentials: bool = False


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    token: str = ""


@dataclass(frozen=True, slots=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    buffer: BufferConfig = field(default_factory=BufferConfig)
    redis: RedisConfig = field(default_factory=RedisConfig)
    history: HistoryConfig = field(default_factory=HistoryConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    events: EventsConfig = field(default_factory=EventsConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    cors: CorsConfig = field(default_factory=CorsConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)

    @property
    def history_backend(self) -> str:
        """``none``, ``redis`` or ``postgres``, with the default resolved."""
        return self.history.resolved_backend(self.redis.url)

    @property
    def url_passwords(self) -> tuple[str, ...]:
        """Passwords inside the Redis and history URLs, for the log redactor."""
        out = []
        for url in (self.redis.url, self.history.url):
            try:
                password = urlsplit(url).password
            except ValueError:
                password = None
            if password:
                out.append(unquote(password))
        return tuple(out)

    @property
    def open_mode(self) -> bool:
        """No credential of any kind is configured: every request is let in."""
        a = self.auth
        return not (a.admin_token or a.jwt_secret or a.jwt_public_key_file or a.jwks_file)


def _section_types() -> dict[str, type[Any]]:
    hints = typing.get_type_hints(Config)
    return {f.name: hints[f.name] for f in dataclasses.fields(Config)}


def _key_types(section_cls: type[Any]) -> dict[str, Any]:
    hints = typing.get_type_hints(section_cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(section_cls)}


def _is_str_tuple(tp: Any) -> bool:
    return typing.get_origin(tp) is tuple


def _coerce(name: str, tp: Any, value: Any) -> Any:
    """Check a TOML value against the declared type (ints are fine where floats are)."""
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif _is_str_tuple(tp):
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return tuple(value)
        raise ConfigError(f"{name}: expected a list of strings, got {_describe(value)}")
    if name in SECRET_KEYS:
        raise ConfigError(f"{name}: expected {_type_name(tp)}, got a {type(value).__name__}")
    raise ConfigError(f"{name}: expected {_type_name(tp)}, got {_describe(value)}")


def _parse_env(name: str, tp: Any, text: str) -> Any:
    """Environment values are strings; lists are comma-separated."""
    try:
        if tp is bool:
            low = text.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off", ""):
                return False
            raise ValueError(text)
        if tp is int:
            return int(text.strip())
        if tp is float:
            return float(text.strip())
        if _is_str_tuple(tp):
            return tuple(part.strip() for part in text.split(",") if part.strip())
        return text
    except ValueError:
        raise ConfigError(f"{name}: expected {_type_name(tp)}, got {text!r}") from None


def _type_name(tp: Any) -> str:
    if _is_str_tuple(tp):
        return "a list of strings"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}.get(
        tp, str(tp)
    )


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"[:80]


def load_config(
    path: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    *,
    default_file: bool = True,
) -> Config:
    """Build the config from file, environment and overrides (``"server.port": 9000``).

    ``path=None`` reads ``./config.toml`` when it exists (unless ``default_file``
    is false), else the defaults.
    """
    env = os.environ if env is None else env
    sections = _section_types()
    values: dict[str, dict[str, Any]] = {name: {} for name in sections}

    file_data = _read_file(path) if path is not None or default_file else {}
    for section, table in file_data.items():
        if section not in sections:
            raise ConfigError(f"config: unknown section [{section}]")
        if not isinstance(table, dict):
            raise ConfigError(f"config: [{section}] must be a table")
        keys = _key_types(sections[section])
        for key, value in table.items():
            if key not in keys:
                raise ConfigError(f"{section}.{key}: unknown key")
            values[section][key] = _coerce(f"{section}.{key}", keys[key], value)

    for env_name, text in env.items():
        if not env_name.startswith(ENV_PREFIX):
            continue
        section, key = _split_env(env_name, sections)
        keys = _key_types(sections[section])
        values[section][key] = _parse_env(env_name, keys[key], text)

    for dotted, value in (overrides or {}).items():
        section, _, key = dotted.partition(".")
        if section not in sections or key not in _key_types(sections[section]):
            raise ConfigError(f"{dotted}: unknown key")
        if value is not None:
            keys = _key_types(sections[section])
            values[section][key] = _coerce(dotted, keys[key], value)

    cfg = Config(**{name: sections[name](**values[name]) for name in sections})
    _validate(cfg)
    return cfg


def _read_file(path: str | os.PathLike[str] | None) -> dict[str, Any]:
    if path is None:
        default = Path(DEFAULT_CONFIG_FILE)
        if not default.is_file():
            return {}
        path = default
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"{os.fspath(path)}: cannot read config file ({exc.strerror})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{os.fspath(path)}: not valid TOML ({exc})") from None


def _split_env(env_name: str, sections: dict[str, type[Any]]) -> tuple[str, str]:
    rest = env_name[len(ENV_PREFIX) :].lower()
    section, _, key = rest.partition("_")
    if section not in sections:
        raise ConfigError(f"{env_name}: unknown section {section!r}")
    if key not in _key_types(sections[section]):
        raise ConfigError(f"{env_name}: unknown key {section}.{key}")
    return section, key


def _validate(cfg: Config) -> None:
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
        _TABLE_NAME.fullmatch(h.table) is not None,
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


def describe_keys() -> list[tuple[str, str, str]]:
    """(dotted key, env var, default) for every key, for docs and ``--help``."""
    rows = []
    defaults = Config()
    for section, cls in _section_types().items():
        for key in _key_types(cls):
            value = getattr(getattr(defaults, section), key)
            if isinstance(value, tuple):
                value = list(value)
            rows.append((f"{section}.{key}", f"{ENV_PREFIX}{section}_{key}".upper(), repr(value)))
    return rows
