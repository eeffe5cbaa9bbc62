"""What a load run is asked to do: the options every part of the client reads."""

from __future__ import annotations

import dataclasses
import secrets
from dataclasses import dataclass
from typing import Any, Literal

from bomstream.loadtest.token import TokenMint

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
    # A JWT per stream instead of ``token``.
    mint: TokenMint | None = None
    publish_token: str | None = None
    org: str | None = None
    bom_prefix: str = "lt"
    # Processes whose RSS and CPU are sampled and summed: a gateway, or every
    # worker of ``serve --workers N`` (the supervisor serves nothing).
    gateway_pids: tuple[int, ...] = ()
    reconnect: bool = True
    slow_consumers: int = 0
    progress: bool = True
    # Client processes holding the streams; 1 keeps everything in this one.
    workers: int = 1
    # BOMs listed on each stream (``?bom_id=A&bom_id=B...``); 0: one BOM per
    # stream on ``/stream/{bom_id}``.
    boms_per_stream: int = 0

    def token_for(self, number: int) -> str | None:
        """The bearer token of stream ``number``."""
        return self.mint.for_stream(number) if self.mint is not None else self.token

    def for_worker(self) -> LoadOptions:
        """What a worker process needs: its streams' options, not the publisher's secrets."""
        return dataclasses.replace(self, publish_token=None, redis_url="", gateway_pids=())

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LoadOptions:
        mint = data.get("mint")
        return cls(
            **{
                **data,
                "mint": TokenMint(**mint) if mint is not None else None,
                "gateway_pids": tuple(data.get("gateway_pids", ())),
            }
        )


def new_run_id() -> str:
    """Tags this run's event ids, so events of other runs are told apart."""
    return secrets.token_hex(4)


def bom_ids(opts: LoadOptions, run_id: str) -> list[str]:
    """The run's BOM ids; :func:`watched` says which a stream watches."""
    return [f"{opts.bom_prefix}{run_id}-{b}" for b in range(opts.boms)]


def watched(opts: LoadOptions, number: int) -> list[int]:
    """The BOMs (indexes into :func:`bom_ids`) stream ``number`` watches.

    One per stream: BOM ``n % B``. K per stream: the K that follow ``n * K``
    round the ring of B, so consecutive streams tile the BOMs and every BOM
    is listed equally often when B divides streams times K, as single
    streams spread over them.
    """
    k = max(1, opts.boms_per_stream)
    return [(number * k + i) % opts.boms for i in range(k)]
