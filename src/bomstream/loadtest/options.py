"""What a load run is asked to do: the options every part of the client reads."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

PublishVia = Literal["redis", "http", "none"]


@dataclass(frozen=True, slots=True)
class LoadOptions:
    url: str
    connections: int
    boms: int
    connect_rate: float = 2000.0
    source_ips: int = 1
    rate: float = 0.0
    duration: float = 0.0
    hold_s: float = 0.0
    drain_s: float = 5.0
    connect_timeout_s: float = 10.0
    publish_via: PublishVia = "none"
    redis_url: str = ""
    channel_prefix: str = "enrichment:"
    token: str | None = None
    token_for: Callable[[int], str] | None = None
    publish_token: str | None = None
    org: str | None = None
    bom_prefix: str = "lt"
    gateway_pid: int | None = None
    reconnect: bool = True
    slow_consumers: int = 0
    progress: bool = True
