"""A log-bucket latency histogram: constant memory, about 3% relative error."""

from __future__ import annotations

from typing import Any

# Sub-buckets per power of two: 32 keeps quantiles within ~3% of the truth.
_SUB_BITS = 5
_SUB = 1 << _SUB_BITS


class LogHistogram:
    """Counts non-negative integer samples (microseconds) in log-spaced buckets.

    Values below ``2 * _SUB`` get a bucket each; above that every power of two
    is split into ``_SUB`` equal buckets, so recording is a few integer ops.
    """

    __slots__ = ("count", "counts", "max", "total")

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}
        self.count = 0
        self.total = 0
        self.max = 0

    @staticmethod
    def index(value: int) -> int:
        if value < _SUB:
            return value if value > 0 else 0
        shift = value.bit_length() - _SUB_BITS - 1
        return ((shift + 1) << _SUB_BITS) + ((value >> shift) - _SUB)

    @staticmethod
    def upper_bound(index: int) -> int:
        """The largest value that falls in bucket ``index``."""
        if index < _SUB:
            return index
        shift = (index >> _SUB_BITS) - 1
        mantissa = (index & (_SUB - 1)) + _SUB
        return ((mantissa + 1) << shift) - 1

    def record(self, value: int) -> None:
        if value < 0:
            value = 0
        i = LogHistogram.index(value)
        counts = self.counts
        counts[i] = counts.get(i, 0) + 1
        self.count += 1
        self.total += value
        if value > self.max:
            self.max = value

    def merge(self, other: LogHistogram) -> None:
        for i, n in other.counts.items():
            self.counts[i] = self.counts.get(i, 0) + n
        self.count += other.count
        self.total += other.total
        self.max = max(self.max, other.max)

    def to_json(self) -> dict[str, Any]:
        """Buckets keyed by their upper bound in µs: readable, and exact to add up."""
        bound = LogHistogram.upper_bound
        return {
            "buckets_us": {str(bound(i)): self.counts[i] for i in sorted(self.counts)},
            "count": self.count,
            "total_us": self.total,
            "max_us": self.max,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LogHistogram:
        hist = cls()
        for bound, n in data["buckets_us"].items():
            hist.counts[LogHistogram.index(int(bound))] = int(n)
        hist.count = int(data["count"])
        hist.total = int(data["total_us"])
        hist.max = int(data["max_us"])
        return hist

    def quantile(self, q: float) -> int:
        """The upper bound of the bucket holding quantile ``q`` (capped at the max)."""
        if self.count == 0:
            return 0
        rank = max(1, int(q * self.count + 0.999999))
        seen = 0
        for i in sorted(self.counts):
            seen += self.counts[i]
            if seen >= rank:
                return min(LogHistogram.upper_bound(i), self.max)
        return self.max

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else 0.0
