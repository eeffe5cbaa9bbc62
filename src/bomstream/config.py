"""Typed configuration: frozen dataclasses, one per section, that every
component reads its own part of. They are built by
:func:`bomstream.config_load.load_config` (``config.toml``, then
``BOMSTREAM_<SECTION>_<KEY>``, then CLI flags) and checked by
:mod:`bomstream.config_checks`; anything wrong raises :class:`ConfigError`,
whose message is a single line naming the key or file, which the CLI prints
before exiting 2.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

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
