"""Prometheus metrics, one registry per gateway (no process-wide globals).

Under ``bomstream serve --workers N`` each worker is a gateway of its own, and
prometheus-client's multiprocess mode keeps every worker's values in files of
one shared directory; a scrape of any worker then reads them all, so the one
shared port answers for the whole set. The gauges say how workers combine.
"""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

# prometheus-client reads it once, at import, to choose where values live.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
# Finer around the 20 ms a pause may cost at most.
LAG_BUCKETS = (
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1, 0.2, 0.5, 1.0, 2.5,
)  # fmt: skip


class Metrics:
    """Every metric the gateway exports. Updated once per event or per stream,
    never once per delivery."""

    def __init__(self, multiprocess_dir: str | None = None) -> None:
        """``multiprocess_dir``: the directory shared by a supervisor's workers,
        which must also be in ``PROMETHEUS_MULTIPROC_DIR`` from process start."""
        self.registry = CollectorRegistry(auto_describe=True)
        self._exposed = self.registry
        if multiprocess_dir is not None:
            self._exposed = _every_worker(multiprocess_dir)
        r = self.registry
        self.streams_active = Gauge(
            "bomstream_streams_active",
            "Open SSE streams (of every live worker).",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.streams_by_kind = Gauge(
            "bomstream_streams_by_kind",
            "Open SSE streams by kind: single (one BOM), multi (a list), org (scope=org).",
            ["kind"],
            registry=r,
            multiprocess_mode="livesum",
        )
        for kind in ("single", "multi", "org"):
            self.streams_by_kind.labels(kind)
        self.streams_opened = Counter(
            "bomstream_streams_opened",
            "Stream requests by result (ok or the HTTP status returned).",
            ["result"],
            registry=r,
        )
        self.events_received = Counter(
            "bomstream_events_received",
            "Events accepted into the broker, by source.",
            ["source"],
            registry=r,
        )
        self.events_delivered = Counter(
            "bomstream_events_delivered", "Event deliveries written to streams.", registry=r
        )
        self.events_dropped = Counter(
            "bomstream_events_dropped",
            "Events rejected or dropped, by reason.",
            ["reason"],
            registry=r,
        )
        self.slow_consumer_disconnects = Counter(
            "bomstream_slow_consumer_disconnects",
            "Streams cut because their unsent bytes passed server.send_queue_bytes.",
            registry=r,
        )
        self.stream_end = Counter(
            "bomstream_stream_end", "Streams ended, by reason.", ["reason"], registry=r
        )
        self.replay = Counter(
            "bomstream_replay",
            "Last-Event-ID lookups: hit (id held) or miss.",
            ["result"],
            registry=r,
        )
        self.redis_connected = Gauge(
            "bomstream_redis_connected",
            "1 while the Redis feed is subscribed (in every live worker).",
            registry=r,
            # One worker without its feed is enough to miss events: show 0.
            multiprocess_mode="livemin",
        )
        self.redis_reconnects = Counter(
            "bomstream_redis_reconnects", "Redis feed reconnect attempts.", registry=r
        )
        self.redis_feed_bytes = Counter(
            "bomstream_redis_feed_bytes",
            "Bytes read from Redis subscription connections (every node's, in a cluster).",
            registry=r,
        )
        self.redis_subscribed_channels = Gauge(
            "bomstream_redis_subscribed_channels",
            "Interest mode: BOM channels whose subscription Redis has confirmed.",
            registry=r,
        )
        self.redis_subscription_commands = Counter(
            "bomstream_redis_subscription_commands",
            "Interest mode: (S)SUBSCRIBE and (S)UNSUBSCRIBE commands sent"
            " (each names many channels).",
            ["command"],
            registry=r,
        )
        self.redis_subscription_changes = Counter(
            "bomstream_redis_subscription_changes",
            "Interest mode: channels asked to be subscribed or unsubscribed.",
            ["change"],
            registry=r,
        )
        self.redis_resyncs = Counter(
            "bomstream_redis_resyncs",
            "BOMs whose open streams waited while their lapsed subscription came back:"
            " filled from history, or unfilled (history could not be read).",
            ["result"],
            registry=r,
        )
        self.redis_shard_connected = Gauge(
            "bomstream_redis_shard_connected",
            "Redis Cluster: 1 while this node's subscription connection is up.",
            ["node"],
            registry=r,
        )
        self.redis_cluster_refreshes = Counter(
            "bomstream_redis_cluster_refreshes",
            "Redis Cluster: slot map reads.",
            registry=r,
        )
        self.auth_failures = Counter(
            "bomstream_auth_failures", "Rejected credentials, by reason.", ["reason"], registry=r
        )
        self.publish_to_write = Histogram(
            "bomstream_publish_to_write_seconds",
            "From an event's created_at (else its receipt) to its first write to streams.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.loop_lag = Histogram(
            "bomstream_loop_lag_seconds",
            "How late the event loop ran a timer that was due (sampled every 50 ms).",
            buckets=LAG_BUCKETS,
            registry=r,
        )

        self.history_reads = Counter(
            "bomstream_history_reads",
            "Shared-history reads: hit (events found), miss (none) or error.",
            ["result"],
            registry=r,
        )
        self.history_read_seconds = Histogram(
            "bomstream_history_read_seconds",
            "Duration of shared-history reads, errors included.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.history_writes = Counter(
            "bomstream_history_writes",
            "Events this instance offered to Redis history: stored, duplicate"
            " (stored already), dropped (queue full while Redis was away).",
            ["result"],
            registry=r,
        )

    def render(self) -> bytes:
        return generate_latest(self._exposed)


def _every_worker(path: str) -> CollectorRegistry:
    if os.environ.get(MULTIPROC_ENV) != path:
        # Too late to switch now: values of this process would stay in memory,
        # unseen by the other workers' scrapes.
        raise RuntimeError(f"{MULTIPROC_ENV} must be {path} before prometheus_client is imported")
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=path)  # type: ignore[no-untyped-call]  # untyped upstream
    return registry
