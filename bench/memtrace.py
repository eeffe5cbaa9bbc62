#!/usr/bin/env python3
"""Where an idle stream's memory goes, by tracemalloc.

Runs a gateway in this process with tracemalloc on, opens N idle streams
against it with ``bomstream loadtest`` (a minted JWT per stream, as the
benchmark does), takes a snapshot while they are held, and prints the
allocations that grew, per stream, grouped by where they were made.

    python bench/memtrace.py --streams 2000
    python bench/memtrace.py --streams 2000 --group traceback --frames 6
    python bench/memtrace.py --streams 200 --boms 1000 --boms-per-stream 50
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SECRET = "memtrace-jwt-secret-memtrace-jwt-secret"


async def measure(args: argparse.Namespace) -> None:
    from bomstream.config_load import load_config
    from bomstream.server import start

    cfg = load_config(
        path=None,
        env={},
        overrides={
            "server.port": 0,
            "server.access_log": False,
            "server.log_level": "warning",
            "auth.admin_token": "memtrace-admin",
            "auth.jwt_secret": SECRET,
        },
        default_file=False,
    )
    running = await start(cfg)
    hub = running.gateway.hub
    conf = Path(tempfile.mkstemp(suffix=".toml")[1])
    conf.write_text(f'[auth]\njwt_secret = "{SECRET}"\n')
    gc.collect()
    before = tracemalloc.take_snapshot()
    client = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bomstream", "loadtest", "--config", str(conf),
        "--url", running.url, "--connections", str(args.streams), "--boms", str(args.boms),
        "--boms-per-stream", str(args.boms_per_stream),
        "--source-ips", "2", "--connect-rate", "3000", "--mint-token",
        "--hold", "600", "--no-progress",
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while hub.stream_count < args.streams and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    await asyncio.sleep(1.0)
    n = hub.stream_count
    gc.collect()
    after = tracemalloc.take_snapshot()
    client.terminate()
    await client.wait()
    conf.unlink()
    await running.stop()

    filters = [tracemalloc.Filter(False, tracemalloc.__file__)]
    stats = after.filter_traces(filters).compare_to(before.filter_traces(filters), args.group)
    total = sum(s.size_diff for s in stats)
    subs = n * max(1, args.boms_per_stream)
    print(f"streams held: {n}; traced growth {total / n:.0f} B/stream"
          f" ({subs} subscriptions, {total / subs:.0f} B/subscription)")  # fmt: skip
    for s in stats[: args.top]:
        if s.size_diff <= 0:
            continue
        per = s.size_diff / n
        count = s.count_diff / n
        where = s.traceback.format(limit=args.frames, most_recent_first=True)
        print(f"{per:8.1f} B  {count:5.2f} blocks  " + "\n" + "\n".join("    " + w for w in where))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--streams", type=int, default=2000)
    parser.add_argument("--boms", type=int, default=100)
    parser.add_argument("--boms-per-stream", type=int, default=0, metavar="K",
                        help="streams of K BOMs each (loadtest --boms-per-stream)")  # fmt: skip
    parser.add_argument("--group", choices=("lineno", "traceback", "filename"), default="lineno")
    parser.add_argument("--frames", type=int, default=1)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    tracemalloc.start(max(args.frames, 1))
    os.environ.pop("BOMSTREAM_CONFIG", None)
    import uvloop

    uvloop.run(measure(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
