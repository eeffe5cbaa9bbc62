"""The clocks every open stream has: its heartbeat and its deadline
(``server.max_stream_s`` or the token's ``exp``), one wheel and one timer
for all streams rather than a timer per stream."""

from __future__ import annotations

import random
import time
from collections.abc import Callable

from bomstream.channel import Subscriber
from bomstream.config import ServerConfig
from bomstream.deadlines import Deadlines
from bomstream.events import KEEPALIVE_CHUNK
from bomstream.reasons import CLIENT_GONE, MAX_DURATION, TOKEN_EXPIRED
from bomstream.wheel import TimerWheel

Ending = Callable[[Subscriber, str], None]


class StreamTimers:
    def __init__(
        self,
        server: ServerConfig,
        *,
        end: Ending,
        finish: Ending,
        cut_slow: Callable[[Subscriber], None],
    ) -> None:
        self._server = server
        # end: with a stream_end frame (a deadline); finish: unregister only.
        self._finish = finish
        self._cut_slow = cut_slow
        self._beats: TimerWheel[Subscriber] = TimerWheel(server.heartbeat_s, self._heartbeat)
        self._deadlines: Deadlines[Subscriber] = Deadlines(end)

    def add(self, sub: Subscriber) -> None:
        sub._beat_slot = self._beats.add(sub)
        deadline = self._deadline_for(sub)
        if deadline is not None:
            reason, when = deadline
            sub._deadline_key = self._deadlines.add(sub, when, reason)

    def remove(self, sub: Subscriber) -> None:
        """Safe to call more than once."""
        if sub._beat_slot >= 0:
            self._beats.remove(sub, sub._beat_slot)
            sub._beat_slot = -1
        if sub._deadline_key >= 0:
            self._deadlines.remove(sub, sub._deadline_key)
            sub._deadline_key = -1

    def _deadline_for(self, sub: Subscriber) -> tuple[str, float] | None:
        """Seconds from now until the stream must end, and why."""
        candidates: list[tuple[str, float]] = []
        s = self._server
        if s.max_stream_s > 0:
            jitter = random.uniform(0, s.max_stream_jitter_s) if s.max_stream_jitter_s else 0.0
            candidates.append((MAX_DURATION, s.max_stream_s + jitter))
        expires_at = sub.principal.expires_at
        if expires_at is not None:
            candidates.append((TOKEN_EXPIRED, expires_at - time.time()))
        return min(candidates, key=lambda c: c[1]) if candidates else None

    def _heartbeat(self, sub: Subscriber) -> None:
        t = sub.transport
        if sub.reason is not None:
            return
        if t.is_closing():
            self._finish(sub, CLIENT_GONE)
            return
        t.write(KEEPALIVE_CHUNK)
        if t.get_write_buffer_size() > self._server.send_queue_bytes:
            self._cut_slow(sub)
