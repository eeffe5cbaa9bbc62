"""The one read path into shared history.

When the process buffer cannot answer for a BOM (this instance has never
loaded it: a fresh instance, or a BOM it only holds since it started), the
stream, poll and ticket handlers ``await recall.ensure(bom_id)`` before they
decide anything. That loads the BOM's history once, merges it into the hub's
buffer, and from then on the buffer answers, exactly as it always has: the
hub's synchronous "read catch-up and register" step stays the only place
where catch-up is decided, so history adds no race with live events.

Concurrent requests for one BOM share one read (a reconnect herd to a fresh
instance costs one history read), each read is bounded in rows and time, and
a history server that fails is left alone for a moment so that requests
carry on from the buffer instead of waiting on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from typing import Literal

from bomstream.config import Config
from bomstream.eventloop import raise_if_cancelled
from bomstream.events import Event, EventRejected, parse_event
from bomstream.history.backend import HistoryBackend, HistoryError
from bomstream.hub import Hub
from bomstream.logs import FIELDS, DropReporter
from bomstream.metrics import Metrics

log = logging.getLogger("bomstream.history")

Status = Literal["ok", "down", "disabled"]
# After a failed read or ping, requests skip history this long (and get the
# buffer's answer at once) before the next try.
DOWN_BACKOFF_S = 2.0
PING_INTERVAL_S = 5.0
# A BOM that history knows nothing of is not asked about again for this long
# (a page opened before its job starts polls every few seconds).
EMPTY_TTL_S = 1.0
EMPTY_CACHE_SIZE = 10000


class Recall:
    def __init__(
        self, cfg: Config, hub: Hub, metrics: Metrics, backend: HistoryBackend | None
    ) -> None:
        self._cfg = cfg
        self._hub = hub
        self._metrics = metrics
        self._backend = backend
        self._limit = cfg.buffer.events_per_bom
        self._timeout = cfg.history.timeout_s
        self._loads: dict[str, asyncio.Task[None]] = {}
        self._empty: OrderedDict[str, float] = OrderedDict()
        self._down_until = 0.0
        self._up = backend is not None
        self._drops = DropReporter(log, "history")
        self._terminal = frozenset(cfg.events.terminal_types)
        self.reads = 0

    @property
    def status(self) -> Status:
        if self._backend is None:
            return "disabled"
        return "ok" if self._up else "down"

    async def ensure(self, bom_id: str) -> None:
        """Make the hub's buffer able to answer for ``bom_id``. Never raises for
        history trouble: when history cannot answer, the buffer answers alone."""
        if self._backend is None or not self._hub.needs_history(bom_id):
            return
        now = time.monotonic()
        if now < self._down_until:
            return
        if not self._hub.knows(bom_id):
            seen = self._empty.get(bom_id)
            if seen is not None and now - seen < EMPTY_TTL_S:
                return
        load = self._loads.get(bom_id)
        if load is None:
            load = asyncio.create_task(self._load(bom_id), name="history-read")
            self._loads[bom_id] = load
        # One waiter going away (a client disconnect) must not cancel the
        # read the others wait on.
        await asyncio.shield(load)

    async def _load(self, bom_id: str) -> None:
        assert self._backend is not None
        started = time.perf_counter()
        self.reads += 1
        try:
            async with asyncio.timeout(self._timeout):
                rows = await self._backend.read(bom_id, self._limit)
        except (HistoryError, TimeoutError) as exc:
            self._metrics.history_reads.labels("error").inc()
            self._set_down(str(exc) or type(exc).__name__)
            return
        finally:
            self._metrics.history_read_seconds.observe(time.perf_counter() - started)
            self._loads.pop(bom_id, None)
        self._set_up()
        events = self._parse(bom_id, rows)
        self._metrics.history_reads.labels("hit" if events else "miss").inc()
        if not events and not self._hub.knows(bom_id):
            self._remember_empty(bom_id)
        self._hub.merge_history(bom_id, events)

    def _parse(self, bom_id: str, rows: list[bytes]) -> list[Event]:
        out = []
        for raw in rows:
            try:
                ev = parse_event(
                    raw,
                    bom_id,
                    max_bytes=self._cfg.limits.max_event_bytes,
                    terminal_types=self._terminal,
                )
            except EventRejected as exc:
                self._metrics.events_dropped.labels(exc.code).inc()
                self._drops.drop(exc.code)
                continue
            out.append(ev)
        return out

    def _remember_empty(self, bom_id: str) -> None:
        self._empty[bom_id] = time.monotonic()
        self._empty.move_to_end(bom_id)
        while len(self._empty) > EMPTY_CACHE_SIZE:
            self._empty.popitem(last=False)

    def _set_down(self, why: str) -> None:
        self._down_until = time.monotonic() + DOWN_BACKOFF_S
        if self._up:
            self._up = False
            assert self._backend is not None
            log.warning(
                "history unavailable: %s", why, extra={FIELDS: {"backend": self._backend.name}}
            )

    def _set_up(self) -> None:
        self._down_until = 0.0
        if not self._up:
            self._up = True
            assert self._backend is not None
            log.info("history available", extra={FIELDS: {"backend": self._backend.name}})

    async def run(self) -> None:
        """Owner task: the backend's own task, and a ping that keeps ``status`` true."""
        if self._backend is None:
            await asyncio.Event().wait()
            return
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._backend.run(), name="history-backend")
            tg.create_task(self._watch(), name="history-ping")

    async def _watch(self) -> None:
        assert self._backend is not None
        while True:
            try:
                async with asyncio.timeout(self._timeout):
                    await self._backend.ping()
            except (HistoryError, TimeoutError) as exc:
                self._set_down(str(exc) or type(exc).__name__)
            else:
                self._set_up()
            raise_if_cancelled()
            await asyncio.sleep(PING_INTERVAL_S if self._up else DOWN_BACKOFF_S)

    async def close(self) -> None:
        loads = list(self._loads.values())
        for load in loads:
            load.cancel()
        for load in loads:
            with contextlib.suppress(asyncio.CancelledError):
                await load
        if self._backend is not None:
            await self._backend.close()
