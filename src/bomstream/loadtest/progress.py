"""The live progress line on stderr, once a second."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable

from bomstream.loadtest.histogram import LogHistogram
from bomstream.loadtest.publisher import PublishStats
from bomstream.loadtest.records import Snapshot


class ProgressLine:
    def __init__(self, snapshot: Callable[[], Snapshot], streams: int) -> None:
        self._snapshot = snapshot
        self._streams = streams
        self.phase = "connect"
        self.publish: PublishStats | None = None
        self._tty = sys.stderr.isatty()

    async def run(self) -> None:
        started = last_t = time.monotonic()
        last_delivered = 0
        last_counts: dict[int, int] = {}
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            s = self._snapshot()
            rate = (s.delivered - last_delivered) / max(1e-9, now - last_t)
            last_delivered, last_t = s.delivered, now
            # The last second's p99 shows when a spike happened, not just that it did.
            counts = dict(s.latency.counts)
            recent = LogHistogram()
            for i, n in counts.items():
                if n > last_counts.get(i, 0):
                    recent.counts[i] = n - last_counts.get(i, 0)
                    recent.count += recent.counts[i]
            recent.max = LogHistogram.upper_bound(max(recent.counts, default=0))
            last_counts = counts
            sent = self.publish.sent if self.publish is not None else 0
            line = (
                f"[{now - started:6.1f}s {self.phase:>7}] "
                f"open {s.open_now}/{self._streams} "
                f"failed {s.failed} reconnects {s.reconnects} | "
                f"delivered {s.delivered} ({rate:,.0f}/s) | "
                f"p99 {s.latency.quantile(0.99) / 1000:.1f} ms"
                f" (last 1 s: {recent.quantile(0.99) / 1000:.1f} ms)"
            )
            if sent:
                line += f" | published {sent}"
            sys.stderr.write(("\r" + line + "\x1b[K") if self._tty else line + "\n")
            sys.stderr.flush()

    def finish(self) -> None:
        if self._tty:
            sys.stderr.write("\n")
