#!/usr/bin/env python3
"""Garbage-collector pauses while streams connect.

Runs a gateway in this process (pinned to core 0), tuned the way ``bomstream
serve`` tunes it unless ``--no-tune``, opens N streams at a given rate with
``bomstream loadtest`` (core 1, a minted JWT per stream), and prints every
collection's count, total and longest pause per generation, and the tracked
objects per open stream.

    python bench/gcpauses.py --streams 15000 --rate 5000
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SECRET = "gcpauses-jwt-secret-gcpauses-jwt-secret"


async def measure(args: argparse.Namespace) -> None:
    from bomstream.config_load import load_config
    from bomstream.server import start

    overrides = {
        "server.port": 0,
        "server.access_log": False,
        "server.log_level": "warning",
        "auth.admin_token": "gcpauses-admin-token",
        "auth.jwt_secret": SECRET,
    }
    cfg = load_config(path=None, env={}, overrides=overrides, default_file=False)
    running = await start(cfg)
    if not args.no_tune:
        from bomstream.server import tune_gc

        tune_gc()
    pauses: list[tuple[int, float]] = []
    began = 0.0

    def on_gc(phase: str, info: dict[str, int]) -> None:
        nonlocal began
        if phase == "start":
            began = time.perf_counter()
        else:
            pauses.append((info["generation"], time.perf_counter() - began))

    conf = Path(tempfile.mkstemp(suffix=".toml")[1])
    conf.write_text(f'[auth]\njwt_secret = "{SECRET}"\n')
    baseline = len(gc.get_objects())
    gc.callbacks.append(on_gc)
    client = await asyncio.create_subprocess_exec(
        "taskset", "-c", "1", sys.executable, "-m", "bomstream", "loadtest",
        "--config", str(conf), "--url", running.url, "--connections", str(args.streams),
        "--boms", "100", "--source-ips", "4", "--connect-rate", str(args.rate),
        "--mint-token", "--hold", "3", "--no-progress",
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT,
    )  # fmt: skip
    hub = running.gateway.hub
    while client.returncode is None and hub.stream_count < args.streams:
        await asyncio.sleep(0.1)
    held = hub.stream_count
    gc.callbacks.remove(on_gc)  # the ramp is over; not the mass close after it
    tracked = len(gc.get_objects()) - baseline
    await client.wait()
    await running.stop()
    conf.unlink()
    print(f"streams held: {held}; tracked objects per stream: {tracked / max(held, 1):.1f}")
    for gen in range(3):
        times = sorted(t for g, t in pauses if g == gen)
        if times:
            print(
                f"gen{gen}: {len(times)} collections, total {1000 * sum(times):.0f} ms,"
                f" longest {1000 * times[-1]:.1f} ms"
            )
        else:
            print(f"gen{gen}: none")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--streams", type=int, default=15000)
    parser.add_argument("--rate", type=int, default=5000)
    parser.add_argument(
        "--no-tune", action="store_true", help="leave the collector as CPython sets it"
    )
    args = parser.parse_args()
    import os

    os.sched_setaffinity(0, {0})
    import uvloop

    uvloop.run(measure(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
