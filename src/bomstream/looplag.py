"""Event-loop lag: how late the loop runs a timer that is due.

Everything the gateway does runs on one event loop, so a long pause there (a
garbage collection, a burst of connects) delays every stream's frames by as
much. One task samples it; nothing here is per stream.
"""

from __future__ import annotations

import asyncio

from prometheus_client import Histogram

# Often enough to see a pause of a few tens of milliseconds, cheap enough to
# leave on: twenty timer wake-ups a second.
PROBE_INTERVAL_S = 0.05


async def probe_loop_lag(lag: Histogram, interval: float = PROBE_INTERVAL_S) -> None:
    """Sleep ``interval`` again and again; record how late each wake-up came."""
    loop = asyncio.get_running_loop()
    while True:
        due = loop.time() + interval
        await asyncio.sleep(interval)
        lag.observe(max(0.0, loop.time() - due))
