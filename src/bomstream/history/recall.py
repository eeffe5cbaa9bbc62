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

With interest subscriptions a :class:`Watcher` comes first: ``ensure``
holds interest in the BOM and waits until Redis has confirmed its
subscription, and only then reads history, so that everything published
before the subscription took effect is in what is read and everything after
it arrives live. When a lapsed subscription comes back, the watcher calls
:meth:`Recall.resync`, which reads history again for the streams waiting on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Literal, Protocol

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
# Re-reads after lapsed subscriptions in flight at once (a feed reconnect
# re-reads every watched BOM that has open streams).
RESYNC_READS = 32
# Waits between tries of such a re-read. A node that has just restarted can
# take seconds to answer reads again, and giving up leaves the streams a gap
# for good (the events in it may include the run's end), so they wait ~8 s.
RESYNC_RETRY_S = (0.25, 0.5, 1.0, 2.0, 4.0)
# Reads again at most this often in a row when the subscription keeps lapsing.
MAX_REREADS = 3


class Watcher(Protocol):
    """Interest subscriptions (bomstream.feeds.interest.Interest)."""

    on_live: Callable[[str], None]

    def hold(self, bom_id: str) -> AbstractAsyncContextManager[bool]:
        """Keep the BOM watched while a request works on it; yields once its
        subscription is live (False: it cannot be)."""
        ...

    def epoch(self, bom_id: str) -> int:
        """Changes whenever the BOM's subscription becomes live; -1 while it is not."""
        ...


class Recall:
    def __init__(
        self,
        cfg: Config,
        hub: Hub,
        metrics: Metrics,
        backend: HistoryBackend | None,
        watcher: Watcher | None = None,
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
        self._watcher = watcher
        self._resync_slots = asyncio.Semaphore(RESYNC_READS)
        self.reads = 0
        if watcher is not None:
            watcher.on_live = self.resync

    @property
    def status(self) -> Status:
        if self._backend is None:
            return "disabled"
        return "ok" if self._up else "down"

    async def ensure(self, bom_id: str) -> bool:
        """Make the hub's buffer able to answer for ``bom_id``. Never raises for
        history trouble: when history cannot answer, the buffer answers alone.
        False only with interest subscriptions, when the BOM's cannot be made
        live (its Redis connection is down): a stream must not open then."""
        if self._watcher is None:
            await self._ensure_loaded(bom_id)
            return True
        # Interest is held through the history read, so a slow read cannot
        # outlast the grace and lose the subscription it was made for.
        async with self._watcher.hold(bom_id) as live:
            if live:
                await self._ensure_loaded(bom_id)
        return live

    async def recent_boms(self, org: str | None, limit: int) -> list[str]:
        """An org's BOMs with the newest events, from history's index (for a
        ``scope=org`` catch-up on an instance that has not seen them); [] when
        history has no index or cannot answer."""
        if self._backend is None or time.monotonic() < self._down_until:
            return []
        try:
            async with asyncio.timeout(self._timeout):
                return await self._backend.recent_boms(org, limit)
        except (HistoryError, TimeoutError) as exc:
            self._set_down(str(exc) or type(exc).__name__)
            return []

    async def _ensure_loaded(self, bom_id: str) -> None:
        if self._backend is None or not self._hub.needs_history(bom_id):
            return
        now = time.monotonic()
        if now < self._down_until:
            return
        if self._watcher is None and not self._hub.knows(bom_id):
            seen = self._empty.get(bom_id)
            if seen is not None and now - seen < EMPTY_TTL_S:
                return
        # One waiter going away (a client disconnect) must not cancel the
        # read the others wait on.
        await asyncio.shield(self._start_load(bom_id))

    def resync(self, bom_id: str) -> None:
        """Read history again for a BOM whose lapsed subscription is back and
        whose open streams wait for what they missed."""
        if self._backend is None or time.monotonic() < self._down_until:
            self._hub.end_resync(bom_id)
            return
        self._start_load(bom_id, background=True)

    def _start_load(self, bom_id: str, background: bool = False) -> asyncio.Task[None]:
        load = self._loads.get(bom_id)
        if load is None:
            load = asyncio.create_task(self._load(bom_id, background), name="history-read")
            self._loads[bom_id] = load
            if background:
                load.add_done_callback(_report_failure)
        return load

    async def _load(self, bom_id: str, background: bool = False) -> None:
        try:
            if background:
                # Streams wait on this one: a read that fails is tried again a
                # little later before they are given up on.
                async with self._resync_slots:
                    await self._attempts(bom_id, RESYNC_RETRY_S)
            else:
                await self._attempts(bom_id, ())
        finally:
            self._loads.pop(bom_id, None)

    async def _attempts(self, bom_id: str, delays: tuple[float, ...]) -> None:
        retries = iter(delays)
        rereads = 0
        while True:
            outcome = await self._read_and_merge(bom_id)
            if outcome == "done":
                return
            if outcome == "again":
                rereads += 1
                if rereads <= MAX_REREADS:
                    continue
                self._hub.end_resync(bom_id)
                return
            delay = next(retries, None)
            if delay is None or not self._hub.resyncing(bom_id):
                # The streams waiting (if any) get their held-back events now.
                self._hub.end_resync(bom_id)
                return
            await asyncio.sleep(delay)

    async def _read_and_merge(self, bom_id: str) -> Literal["done", "failed", "again"]:
        """``again``: the subscription lapsed and came back during the read."""
        assert self._backend is not None
        epoch = self._watcher.epoch(bom_id) if self._watcher is not None else 0
        started = time.perf_counter()
        self.reads += 1
        try:
            async with asyncio.timeout(self._timeout):
                rows = await self._backend.read_rows(bom_id, self._limit)
        except (HistoryError, TimeoutError) as exc:
            self._metrics.history_reads.labels("error").inc()
            if not (isinstance(exc, HistoryError) and exc.scoped):
                self._set_down(str(exc) or type(exc).__name__)
            return "failed"
        finally:
            self._metrics.history_read_seconds.observe(time.perf_counter() - started)
        self._set_up()
        events = self._parse(bom_id, rows)
        self._metrics.history_reads.labels("hit" if events else "miss").inc()
        if not events and not self._hub.knows(bom_id):
            self._remember_empty(bom_id)
        watcher = self._watcher
        if watcher is None:
            self._hub.merge_history(bom_id, events)
            return "done"
        steady = epoch >= 0 and watcher.epoch(bom_id) == epoch
        self._hub.merge_history(bom_id, events, complete=steady)
        if steady:
            return "done"
        # The subscription lapsed around the read: events published in the gap
        # may be missing from it. Read again once it is live (now, or when the
        # watcher says so through resync).
        self._hub.begin_resync(bom_id)
        return "again" if watcher.epoch(bom_id) >= 0 else "done"

    def _parse(self, bom_id: str, rows: list[tuple[bytes, int]]) -> list[Event]:
        out = []
        for raw, seq in rows:
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
            ev.hseq = seq
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


def _report_failure(task: asyncio.Task[None]) -> None:
    """A background re-read has no request to fail; a bug in it still shows."""
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.error("history re-read failed", exc_info=exc)
