"""One load run: its streams in this process."""

from __future__ import annotations

from bomstream.loadtest.conduct import conduct
from bomstream.loadtest.options import LoadOptions, new_run_id
from bomstream.loadtest.report import Report
from bomstream.loadtest.runner import LoadTest


async def run_load(opts: LoadOptions) -> Report:
    return await conduct(opts, LoadTest(opts, new_run_id()))
