"""One load run: its streams in this process, or spread over worker processes."""

from __future__ import annotations

from bomstream.loadtest.conduct import conduct
from bomstream.loadtest.options import LoadOptions, new_run_id
from bomstream.loadtest.pool import WorkerPool
from bomstream.loadtest.report import Report
from bomstream.loadtest.runner import LoadTest


async def run_load(opts: LoadOptions) -> Report:
    run_id = new_run_id()
    if opts.workers <= 1:
        return await conduct(opts, LoadTest(opts, run_id))
    pool = WorkerPool(opts, run_id)
    try:
        await pool.start()
        return await conduct(opts, pool)
    finally:
        await pool.stop()
