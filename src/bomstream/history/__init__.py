"""Shared history: the durable record every instance can answer catch-up from.

``backend`` is the interface, ``redis_stream`` and ``postgres`` the two
backends, ``recall`` the one read path that loads a BOM's history into the
hub's process buffer (coalesced, bounded, and never on the live fan-out path).
"""

from __future__ import annotations

from bomstream.config import Config
from bomstream.history.backend import HistoryBackend
from bomstream.metrics import Metrics


def make_backend(cfg: Config, metrics: Metrics) -> HistoryBackend | None:
    """The configured backend, or None for ``history.backend = "none"``."""
    backend = cfg.history_backend
    if backend == "redis":
        from bomstream.history.redis_stream import RedisStreamHistory

        return RedisStreamHistory(cfg, metrics)
    if backend == "postgres":
        from bomstream.history.postgres import PostgresHistory

        return PostgresHistory(cfg)
    return None
