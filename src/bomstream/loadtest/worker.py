"""A load-test worker process: ``python -m bomstream.loadtest.worker``.

Started by ``bomstream loadtest --workers N`` (pool.py), never by hand. It
drives one shard of the streams and follows the coordinator's commands, one
JSON object a line on stdin, answering on stdout. Ctrl-C is the
coordinator's to handle: it stops its workers. A worker whose stdin closes
before the run is over has lost its coordinator; it closes its streams and
exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

import orjson

from bomstream.loadtest.options import LoadOptions
from bomstream.loadtest.runner import LoadTest, Shard

EXIT_ORPHANED = 3


class _Channel:
    """Commands in from stdin, replies out on stdout."""

    def __init__(self, on_lost: Callable[[], None]) -> None:
        self.commands: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        self._out = sys.stdout.buffer
        self._on_lost = on_lost
        self._lost = False

    async def open(self) -> asyncio.Task[None]:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=1 << 24)
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

        async def pump() -> None:
            while line := await reader.readline():
                self.commands.put_nowait(orjson.loads(line))
            self.commands.put_nowait(None)

        return asyncio.create_task(pump())

    def send(self, msg: dict[str, Any]) -> None:
        if self._lost:
            return
        try:
            # Small lines to a pipe the coordinator always reads: a blocking write is fine.
            self._out.write(orjson.dumps(msg) + b"\n")
            self._out.flush()
        except BrokenPipeError:
            self._lost = True
            # Nothing reads stdout any more; exiting must not trip over it either.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self._out.fileno())
            self._on_lost()


async def _serve() -> int:
    serving = asyncio.current_task()
    assert serving is not None
    orphaned = closing = False

    def coordinator_gone() -> None:
        # Stop whatever is under way: nobody will read what this worker counts.
        nonlocal orphaned
        if not closing and not orphaned:
            orphaned = True
            serving.cancel()

    def on_input_closed(task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            print(f"load worker: unreadable command: {task.exception()}", file=sys.stderr)
        coordinator_gone()

    channel = _Channel(coordinator_gone)
    pump = await channel.open()

    init = await channel.commands.get()
    if init is None or init.get("op") != "init":
        return EXIT_ORPHANED
    pump.add_done_callback(on_input_closed)
    opts = LoadOptions.from_json(init["opts"])
    lt = LoadTest(opts, init["run_id"], Shard(init["shard"], init["shards"]), role="streams")
    progress = asyncio.create_task(_progress(lt, channel)) if init["progress"] else None
    channel.send({"op": "ready"})
    try:
        while (cmd := await channel.commands.get()) is not None:
            op = cmd["op"]
            if op == "connect":
                await lt.connect(cmd["start"])
                channel.send({"op": "connected"})
            elif op == "measure":
                lt.begin_measure()
            elif op == "drain":
                await lt.drain(cmd["published"], cmd["deadline"])
                channel.send({"op": "drained"})
            elif op == "close":
                closing = True
                (part,) = await lt.close(cmd["published"])
                assert part.counts is not None
                result = {"usage": part.usage.to_json(), "counts": part.counts.to_json()}
                channel.send({"op": "result", **result})
                return 0
        return EXIT_ORPHANED
    except asyncio.CancelledError:
        if not orphaned:
            raise
        closing = True
        await lt.close([0] * opts.boms)
        return EXIT_ORPHANED
    finally:
        if progress is not None:
            progress.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await progress


async def _progress(lt: LoadTest, channel: _Channel) -> None:
    while True:
        await asyncio.sleep(1.0)
        channel.send({"op": "progress", "snapshot": lt.snapshot().to_json()})


def main() -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency off Windows
        return asyncio.run(_serve())
    return uvloop.run(_serve())


if __name__ == "__main__":
    sys.exit(main())
