#!/usr/bin/env python3
"""Benchmark of shared history (spec section 8) on this machine.

- ``herd``: 100 BOMs with 20 events each in Redis history; a freshly started
  gateway, then 10,000 streams (100 per BOM) reconnecting at once with
  ``Last-Event-ID`` = their BOM's 10th event. Time until every stream has its
  10 missed events, how many came back ``resumed: true``, and how many history
  reads the gateway issued (one per BOM is the design).
- ``fanout``: 10k streams, 600 events/s for 10 s (60k deliveries/s), with
  ``history.backend = "none"`` and ``"redis"`` alternated in one run.

Same pinning as bench/run.py: gateway on core 0, Redis and the client on core 1.

    python bench/history.py [--repeat 3] [--readme]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

import run  # bench/run.py: the shared gateway, Redis and loadtest plumbing

from bomstream.publisher import Publisher

BOMS, EVENTS, RESUME_AT, STREAMS = 100, 20, 10, 10_000
MAX_CONNECTING = 512
HISTORY_ON = '\n[history]\nbackend = "redis"\n'
HISTORY_OFF = '\n[history]\nbackend = "none"\n'


def seed_history(redis_url: str, run_id: str) -> None:
    with Publisher(redis_url) as pub:
        for b in range(BOMS):
            for n in range(1, EVENTS + 1):
                bom = f"{run_id}-b{b}"
                pub.publish(bom, {"event_id": f"{bom}-e{n}", "event_type": "enrichment.progress",
                                  "state": {"enriched_items": n, "total_items": EVENTS}})  # fmt: skip


async def one_stream(
    url_host: str, port: int, source: str, bom: str, gate: asyncio.Semaphore
) -> tuple[bool, int]:
    """(resumed, events received) for one reconnecting stream."""
    async with gate:
        reader, writer = await asyncio.open_connection(url_host, port, local_addr=(source, 0))
    request = (
        f"GET /api/enrichment/stream/{bom} HTTP/1.1\r\nHost: {url_host}\r\n"
        f"Authorization: Bearer {run.ADMIN_TOKEN}\r\nLast-Event-ID: {bom}-e{RESUME_AT}\r\n\r\n"
    )
    writer.write(request.encode())
    seen = b""
    want = EVENTS - RESUME_AT
    try:
        while seen.count(b"\nid: ") < want:
            data = await reader.read(65536)
            if not data:
                break
            seen += data
    finally:
        writer.close()
    return b'"resumed":true' in seen, seen.count(b"\nid: ")


async def herd(port: int, run_id: str) -> dict[str, Any]:
    gate = asyncio.Semaphore(MAX_CONNECTING)
    sources = [f"127.0.0.{i + 1}" for i in range(run.SOURCE_IPS)]
    started = time.perf_counter()
    results = await asyncio.gather(
        *(
            one_stream("127.0.0.1", port, sources[i % len(sources)], f"{run_id}-b{i % BOMS}", gate)
            for i in range(STREAMS)
        )
    )
    elapsed = time.perf_counter() - started
    return {
        "streams": STREAMS,
        "seconds_until_all_resumed": round(elapsed, 2),
        "resumed": sum(1 for r, _ in results if r),
        "complete": sum(1 for _, n in results if n == EVENTS - RESUME_AT),
    }


def history_reads(url: str) -> int:
    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith("bomstream_history_reads_total{"):
            total += float(line.rsplit(" ", 1)[1])
    return int(total)


def herd_run(redis_url: str, i: int) -> dict[str, Any]:
    run_id = f"h{int(time.time())}{i}"
    seed_history(redis_url, run_id)
    port = run.free_port()
    config = run.write_config(redis_url, port, HISTORY_ON)
    gw = run.Gateway(config, port)
    try:
        # The client shares core 1 with Redis, like the load client in run.py.
        subprocess.run(["taskset", "-cp", run.LOAD_CORE, str(os.getpid())],
                       check=True, capture_output=True)  # fmt: skip
        row = asyncio.run(herd(port, run_id))
        row["history_reads"] = history_reads(gw.url)
    finally:
        gw.stop()
        config.unlink()
    return row


def fanout_pair(redis_url: str, auth: list[str]) -> dict[str, dict[str, Any]]:
    out = {}
    args = ["--connections", "10000", "--boms", "100", "--rate", "600", "--duration", "10",
            "--hold", "1"]  # fmt: skip
    for label, extra in (("off", HISTORY_OFF), ("on", HISTORY_ON)):
        port = run.free_port()
        config = run.write_config(redis_url, port, extra)
        gw = run.Gateway(config, port)
        try:
            out[label] = run.summarise("fanout", run.loadtest(gw, config, auth, args))
        finally:
            gw.stop()
            config.unlink()
    return out


def median(rows: list[dict[str, Any]], key: str) -> float:
    return round(statistics.median(r[key] for r in rows if r.get(key) is not None), 3)


def readme_block(result: dict[str, Any]) -> str:
    m, h, f = result["machine"], result["herd"], result["fanout"]
    ratio = f["median_cpu_on"] / f["median_cpu_off"]
    return "\n".join(
        [
            f"Measured {result['date']} on {m['nproc']} cores ({m['cpu_model']}), Python"
            f" {m['python']}, commit `{m['commit']}`; medians of {result['repeat']} runs."
            f" Command: `{result['command']}`",
            "",
            "| measurement | value |",
            "|---|---|",
            f"| herd: streams reconnecting to a fresh instance | {STREAMS:,} over {BOMS} BOMs |",
            f"| herd: time until all resumed with their {EVENTS - RESUME_AT} missed events |"
            f" {h['median_seconds']:.2f} s (runs {', '.join(str(r['seconds_until_all_resumed']) for r in h['runs'])}) |",
            f"| herd: streams resumed (`resumed: true`) / complete | {h['median_resumed']:,.0f} / {h['median_complete']:,.0f} |",
            f"| herd: history reads issued | {h['median_reads']:.0f} (one per BOM) |",
            f"| fan-out 60k/s, history off: deliveries/s, p99, CPU s per 100k |"
            f" {f['median_rate_off']:,.0f}, {f['median_p99_off']:.1f} ms, {f['median_cpu_off']:.2f} |",
            f"| fan-out 60k/s, history on: deliveries/s, p99, CPU s per 100k |"
            f" {f['median_rate_on']:,.0f}, {f['median_p99_on']:.1f} ms, {f['median_cpu_on']:.2f} |",
            f"| fan-out CPU with history on / off | {ratio:.2f} |",
        ]
    )  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--readme", action="store_true", help="rewrite the history table in README.md"
    )
    args = parser.parse_args()
    run.raise_nofile()
    now = dt.datetime.now(dt.UTC)
    result: dict[str, Any] = {
        "date": now.strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python " + " ".join(["bench/history.py", *sys.argv[1:]]),
        "machine": run.machine(),
        "repeat": args.repeat,
    }
    with run.redis_server() as redis_url:
        _, auth = run.pick_auth(redis_url)
        herds = []
        for i in range(args.repeat):
            herds.append(herd_run(redis_url, i))
            print(f"bench: herd run {i + 1}: {json.dumps(herds[-1])}", flush=True)
        pairs = []
        for i in range(args.repeat):
            pairs.append(fanout_pair(redis_url, auth))
            print(f"bench: fanout pair {i + 1}: {json.dumps(pairs[-1])}", flush=True)
    result["herd"] = {
        "runs": herds,
        "median_seconds": median(herds, "seconds_until_all_resumed"),
        "median_resumed": median(herds, "resumed"),
        "median_complete": median(herds, "complete"),
        "median_reads": median(herds, "history_reads"),
    }
    fan: dict[str, Any] = {"runs": pairs}
    for side in ("off", "on"):
        rows = [p[side] for p in pairs]
        fan[f"median_rate_{side}"] = median(rows, "deliveries_per_s")
        fan[f"median_p99_{side}"] = median(rows, "p99_ms")
        fan[f"median_cpu_{side}"] = median(rows, "cpu_s_per_100k")
        fan[f"lost_{side}"] = sum(r["lost"] for r in rows)
    result["fanout"] = fan
    out = run.RESULTS / f"history-{now.strftime('%Y-%m-%d')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    block = readme_block(result)
    print(block)
    if args.readme:
        start, end = "<!-- bench-history:start -->", "<!-- bench-history:end -->"
        text = run.README.read_text()
        head, rest = text.split(start, 1)
        _, tail = rest.split(end, 1)
        run.README.write_text(f"{head}{start}\n{block}\n{end}{tail}")
    print(f"bench: results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
