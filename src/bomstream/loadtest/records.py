"""What a load run measured, as plain records that travel between processes.

The stream driver fills them in, worker processes send them to the
coordinating process as JSON, and the report reads them. Counts from several
processes add up exactly: every field is a sum, a tally by name, a histogram
(bucket by bucket) or a time on the host's monotonic clock, which all
processes share.
"""

from __future__ import annotations

import os
import resource
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from bomstream.loadtest.histogram import LogHistogram
from bomstream.loadtest.procstat import ProcSample

# The integer fields of StreamCounts, summed when parts are merged.
_SUMMED = (
    "streams",
    "established",
    "subscriptions",
    "reconnects",
    "slow_consumers",
    "slow_consumers_cut",
    "expected",
    "received",
    "lost",
    "duplicates",
    "out_of_order",
    "streams_with_loss",
    "misrouted",
    "foreign",
    "bytes",
    "keepalives",
)


@dataclass(slots=True)
class StreamCounts:
    """One process's streams (or several processes' together) after a run."""

    streams: int = 0
    established: int = 0
    # BOMs watched over the established streams (one each on single-BOM streams).
    subscriptions: int = 0
    reconnects: int = 0
    slow_consumers: int = 0
    slow_consumers_cut: int = 0
    expected: int = 0
    received: int = 0
    lost: int = 0
    duplicates: int = 0
    out_of_order: int = 0
    streams_with_loss: int = 0
    misrouted: int = 0
    foreign: int = 0
    bytes: int = 0
    keepalives: int = 0
    failed: Counter[str] = field(default_factory=Counter)
    end_reasons: Counter[str] = field(default_factory=Counter)
    latency: LogHistogram = field(default_factory=LogHistogram)
    # Host monotonic clock; 0.0 when it never happened.
    first_attempt_at: float = 0.0
    last_open_at: float = 0.0

    @property
    def connect_s(self) -> float:
        """From the first connection attempt to the last stream that opened."""
        return max(0.0, self.last_open_at - self.first_attempt_at)

    def add(self, other: StreamCounts) -> None:
        for name in _SUMMED:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.failed.update(other.failed)
        self.end_reasons.update(other.end_reasons)
        self.latency.merge(other.latency)
        starts = [t for t in (self.first_attempt_at, other.first_attempt_at) if t > 0]
        self.first_attempt_at = min(starts, default=0.0)
        self.last_open_at = max(self.last_open_at, other.last_open_at)

    @classmethod
    def merged(cls, parts: list[StreamCounts]) -> StreamCounts:
        total = cls()
        for part in parts:
            total.add(part)
        return total

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {name: getattr(self, name) for name in _SUMMED}
        out["failed"] = dict(self.failed)
        out["end_reasons"] = dict(self.end_reasons)
        out["latency"] = self.latency.to_json()
        out["first_attempt_at"] = self.first_attempt_at
        out["last_open_at"] = self.last_open_at
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StreamCounts:
        counts = cls()
        for name in _SUMMED:
            setattr(counts, name, int(data[name]))
        counts.failed = Counter({str(k): int(n) for k, n in data["failed"].items()})
        counts.end_reasons = Counter({str(k): int(n) for k, n in data["end_reasons"].items()})
        counts.latency = LogHistogram.from_json(data["latency"])
        counts.first_attempt_at = float(data["first_attempt_at"])
        counts.last_open_at = float(data["last_open_at"])
        return counts


@dataclass(frozen=True, slots=True)
class ClientUsage:
    """One client process's CPU over the measured phase (publishing and drain)."""

    pid: int
    role: str
    cpu_s: float
    wall_s: float

    @property
    def cpu_share(self) -> float | None:
        """CPU seconds per wall second: 1.0 is one core kept busy the whole phase."""
        return self.cpu_s / self.wall_s if self.wall_s > 0 else None

    def to_json(self) -> dict[str, Any]:
        return {"pid": self.pid, "role": self.role, "cpu_s": self.cpu_s, "wall_s": self.wall_s}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ClientUsage:
        return cls(int(data["pid"]), str(data["role"]), float(data["cpu_s"]), float(data["wall_s"]))


class CpuClock:
    """This process's user+system CPU seconds and wall time between start and stop."""

    def __init__(self, role: str) -> None:
        self.role = role
        self._cpu0 = 0.0
        self._t0: float | None = None
        self._usage: ClientUsage | None = None

    @staticmethod
    def _cpu() -> float:
        ru = resource.getrusage(resource.RUSAGE_SELF)
        return ru.ru_utime + ru.ru_stime

    def start(self) -> None:
        self._cpu0 = self._cpu()
        self._t0 = time.monotonic()

    def stop(self) -> ClientUsage:
        if self._usage is None:
            if self._t0 is None:
                # Never started: nothing was measured.
                self._usage = ClientUsage(os.getpid(), self.role, 0.0, 0.0)
            else:
                cpu = self._cpu() - self._cpu0
                self._usage = ClientUsage(os.getpid(), self.role, cpu, time.monotonic() - self._t0)
        return self._usage


@dataclass(frozen=True, slots=True)
class ClientPart:
    """A client process's usage and, if it held streams, what they counted."""

    usage: ClientUsage
    counts: StreamCounts | None


@dataclass(slots=True)
class Snapshot:
    """The running totals the progress line shows."""

    open_now: int = 0
    failed: int = 0
    reconnects: int = 0
    delivered: int = 0
    latency: LogHistogram = field(default_factory=LogHistogram)

    def add(self, other: Snapshot) -> None:
        self.open_now += other.open_now
        self.failed += other.failed
        self.reconnects += other.reconnects
        self.delivered += other.delivered
        self.latency.merge(other.latency)

    def to_json(self) -> dict[str, Any]:
        return {
            "open_now": self.open_now,
            "failed": self.failed,
            "reconnects": self.reconnects,
            "delivered": self.delivered,
            "latency": self.latency.to_json(),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Snapshot:
        return cls(
            int(data["open_now"]),
            int(data["failed"]),
            int(data["reconnects"]),
            int(data["delivered"]),
            LogHistogram.from_json(data["latency"]),
        )


@dataclass(frozen=True, slots=True)
class GatewayUsage:
    # Every figure is the sum over these processes.
    pids: tuple[int, ...]
    rss_kb_before: int
    rss_kb_connected: int
    rss_kb_held: int
    cpu_s_connect: float
    cpu_s_publish: float | None
    rss_kb_after_publish: int | None
    # Write calls over publishing and drain: with deliveries, how many
    # events each write carried.
    write_calls_publish: int | None = None

    @classmethod
    def of(
        cls,
        pids: tuple[int, ...],
        before: ProcSample | None,
        connected: ProcSample | None,
        held: ProcSample | None,
        pub_start: ProcSample | None,
        pub_end: ProcSample | None,
    ) -> GatewayUsage | None:
        if not pids or before is None or connected is None or held is None:
            return None
        cpu_publish = None
        rss_after = None
        writes = None
        if pub_start is not None and pub_end is not None and pub_end is not held:
            cpu_publish = round(pub_end.cpu_s - pub_start.cpu_s, 3)
            rss_after = pub_end.rss_kb
            if pub_start.write_calls is not None and pub_end.write_calls is not None:
                writes = pub_end.write_calls - pub_start.write_calls
        return cls(
            pids,
            before.rss_kb,
            connected.rss_kb,
            held.rss_kb,
            round(connected.cpu_s - before.cpu_s, 3),
            cpu_publish,
            rss_after,
            writes,
        )
