"""The phases of a run, the same whether the streams live in this process or
in worker processes: connect, hold, publish, drain, close. The gateway is
sampled between phases and everything ends in one report."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable
from typing import Protocol, TypeVar

from bomstream.loadtest import procstat
from bomstream.loadtest.options import LoadOptions, bom_ids
from bomstream.loadtest.progress import ProgressLine
from bomstream.loadtest.publisher import (
    EventFactory,
    HttpSender,
    PublishStats,
    RedisSender,
    Sender,
    publish_paced,
)
from bomstream.loadtest.records import ClientPart, GatewayUsage, Snapshot, StreamCounts
from bomstream.loadtest.report import Report

T = TypeVar("T")


class Streams(Protocol):
    """Where the streams are: this process (LoadTest) or worker processes (WorkerPool)."""

    run_id: str

    async def connect(self) -> None: ...

    def begin_measure(self) -> None:
        """The measured phase (publishing and drain) starts now."""

    async def drain(self, published: list[int], deadline: float) -> None:
        """Until every stream has all of ``published`` (per BOM), or ``deadline``."""

    async def close(self, published: list[int]) -> list[ClientPart]: ...

    async def guard(self, aw: Awaitable[T]) -> T:
        """Await ``aw``, but give up on it if the streams fail meanwhile."""

    def snapshot(self) -> Snapshot: ...


def sender_for(opts: LoadOptions) -> Sender:
    if opts.publish_via == "redis":
        return RedisSender(opts.redis_url, opts.channel_prefix)
    return HttpSender(opts.url, opts.publish_token)


async def conduct(opts: LoadOptions, streams: Streams) -> Report:
    line = ProgressLine(streams.snapshot, opts.connections) if opts.progress else None
    task = asyncio.create_task(line.run()) if line is not None else None
    try:
        return await _phases(opts, streams, line)
    finally:
        if task is not None and line is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            line.finish()


async def _phases(opts: LoadOptions, streams: Streams, line: ProgressLine | None) -> Report:
    pids = opts.gateway_pids

    def sample() -> procstat.ProcSample | None:
        return procstat.sample_sum(pids) if pids else None

    def phase(name: str) -> None:
        if line is not None:
            line.phase = name

    before = sample()
    await streams.connect()
    connected = sample()
    if opts.hold_s > 0:
        phase("hold")
        await streams.guard(asyncio.sleep(opts.hold_s))
    held = sample()
    factory = EventFactory(streams.run_id, bom_ids(opts, streams.run_id), opts.org)
    publish: PublishStats | None = None
    pub_start = pub_end = held
    drain_s = 0.0
    # Wall-clock bounds of the measured phase, so that other measurements of
    # the same host (its CPU, another process) can be matched to it.
    window: tuple[float, float] | None = None
    if opts.rate > 0 and opts.duration > 0 and opts.publish_via != "none":
        phase("publish")
        sender = sender_for(opts)
        streams.begin_measure()
        pub_start = sample()
        measured_from = time.time()
        try:
            publish = PublishStats(opts.rate)
            if line is not None:
                line.publish = publish
            await streams.guard(publish_paced(sender, factory, publish, opts.duration))
        finally:
            await sender.close()
        phase("drain")
        await streams.drain(factory.published, publish.finished_at + opts.drain_s)
        drain_s = time.monotonic() - publish.finished_at
        pub_end = sample()
        window = (measured_from, time.time())
    phase("close")
    parts = await streams.close(factory.published)
    counts = StreamCounts.merged([p.counts for p in parts if p.counts is not None])
    return Report.build(
        opts,
        streams.run_id,
        counts,
        publish,
        parts,
        drain_s=drain_s,
        window=window,
        gateway=GatewayUsage.of(pids, before, connected, held, pub_start, pub_end),
    )
