"""``bomstream serve --workers N``: several gateway processes on one port.

A supervisor process (``multiprocess``) reserves the port (``listen``),
starts N workers (``worker_process``), restarts one that dies (``backoff``)
and forwards SIGTERM/SIGINT to all of them. Each worker is a whole gateway,
with its own Redis subscription, hub and limits; ``handoff`` is what the
supervisor tells a worker and what the worker answers, ``worker`` the
worker's side of it.
"""

from __future__ import annotations

import os


def worker_count(configured: int) -> int:
    """``server.workers``, with 0 meaning one per CPU this process may run on."""
    if configured > 0:
        return configured
    try:
        # The affinity mask, not the machine's CPUs: taskset and cpusets
        # (docker --cpuset-cpus) narrow it. A CPU quota (docker --cpus) does not.
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        return os.cpu_count() or 1
