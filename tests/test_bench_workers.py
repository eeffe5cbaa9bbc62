"""bench/workers.py end to end, small: ``serve --workers 1`` and ``--workers 2``
each driven by ``loadtest --workers 2`` against a real redis-server, so the
scenario's numbers come from the processes they claim to (every worker's
CPU, every client process's share) before a long run relies on them."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.redis_proc import require_binary

BENCH = Path(__file__).resolve().parent.parent / "bench"


def bench_modules() -> tuple[Any, Any]:
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    import run  # type: ignore[import-not-found]
    import workers  # type: ignore[import-not-found]

    return run, workers


def test_one_and_two_workers_are_measured_on_real_processes() -> None:
    require_binary("redis-server")
    require_binary("taskset")
    if not {0, 1} <= os.sched_getaffinity(0):
        pytest.skip("the scenario pins to CPUs 0 and 1")
    run, workers = bench_modules()
    run.raise_nofile()
    shape = workers.Shape(connections=40, boms=4, duration_s=1, hold_s=0.5)
    with run.redis_server() as redis_url:
        result = workers.scenario(redis_url, [20], 1, shape)
    summary = result["rates"]["20"]
    [pair] = summary["runs"]
    one, two = pair["1"], pair["2"]
    for row in (one, two):
        assert row["streams"] == 40 and row["failed"] == 0
        # 20 events over 4 BOMs, 10 streams on each: every stream got its 5.
        assert row["expected"] == 200 and row["lost"] == 0 and row["duplicates"] == 0
        roles = sorted(name.split()[0] for name in row["client_cpu_shares"])
        assert roles == ["publisher", "streams", "streams"]
        assert row["client_cpu_share_max"] == max(row["client_cpu_shares"].values())
        assert row["cpu_s_per_100k"] is not None
        busy = row["machine_busy_cores_publishing"]
        assert busy is not None and 0 < busy <= (os.cpu_count() or 1)
    assert one["gateway_workers"] == 1 and len(one["gateway_pids"]) == 1
    # Both workers sampled, each one found by its own health answer, and the
    # kernel gave each some of the streams.
    assert two["gateway_workers"] == 2 and len(set(two["gateway_pids"])) == 2
    split = two["streams_per_worker"]
    assert split is not None and sum(split) == 40 and min(split) > 0
    assert set(summary["ratio_2_to_1"]) == {"deliveries_per_s", "p99_ms", "cpu_s_per_100k"}
    block = workers.readme_block(
        {"date": "d", "machine": run.machine(), "repeat": 1, "command": "c", "workers": result}
    )
    assert "| 20 | 2 / 1 |" in block
