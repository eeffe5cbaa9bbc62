"""``--workers N``: the streams spread over N worker processes.

Each worker is ``python -m bomstream.loadtest.worker`` on the interpreter this
command runs on, so it works the same from the installed console script. It
drives one shard of the streams (see runner.py). This process coordinates and
publishes: one publisher keeps the events, their order and their pacing
exactly those of a single-process run, and costs little next to the streams.
When publishing ends it sends every worker the per-BOM counts, so each counts
loss against what its BOMs were sent.

Commands and replies are JSON objects, one a line, over each worker's stdin
and stdout. A worker that exits early, or does not answer within a bound,
fails the run with a message naming it; every worker is stopped before this
process returns, Ctrl-C included.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import orjson

from bomstream.loadtest.options import LoadOptions
from bomstream.loadtest.records import ClientPart, ClientUsage, CpuClock, Snapshot, StreamCounts

T = TypeVar("T")
WORKER_MODULE = "bomstream.loadtest.worker"
# Bounds on waits for workers beyond their own phase's length: generous,
# because a busy machine is slow, but finite, so a stuck worker cannot hang a run.
START_TIMEOUT_S = 60.0
SLACK_S = 30.0
STOP_GRACE_S = 5.0
# A result carries a latency histogram and tallies: a few kB, well under this.
LINE_LIMIT = 1 << 24


class WorkerFailed(Exception):
    """The run cannot be reported: a worker process died or stopped answering."""


@dataclass(slots=True)
class _Worker:
    number: int
    proc: asyncio.subprocess.Process
    replies: asyncio.Queue[dict[str, Any]] = field(default_factory=asyncio.Queue)
    snapshot: Snapshot = field(default_factory=Snapshot)
    finished: bool = False


class WorkerPool:
    """The :class:`~bomstream.loadtest.conduct.Streams` of a run held by worker processes."""

    def __init__(self, opts: LoadOptions, run_id: str) -> None:
        self.opts = opts
        self.run_id = run_id
        self.count = opts.workers
        self.phase = "start"
        self._workers: list[_Worker] = []
        self._readers: list[asyncio.Task[None]] = []
        self._failure: asyncio.Future[WorkerFailed] | None = None
        self._clock = CpuClock("publisher")

    # -- lifecycle -----------------------------------------------------------

    async def start(self) -> None:
        self._failure = asyncio.get_running_loop().create_future()
        init = {
            "op": "init",
            "opts": self.opts.for_worker().to_json(),
            "run_id": self.run_id,
            "shards": self.count,
            "progress": self.opts.progress,
        }
        for number in range(self.count):
            try:
                proc = await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-m",
                    WORKER_MODULE,
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,
                    limit=LINE_LIMIT,
                )
            except OSError as exc:
                raise WorkerFailed(f"cannot start load worker {number + 1}: {exc}") from exc
            worker = _Worker(number, proc)
            self._workers.append(worker)
            self._readers.append(asyncio.create_task(self._read(worker)))
            self._send(worker, {**init, "shard": number})
        await self._collect("ready", START_TIMEOUT_S)

    async def stop(self) -> None:
        """Every worker ends: on its own after its result, else it is terminated."""
        for w in self._workers:
            if w.proc.stdin is not None:
                w.proc.stdin.close()
        for w in self._workers:
            if w.proc.returncode is None and not w.finished:
                w.proc.terminate()
        for w in self._workers:
            try:
                await asyncio.wait_for(w.proc.wait(), STOP_GRACE_S)
            except TimeoutError:
                w.proc.kill()
                await w.proc.wait()
        for task in self._readers:
            task.cancel()
        for task in self._readers:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # -- Streams -------------------------------------------------------------

    async def connect(self) -> None:
        self.phase = "connect"
        # One schedule for all: stream n starts at start + n / connect_rate.
        self._broadcast({"op": "connect", "start": time.monotonic()})
        opts = self.opts
        window = opts.connect_timeout_s + opts.connections / max(opts.connect_rate, 1)
        await self._collect("connected", window + 30 + SLACK_S)
        self.phase = "hold"

    def begin_measure(self) -> None:
        self.phase = "publish"
        self._clock.start()
        self._broadcast({"op": "measure"})

    async def drain(self, published: list[int], deadline: float) -> None:
        self.phase = "drain"
        self._broadcast({"op": "drain", "published": published, "deadline": deadline})
        await self._collect("drained", max(0.0, deadline - time.monotonic()) + SLACK_S)
        self._clock.stop()

    async def close(self, published: list[int]) -> list[ClientPart]:
        self.phase = "close"
        self._broadcast({"op": "close", "published": published})
        results = await self._collect("result", SLACK_S)
        parts = [ClientPart(self._clock.stop(), None)]
        for r in results:
            parts.append(
                ClientPart(ClientUsage.from_json(r["usage"]), StreamCounts.from_json(r["counts"]))
            )
        return parts

    async def guard(self, aw: Awaitable[T], bound_s: float | None = None) -> T:
        assert self._failure is not None, "start() first"
        task = asyncio.ensure_future(aw)
        waited: set[asyncio.Future[Any]] = {task, self._failure}
        try:
            done, _ = await asyncio.wait(
                waited, timeout=bound_s, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if task in done:
            return task.result()
        if self._failure.done():
            raise self._failure.result()
        raise WorkerFailed(
            f"load workers did not answer within {bound_s or 0:.0f} s during {self.phase}"
        )

    def snapshot(self) -> Snapshot:
        total = Snapshot()
        for w in self._workers:
            total.add(w.snapshot)
        return total

    # -- talking to workers --------------------------------------------------

    def _send(self, w: _Worker, msg: dict[str, Any]) -> None:
        stdin = w.proc.stdin
        if stdin is not None and not stdin.is_closing() and w.proc.returncode is None:
            stdin.write(orjson.dumps(msg) + b"\n")

    def _broadcast(self, msg: dict[str, Any]) -> None:
        for w in self._workers:
            self._send(w, msg)

    async def _collect(self, op: str, bound_s: float) -> list[dict[str, Any]]:
        """Each worker's next reply, which must be ``op``."""

        async def replies() -> list[dict[str, Any]]:
            out = []
            for w in self._workers:
                msg = await w.replies.get()
                if msg.get("op") != op:
                    raise WorkerFailed(
                        f"load worker {self._name(w)} answered {msg.get('op')!r}"
                        f" where {op!r} was due"
                    )
                out.append(msg)
            return out

        return await self.guard(replies(), bound_s)

    async def _read(self, w: _Worker) -> None:
        """One worker's replies and progress, until its result or its end."""
        assert w.proc.stdout is not None
        try:
            while line := await w.proc.stdout.readline():
                msg = orjson.loads(line)
                if msg.get("op") == "progress":
                    w.snapshot = Snapshot.from_json(msg["snapshot"])
                    continue
                w.finished = msg.get("op") == "result"
                w.replies.put_nowait(msg)
                if w.finished:
                    return
        except (ValueError, KeyError, TypeError) as exc:
            # orjson.JSONDecodeError and an over-long line are ValueErrors.
            self._fail(f"load worker {self._name(w)} sent an unreadable reply ({exc})")
            return
        try:
            code = await asyncio.wait_for(w.proc.wait(), STOP_GRACE_S)
        except TimeoutError:
            self._fail(f"load worker {self._name(w)} closed its output during {self.phase}")
            return
        self._fail(
            f"load worker {self._name(w)} {_exit_reason(code)} during {self.phase};"
            " the run is void, the other workers are stopped"
        )

    def _fail(self, message: str) -> None:
        if self._failure is not None and not self._failure.done():
            self._failure.set_result(WorkerFailed(message))

    def _name(self, w: _Worker) -> str:
        return f"{w.number + 1} of {self.count} (pid {w.proc.pid})"


def _exit_reason(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"
