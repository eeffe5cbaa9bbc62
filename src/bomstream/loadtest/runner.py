"""One load-test run: connect, hold, publish, drain, close, report."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import random
import resource
import secrets
import socket
import sys
import time
from collections import Counter
from collections.abc import Coroutine
from typing import Any
from urllib.parse import urlsplit

from bomstream.loadtest import procstat
from bomstream.loadtest.histogram import LogHistogram
from bomstream.loadtest.options import LoadOptions
from bomstream.loadtest.publisher import (
    EventFactory,
    HttpSender,
    PublishStats,
    RedisSender,
    Sender,
    publish_paced,
)
from bomstream.loadtest.records import GatewayUsage, StreamCounts
from bomstream.loadtest.report import Report
from bomstream.loadtest.sseclient import SSEConnection, build_request
from bomstream.loadtest.tally import StreamTally

# In-flight connection attempts at once; the kernel's accept backlog is the limit.
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


class LoadTest:
    """Drives every stream of a run and is the :class:`Sink` they report to."""

    def __init__(self, opts: LoadOptions) -> None:
        self.opts = opts
        parts = urlsplit(opts.url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        self.base_path = parts.path.rstrip("/")
        self.address = self.host
        self.run_id = secrets.token_hex(4)
        self.bom_ids = [f"{opts.bom_prefix}{self.run_id}-{b}" for b in range(opts.boms)]
        self.sources = [f"127.0.0.{k}" for k in range(1, max(1, opts.source_ips) + 1)]
        # Sink counters, updated by the streams.
        self.latency = LogHistogram()
        self.delivered = 0
        self.foreign = 0
        self.misrouted = 0
        self.bytes = 0
        self.keepalives = 0
        # Per-stream state, indexed by stream number.
        n = opts.connections
        self.tallies = [StreamTally() for _ in range(n)]
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
        self._tasks: set[asyncio.Task[None]] = set()
        self._phase = "connect"
        self._publish: PublishStats | None = None
        self._started = time.monotonic()

    # -- Sink ----------------------------------------------------------------

    def opened(self, conn: SSEConnection) -> None:
        i = conn.index
        self.open_now += 1
        if not self.ever_open[i]:
            self.ever_open[i] = True
            self.established += 1
            self.last_open_at = time.monotonic()
            self._settle(i)
        if i < self.opts.slow_consumers and conn.transport is not None:
            # A consumer that stops reading: the gateway must cut it, not buffer for it.
            conn.transport.pause_reading()

    def refused(self, conn: SSEConnection, status: int) -> None:
        self.failed[f"http {status}"] += 1
        self._settle(conn.index)

    def ended(self, conn: SSEConnection, reason: str) -> None:
        self.end_reasons[reason] += 1

    def lost(self, conn: SSEConnection, exc: BaseException | None) -> None:
        i = conn.index
        if conn.status == 200:
            self.open_now -= 1
        elif conn.status == 0:
            self.failed["closed before response"] += 1
            self._settle(i)
        if self.closing or self.conns[i] is not conn:
            return
        self.conns[i] = None
        if conn.status != 200:
            return
        if i < self.opts.slow_consumers:
            self.cut[i] = True
            return
        if self.opts.reconnect:
            self.reconnects += 1
            self._spawn(self._reconnect(i, conn.last_event_id))

    # -- connecting ----------------------------------------------------------

    def _settle(self, i: int) -> None:
        if not self.settled[i]:
            self.settled[i] = True
            self.settled_count += 1
            if self.settled_count >= self.opts.connections:
                self._all_settled.set()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _request(self, i: int, last_event_id: bytes | None) -> bytes:
        opts = self.opts
        token = opts.token_for(i) if opts.token_for is not None else opts.token
        path = f"{self.base_path}/api/enrichment/stream/{self.bom_ids[i % opts.boms]}"
        return build_request(self.host, self.port, path, token, last_event_id)

    async def _connect(self, i: int, last_event_id: bytes | None = None) -> None:
        loop = asyncio.get_running_loop()
        bom = i % self.opts.boms
        conn = SSEConnection(self, i, bom, self._request(i, last_event_id), self.tallies[i])
        conn.last_event_id = last_event_id
        self.conns[i] = conn
        source = self.sources[i % len(self.sources)]
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
            self._connect_failed(i, conn, "connect timeout")
        except OSError as exc:
            sock.close()
            name = errno.errorcode.get(exc.errno or 0, type(exc).__name__)
            self._connect_failed(i, conn, f"connect {name}")

    def _connect_failed(self, i: int, conn: SSEConnection, what: str) -> None:
        if self.conns[i] is conn:
            self.conns[i] = None
        self.failed[what] += 1
        self._settle(i)

    async def _reconnect(self, i: int, last_event_id: bytes | None) -> None:
        await asyncio.sleep(random.uniform(*RECONNECT_DELAY_S))
        if not self.closing:
            await self._connect(i, last_event_id)

    async def _connect_all(self) -> None:
        opts = self.opts
        gate = asyncio.Semaphore(MAX_CONNECTING)
        loop = asyncio.get_running_loop()
        start = loop.time()
        self.first_attempt_at = time.monotonic()

        async def one(i: int) -> None:
            try:
                await self._connect(i)
            finally:
                gate.release()

        for i in range(opts.connections):
            if opts.connect_rate > 0:
                wait = start + i / opts.connect_rate - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
            await gate.acquire()
            self._spawn(one(i))
        await self._all_settled.wait()

    # -- the run -------------------------------------------------------------

    async def run(self) -> Report:
        opts = self.opts
        raise_open_files_limit()
        infos = await asyncio.get_running_loop().getaddrinfo(
            self.host, self.port, family=socket.AF_INET, type=socket.SOCK_STREAM
        )
        self.address = str(infos[0][4][0])
        progress = asyncio.create_task(self._progress()) if opts.progress else None
        pid = opts.gateway_pid
        before = procstat.sample(pid) if pid else None
        connect_window = opts.connect_timeout_s + opts.connections / max(opts.connect_rate, 1)
        try:
            await asyncio.wait_for(self._connect_all(), connect_window + 30)
        except TimeoutError:
            self.failed["never settled"] += opts.connections - self.settled_count
        connect_s = max(0.0, self.last_open_at - self.first_attempt_at)
        connected = procstat.sample(pid) if pid else None
        if opts.hold_s > 0:
            self._phase = "hold"
            await asyncio.sleep(opts.hold_s)
        held = procstat.sample(pid) if pid else None
        factory = EventFactory(self.run_id, self.bom_ids, opts.org)
        publish: PublishStats | None = None
        pub_start = pub_end = held
        cpu_before = resource.getrusage(resource.RUSAGE_SELF)
        drain_s = 0.0
        if opts.rate > 0 and opts.duration > 0 and opts.publish_via != "none":
            self._phase = "publish"
            sender = self._sender()
            pub_start = procstat.sample(pid) if pid else None
            try:
                self._publish = publish = PublishStats(opts.rate)
                await publish_paced(sender, factory, publish, opts.duration)
            finally:
                await sender.close()
            self._phase = "drain"
            drain_s = await self._drain(factory.published, publish.finished_at)
            pub_end = procstat.sample(pid) if pid else None
        cpu_after = resource.getrusage(resource.RUSAGE_SELF)
        self._phase = "close"
        await self._close_all()
        if progress is not None:
            progress.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await progress
            if sys.stderr.isatty():
                sys.stderr.write("\n")
        usage = GatewayUsage.of(pid, before, connected, held, pub_start, pub_end)
        return Report.build(
            opts,
            self.run_id,
            self.counts(factory.published),
            publish,
            connect_s=connect_s,
            drain_s=drain_s,
            client_cpu_s=(cpu_after.ru_utime + cpu_after.ru_stime)
            - (cpu_before.ru_utime + cpu_before.ru_stime),
            gateway=usage,
        )

    def _sender(self) -> Sender:
        opts = self.opts
        if opts.publish_via == "redis":
            return RedisSender(opts.redis_url, opts.channel_prefix)
        return HttpSender(opts.url, opts.publish_token)

    def counts(self, published: list[int]) -> StreamCounts:
        """What the streams counted, against ``published`` events per BOM."""
        opts = self.opts
        slow = opts.slow_consumers
        c = StreamCounts(
            streams=opts.connections,
            established=self.established,
            reconnects=self.reconnects,
            slow_consumers=slow,
            slow_consumers_cut=sum(self.cut[:slow]),
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
        for i in range(slow, opts.connections):
            if not self.ever_open[i]:
                continue
            t = self.tallies[i]
            want = published[i % opts.boms]
            missing = t.lost(want)
            c.expected += want
            c.lost += missing
            c.streams_with_loss += missing > 0
            c.received += t.received
            c.duplicates += t.duplicates
            c.out_of_order += t.out_of_order
        return c

    def expected_total(self, published: list[int]) -> int:
        boms = self.opts.boms
        slow = self.opts.slow_consumers
        return sum(
            published[i % boms]
            for i in range(self.opts.connections)
            if self.ever_open[i] and i >= slow
        )

    async def _drain(self, published: list[int], finished_at: float) -> float:
        """Wait until every expected delivery arrived, or ``drain_s`` passed."""
        expected = self.expected_total(published)
        deadline = finished_at + self.opts.drain_s
        while time.monotonic() < deadline:
            if self.accounted_delivered() >= expected:
                break
            await asyncio.sleep(0.01)
        return time.monotonic() - finished_at

    def accounted_delivered(self) -> int:
        slow = self.opts.slow_consumers
        if not slow:
            return self.delivered
        return self.delivered - sum(t.received for t in self.tallies[:slow])

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

    async def _progress(self) -> None:
        tty = sys.stderr.isatty()
        last_delivered = 0
        last_t = time.monotonic()
        last_counts: dict[int, int] = {}
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            rate = (self.delivered - last_delivered) / max(1e-9, now - last_t)
            last_delivered, last_t = self.delivered, now
            # The last second's p99 shows when a spike happened, not just that it did.
            counts = dict(self.latency.counts)
            recent = LogHistogram()
            for i, n in counts.items():
                if n > last_counts.get(i, 0):
                    recent.counts[i] = n - last_counts.get(i, 0)
                    recent.count += recent.counts[i]
            recent.max = LogHistogram.upper_bound(max(recent.counts, default=0))
            last_counts = counts
            sent = self._publish.sent if self._publish is not None else 0
            line = (
                f"[{now - self._started:6.1f}s {self._phase:>7}] "
                f"open {self.open_now}/{self.opts.connections} "
                f"failed {sum(self.failed.values())} reconnects {self.reconnects} | "
                f"delivered {self.delivered} ({rate:,.0f}/s) | "
                f"p99 {self.latency.quantile(0.99) / 1000:.1f} ms"
                f" (last 1 s: {recent.quantile(0.99) / 1000:.1f} ms)"
            )
            if sent:
                line += f" | published {sent}"
            sys.stderr.write(("\r" + line + "\x1b[K") if tty else line + "\n")
            sys.stderr.flush()
