"""The streams of one client process: connect them, count what they receive,
drain, close.

With several client processes each drives one shard: every ``count``-th
stream, starting at ``index``. A stream keeps its number, and with it the
BOMs it watches, its source address, its token and its place in the connect
schedule, so N processes open and watch exactly what one process would.

A stream watches one BOM, or several on one connection
(``--boms-per-stream``); either way each BOM it watches has its own tally,
and loss is counted per BOM against what that BOM was published.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import random
import resource
import socket
import time
from collections import Counter
from collections.abc import Awaitable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

from bomstream.loadtest.histogram import LogHistogram
from bomstream.loadtest.multistream import MultiSSEConnection, Watch
from bomstream.loadtest.options import LoadOptions, bom_ids, new_run_id, watched
from bomstream.loadtest.records import ClientPart, CpuClock, Snapshot, StreamCounts
from bomstream.loadtest.sseclient import SSEConnection, build_request
from bomstream.loadtest.tally import StreamTally

T = TypeVar("T")
# In-flight connection attempts at once, shared by all client processes; the
# kernel's accept backlog is the limit.
MAX_CONNECTING = 512
RECONNECT_DELAY_S = (0.5, 1.5)
# Linux's IP_BIND_ADDRESS_NO_PORT (not exported by every Python build).
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)


def raise_open_files_limit() -> int:
    """Lift the soft open-files limit to the hard one; returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


@dataclass(frozen=True, slots=True)
class Shard:
    index: int = 0
    count: int = 1


class LoadTest:
    """Drives one shard's streams and is the :class:`Sink` they report to.

    Streams are held by local position; ``numbers[j]`` is stream ``j``'s
    number in the whole run. The slow consumers are the lowest numbers, so
    here they are the first ``slow`` positions. ``tallies`` holds one tally
    per BOM watched, stream by stream: stream ``j``'s are
    ``tallies[first[j]:first[j + 1]]``, for the BOMs ``watched[j]``; with
    one BOM per stream, ``tallies[j]`` is stream ``j``'s.
    """

    def __init__(
        self,
        opts: LoadOptions,
        run_id: str | None = None,
        shard: Shard = Shard(),
        role: str = "streams+publisher",
    ) -> None:
        self.opts = opts
        host, port, base_path = _split_url(opts.url)
        self.host, self.port, self.base_path = host, port, base_path
        self.address = host
        self.run_id = run_id or new_run_id()
        self.bom_ids = bom_ids(opts, self.run_id)
        self.sources = [f"127.0.0.{k}" for k in range(1, max(1, opts.source_ips) + 1)]
        self.numbers = range(shard.index, opts.connections, shard.count)
        self.slow = len(range(shard.index, min(opts.slow_consumers, opts.connections), shard.count))
        self._max_connecting = max(1, MAX_CONNECTING // shard.count)
        self.clock = CpuClock(role)
        # Sink counters, updated by the streams.
        self.latency = LogHistogram()
        self.delivered = 0
        self.foreign = 0
        self.misrouted = 0
        self.bytes = 0
        self.keepalives = 0
        # Per-stream state, indexed by local position.
        n = len(self.numbers)
        self.watched = [watched(opts, number) for number in self.numbers]
        self.first = [0] * (n + 1)
        for j, boms in enumerate(self.watched):
            self.first[j + 1] = self.first[j] + len(boms)
        self.tallies = [StreamTally() for _ in range(self.first[n])]
        self.conns: list[SSEConnection | None] = [None] * n
        self.ever_open = [False] * n
        self.settled = [False] * n
        self.cut = [False] * n
        self.established = 0
        self.open_now = 0
        self.settled_count = 0
        self.failed: Counter[str] = Counter()
        self.end_reasons: Counter[str] = Counter()
        self.reconnects = 0
        self.first_attempt_at = 0.0
        self.last_open_at = 0.0
        self.closing = False
        self._all_settled = asyncio.Event()
        if n == 0:
            self._all_settled.set()
        self._tasks: set[asyncio.Task[None]] = set()

    # -- Sink ----------------------------------------------------------------

    def opened(self, conn: SSEConnection) -> None:
        j = conn.index
        self.open_now += 1
        if not self.ever_open[j]:
            self.ever_open[j] = True
            self.established += 1
            self.last_open_at = time.monotonic()
            self._settle(j)
        if j < self.slow and conn.transport is not None:
            # A consumer that stops reading: the gateway must cut it, not buffer for it.
            conn.transport.pause_reading()

    def refused(self, conn: SSEConnection, status: int) -> None:
        self.failed[f"http {status}"] += 1
        self._settle(conn.index)

    def ended(self, conn: SSEConnection, reason: str) -> None:
        self.end_reasons[reason] += 1

    def lost(self, conn: SSEConnection, exc: BaseException | None) -> None:
        j = conn.index
        if conn.status == 200:
            self.open_now -= 1
        elif conn.status == 0:
            self.failed["closed before response"] += 1
            self._settle(j)
        if self.closing or self.conns[j] is not conn:
            return
        self.conns[j] = None
        if conn.status != 200:
            return
        if j < self.slow:
            self.cut[j] = True
            return
        if self.opts.reconnect:
            self.reconnects += 1
            self._spawn(self._reconnect(j, conn.last_event_id))

    # -- connecting ----------------------------------------------------------

    def _settle(self, j: int) -> None:
        if not self.settled[j]:
            self.settled[j] = True
            self.settled_count += 1
            if self.settled_count >= len(self.numbers):
                self._all_settled.set()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _request(self, j: int, last_event_id: bytes | None) -> bytes:
        opts = self.opts
        number = self.numbers[j]
        boms = self.watched[j]
        if opts.boms_per_stream:
            query = "&".join(f"bom_id={self.bom_ids[b]}" for b in boms)
            path = f"{self.base_path}/api/enrichment/stream?{query}"
        else:
            path = f"{self.base_path}/api/enrichment/stream/{self.bom_ids[boms[0]]}"
        return build_request(self.host, self.port, path, opts.token_for(number), last_event_id)

    def _connection(self, j: int, last_event_id: bytes | None) -> SSEConnection:
        request = self._request(j, last_event_id)
        boms = self.watched[j]
        if not self.opts.boms_per_stream:
            return SSEConnection(self, j, boms[0], request, self.tallies[j])
        watches = {
            str(b).encode(): Watch(self.bom_ids[b].encode(), tally)
            for b, tally in zip(boms, self.tallies_of(j), strict=True)
        }
        return MultiSSEConnection(self, j, request, watches)

    async def _connect(self, j: int, last_event_id: bytes | None = None) -> None:
        loop = asyncio.get_running_loop()
        number = self.numbers[j]
        conn = self._connection(j, last_event_id)
        conn.last_event_id = last_event_id
        self.conns[j] = conn
        source = self.sources[number % len(self.sources)]
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            # Choose the source port at connect time, by the whole address
            # pair: bind() alone would skip ports still in TIME_WAIT from an
            # earlier run and soon run out of them.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind((source, 0))
            async with asyncio.timeout(self.opts.connect_timeout_s):
                await loop.sock_connect(sock, (self.address, self.port))
                await loop.create_connection(lambda: conn, sock=sock)
        except TimeoutError:
            sock.close()
            self._connect_failed(j, conn, "connect timeout")
        except OSError as exc:
            sock.close()
            name = errno.errorcode.get(exc.errno or 0, type(exc).__name__)
            self._connect_failed(j, conn, f"connect {name}")

    def _connect_failed(self, j: int, conn: SSEConnection, what: str) -> None:
        if self.conns[j] is conn:
            self.conns[j] = None
        self.failed[what] += 1
        self._settle(j)

    async def _reconnect(self, j: int, last_event_id: bytes | None) -> None:
        await asyncio.sleep(random.uniform(*RECONNECT_DELAY_S))
        if not self.closing:
            await self._connect(j, last_event_id)

    async def _connect_all(self, start: float) -> None:
        rate = self.opts.connect_rate
        gate = asyncio.Semaphore(self._max_connecting)
        loop = asyncio.get_running_loop()
        self.first_attempt_at = start
        # Paced on the loop's clock: uvloop's advances once per iteration, in
        # whole milliseconds, so the streams due in one tick go out together
        # instead of each sleeping a fraction of a millisecond (a whole tick).
        loop_start = loop.time() + (start - time.monotonic())

        async def one(j: int) -> None:
            try:
                await self._connect(j)
            finally:
                gate.release()

        for j, number in enumerate(self.numbers):
            if rate > 0:
                wait = loop_start + number / rate - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
            await gate.acquire()
            self._spawn(one(j))
        await self._all_settled.wait()

    # -- the phases ----------------------------------------------------------

    async def connect(self, start: float | None = None) -> None:
        """Open this shard's streams, stream ``n`` at ``start + n / connect_rate``
        (``start`` on the monotonic clock, which every process on the host shares)."""
        opts = self.opts
        raise_open_files_limit()
        infos = await asyncio.get_running_loop().getaddrinfo(
            self.host, self.port, family=socket.AF_INET, type=socket.SOCK_STREAM
        )
        self.address = str(infos[0][4][0])
        now = time.monotonic()
        start = now if start is None else start
        window = opts.connect_timeout_s + opts.connections / max(opts.connect_rate, 1)
        try:
            await asyncio.wait_for(self._connect_all(start), window + 30 + max(0.0, start - now))
        except TimeoutError:
            self.failed["never settled"] += len(self.numbers) - self.settled_count

    def begin_measure(self) -> None:
        self.clock.start()

    async def drain(self, published: list[int], deadline: float) -> None:
        """Wait until every expected delivery arrived, or until ``deadline``."""
        expected = self.expected_total(published)
        while time.monotonic() < deadline:
            if self.accounted_delivered() >= expected:
                break
            await asyncio.sleep(0.01)
        self.clock.stop()

    async def close(self, published: list[int]) -> list[ClientPart]:
        await self._close_all()
        return [ClientPart(self.clock.stop(), self.counts(published))]

    async def guard(self, aw: Awaitable[T]) -> T:
        """Nothing else can fail underneath this process's own awaits."""
        return await aw

    def snapshot(self) -> Snapshot:
        failed = sum(self.failed.values())
        return Snapshot(self.open_now, failed, self.reconnects, self.delivered, self.latency)

    # -- accounting ----------------------------------------------------------

    def tallies_of(self, j: int) -> list[StreamTally]:
        """Stream ``j``'s tallies, one per BOM of ``watched[j]``."""
        return self.tallies[self.first[j] : self.first[j + 1]]

    def _accounted(self) -> range:
        """Local positions counted for loss and latency: all but the slow consumers."""
        return range(self.slow, len(self.numbers))

    def expected_total(self, published: list[int]) -> int:
        return sum(
            published[b] for j in self._accounted() if self.ever_open[j] for b in self.watched[j]
        )

    def accounted_delivered(self) -> int:
        if not self.slow:
            return self.delivered
        return self.delivered - sum(t.received for t in self.tallies[: self.first[self.slow]])

    def counts(self, published: list[int]) -> StreamCounts:
        """What the streams counted, against ``published`` events per BOM."""
        c = StreamCounts(
            streams=len(self.numbers),
            established=self.established,
            reconnects=self.reconnects,
            slow_consumers=self.slow,
            slow_consumers_cut=sum(self.cut[: self.slow]),
            misrouted=self.misrouted,
            foreign=self.foreign,
            bytes=self.bytes,
            keepalives=self.keepalives,
            failed=Counter(self.failed),
            end_reasons=Counter(self.end_reasons),
            latency=self.latency,
            first_attempt_at=self.first_attempt_at,
            last_open_at=self.last_open_at,
        )
        # Like ``established``: every stream that opened, slow consumers too.
        c.subscriptions = sum(
            len(w) for w, up in zip(self.watched, self.ever_open, strict=True) if up
        )
        for j in self._accounted():
            if not self.ever_open[j]:
                continue
            stream_lost = 0
            for b, t in zip(self.watched[j], self.tallies_of(j), strict=True):
                want = published[b]
                missing = t.lost(want)
                stream_lost += missing
                c.expected += want
                c.lost += missing
                c.received += t.received
                c.duplicates += t.duplicates
                c.out_of_order += t.out_of_order
            c.streams_with_loss += stream_lost > 0
        return c

    async def _close_all(self) -> None:
        self.closing = True
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for conn in self.conns:
            if conn is not None:
                conn.close()
        # Let the transports finish closing before the loop goes away.
        for _ in range(50):
            if self.open_now <= 0:
                break
            await asyncio.sleep(0.02)


def _split_url(url: str) -> tuple[str, int, str]:
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or 80, parts.path.rstrip("/")
