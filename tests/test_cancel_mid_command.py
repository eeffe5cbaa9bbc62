"""Owner tasks that talk to Redis end when cancelled, even mid-command.

redis-py can swallow a cancellation that lands while a command is under way;
the history writer then waited for its next event forever, and a gateway's
shutdown (or a supervisor's worker) with it. Real redis-server, real writes.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import random

import pytest

from bomstream.events import parse_event
from bomstream.history import make_backend
from bomstream.history.recall import Recall
from bomstream.hub import Hub
from bomstream.metrics import Metrics
from tests.conftest import gateway_config, progress
from tests.redis_proc import RedisProcess

ROUNDS = 150


async def test_history_tasks_end_when_cancelled_during_a_write(
    redis_server: RedisProcess,
) -> None:
    cfg = gateway_config(redis__url=redis_server.url)
    rng = random.Random(7)
    for round_ in range(ROUNDS):
        metrics = Metrics()
        backend = make_backend(cfg, metrics)
        assert backend is not None
        recall = Recall(cfg, Hub(cfg, metrics), metrics, backend)
        task = asyncio.create_task(recall.run())
        await asyncio.sleep(0.005)
        bom = f"bom-c{round_}"
        for n in range(3):
            raw = json.dumps(progress(bom, n)).encode()
            backend.record(parse_event(raw, bom, max_bytes=65536, terminal_types=()))
        # Cancel while the batch is (most likely) on its way to Redis.
        await asyncio.sleep(rng.uniform(0, 0.004))
        task.cancel()
        try:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(task), 2.0)
        except TimeoutError:
            task.cancel()
            pytest.fail(f"round {round_}: the history task ignored its cancellation")
        finally:
            await recall.close()
    # A pipeline cut off half way and never given back warns when collected:
    # collect now, so that it fails this test and not whichever runs next.
    gc.collect()
