"""How long the supervisor waits before restarting a worker that died."""

from __future__ import annotations

# A restart takes this long at first; every death soon after a start doubles it,
# up to FIRST_DELAY_S * 16 = 8 s, so a worker is back within 10 s even when it
# keeps dying, while a crash loop costs one start every 8 s, not a busy loop.
FIRST_DELAY_S = 0.5
MAX_DELAY_S = 8.0
# A worker that stayed up this long died of something new: start over short.
STABLE_AFTER_S = 30.0


class RestartBackoff:
    def __init__(
        self,
        first_s: float = FIRST_DELAY_S,
        max_s: float = MAX_DELAY_S,
        stable_after_s: float = STABLE_AFTER_S,
    ) -> None:
        self._first = first_s
        self._max = max_s
        self._stable_after = stable_after_s
        self._next = first_s

    def next_delay(self, uptime_s: float) -> float:
        """The wait before the next start of a worker that ran ``uptime_s``."""
        if uptime_s >= self._stable_after:
            self._next = self._first
        delay = self._next
        self._next = min(self._next * 2, self._max)
        return delay
