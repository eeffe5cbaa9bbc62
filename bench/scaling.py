#!/usr/bin/env python3
"""Benchmark of scaling out (spec section 10): interest subscriptions and Redis Cluster.

- ``intake``: 4 gateway instances on one Redis, each watching a different
  quarter of 400 BOMs (one stream per BOM), while events are published to
  all 400 through bomstream.publisher. Per instance: the bytes it read from
  its Redis subscription connection (``bomstream_redis_feed_bytes_total``,
  counted on every socket read) and its CPU seconds (/proc), with
  ``redis.subscribe = "pattern"`` against ``"interest"``, alternated.
- ``failover``: a 3-primary, 3-replica Redis Cluster started by the script,
  one gateway in cluster mode with streams on 30 BOMs across the shards,
  events published continuously; a primary is failed over (CLUSTER FAILOVER
  on its replica) midway. Reports, per BOM, whether every event arrived
  exactly once and in order, and how long the moved shard's events paused.
- ``workers``: ``serve --workers 2`` against one worker on the same two
  cores, alternated in one run (bench/workers.py); ``--workers-rate R``
  (repeatable) sets the event rates, default the one chosen for the README.

For intake and failover the gateways run on core 0 (``taskset -c 0``); Redis,
the publisher and the streams' client on core 1, as in bench/run.py.

    python bench/scaling.py [--repeat 3] [--readme] [--only intake|failover|workers]
    python bench/scaling.py --only workers --workers-rate 300 --workers-rate 600 --repeat 1
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
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

import run  # bench/run.py: the shared gateway, Redis and machine plumbing
import workers  # bench/workers.py: the 1-against-2 workers scenario
from tests.redis_cluster import RedisClusterProcesses

from bomstream.publisher import AsyncPublisher

INSTANCES, BOMS = 4, 400
RATE, DURATION_S = 1000, 10.0
FAILOVER_BOMS, FAILOVER_RATE, FAILOVER_S = 30, 300, 12.0


def mode_config(redis_url: str, port: int, mode: str, cluster: bool = False) -> Path:
    path = run.write_config(redis_url, port, '\n[history]\nbackend = "redis"\n')
    text = path.read_text().replace(
        f'url = "{redis_url}"\n',
        f'url = "{redis_url}"\nsubscribe = "{mode}"\ncluster = {str(cluster).lower()}\n',
    )
    path.write_text(text)
    return path


def metric(url: str, name: str) -> float:
    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith((name + " ", name + "{")):
            total += float(line.rsplit(" ", 1)[1])
    return total


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Watcher:
    """One raw SSE stream that records the ids it receives, in order."""

    def __init__(self, port: int, bom: str) -> None:
        self.port, self.bom = port, bom
        self.ids: list[str] = []
        self.ready = asyncio.Event()
        self._buf = b""

    async def run(self, stop: asyncio.Event) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        writer.write(
            f"GET /api/enrichment/stream/{self.bom} HTTP/1.1\r\nHost: bench\r\n"
            f"Authorization: Bearer {run.ADMIN_TOKEN}\r\n\r\n".encode()
        )
        try:
            while not stop.is_set():
                try:
                    data = await asyncio.wait_for(reader.read(65536), 0.5)
                except TimeoutError:
                    continue
                if not data:
                    break
                self._take(data)
        finally:
            writer.close()

    def _take(self, data: bytes) -> None:
        self._buf += data
        *lines, self._buf = self._buf.split(b"\n")
        for line in lines:
            if line.startswith(b"id: "):
                self.ids.append(line[4:].strip().decode())
            elif b'"type":"connected"' in line:
                self.ready.set()


async def publish_paced(
    url: str, boms: list[str], rate: float, seconds: float, cluster: bool = False
) -> tuple[dict[str, list[str]], dict[str, float]]:
    """Round-robin over the BOMs at ``rate`` events/s; an event that fails (its
    node is being failed over) is sent again with the same id."""
    sent: dict[str, list[str]] = {b: [] for b in boms}
    stats = {"retries": 0.0, "longest_stall_s": 0.0}
    async with AsyncPublisher(url, cluster=cluster) as pub:
        start = time.perf_counter()
        n = 0
        while (elapsed := time.perf_counter() - start) < seconds:
            due = int(elapsed * rate)
            while n < due:
                bom = boms[n % len(boms)]
                seq = n // len(boms) + 1
                body = {"event_id": f"{bom}-{seq}", "event_type": "enrichment.progress",
                        "state": {"enriched_items": seq}}  # fmt: skip
                began = time.perf_counter()
                while True:
                    try:
                        await pub.publish(bom, body)
                        break
                    except Exception:  # any Redis trouble (a failover): the same event again
                        stats["retries"] += 1
                        await asyncio.sleep(0.05)
                stats["longest_stall_s"] = max(
                    stats["longest_stall_s"], time.perf_counter() - began
                )
                sent[bom].append(str(body["event_id"]))
                n += 1
            await asyncio.sleep(0.002)
    return sent, stats


# -- intake: pattern against interest ------------------------------------------


async def intake_once(redis_url: str, mode: str, run_id: str) -> dict[str, Any]:
    boms = [f"{run_id}-b{i}" for i in range(BOMS)]
    quarter = BOMS // INSTANCES
    gateways = []
    try:
        for _ in range(INSTANCES):
            port = run.free_port()
            gateways.append(run.Gateway(mode_config(redis_url, port, mode), port))
        stop = asyncio.Event()
        watchers = [Watcher(gateways[i // quarter].port, bom) for i, bom in enumerate(boms)]
        tasks = [asyncio.create_task(w.run(stop)) for w in watchers]
        await asyncio.wait_for(asyncio.gather(*(w.ready.wait() for w in watchers)), 30)
        await asyncio.sleep(1.0)
        before = [
            (metric(g.url, "bomstream_redis_feed_bytes_total"), cpu_seconds(g.proc.pid))
            for g in gateways
        ]
        sent, _ = await publish_paced(redis_url, boms, RATE, DURATION_S)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(len(w.ids) < len(sent[w.bom]) for w in watchers):
            await asyncio.sleep(0.1)
        after = [
            (metric(g.url, "bomstream_redis_feed_bytes_total"), cpu_seconds(g.proc.pid))
            for g in gateways
        ]
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        for g in gateways:
            g.stop()
            g.config.unlink()
    complete = sum(1 for w in watchers if w.ids == sent[w.bom])
    return {
        "mode": mode,
        "events": sum(len(v) for v in sent.values()),
        "streams_complete": complete,
        "feed_bytes": [round(a[0] - b[0]) for a, b in zip(after, before, strict=True)],
        "cpu_s": [round(a[1] - b[1], 3) for a, b in zip(after, before, strict=True)],
    }


def intake(redis_url: str, repeat: int) -> dict[str, Any]:
    runs: dict[str, list[dict[str, Any]]] = {"pattern": [], "interest": []}
    for i in range(repeat):
        for mode in ("pattern", "interest"):
            row = asyncio.run(intake_once(redis_url, mode, f"s{int(time.time())}{i}{mode[0]}"))
            runs[mode].append(row)
            print(f"bench: intake {mode} run {i + 1}: {json.dumps(row)}", flush=True)
    return summarise_intake(runs)


def summarise_intake(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Per instance and per 1,000 events published: the publisher does not
    always reach its target rate on a shared machine, and not equally in both
    modes, so raw totals would compare different amounts of traffic."""
    out: dict[str, Any] = {"runs": runs}
    for mode, rows in runs.items():

        def per_k(r: dict[str, Any], key: str) -> list[float]:
            return [1000 * v / r["events"] for v in r[key]]

        out[mode] = {
            "events": statistics.median(r["events"] for r in rows),
            "feed_bytes_per_instance": statistics.median(
                statistics.median(r["feed_bytes"]) for r in rows
            ),
            "feed_bytes_per_1k_events": statistics.median(
                statistics.median(per_k(r, "feed_bytes")) for r in rows
            ),
            "cpu_ms_per_1k_events": statistics.median(
                1000 * statistics.median(per_k(r, "cpu_s")) for r in rows
            ),
            "cpu_ms_spread": [
                min(1000 * min(per_k(r, "cpu_s")) for r in rows),
                max(1000 * max(per_k(r, "cpu_s")) for r in rows),
            ],
            "complete": min(r["streams_complete"] for r in rows),
        }
    p, i = out["pattern"], out["interest"]
    out["bytes_ratio"] = i["feed_bytes_per_1k_events"] / p["feed_bytes_per_1k_events"]
    out["cpu_ratio"] = i["cpu_ms_per_1k_events"] / p["cpu_ms_per_1k_events"]
    return out


# -- failover on a Redis Cluster ------------------------------------------------


async def failover_once(i: int) -> dict[str, Any]:
    cluster = RedisClusterProcesses(primaries=3, replicas=1)
    gw = None
    try:
        cluster.start()
        port = run.free_port()
        gw = run.Gateway(mode_config(cluster.url, port, "interest", cluster=True), port)
        boms = [f"fo{i}-{n}" for n in range(FAILOVER_BOMS)]
        primary = cluster.owner(f"enrichment:{boms[0]}")
        replica = cluster.replica_of(primary)
        moved = [b for b in boms if cluster.owner(f"enrichment:{b}") is primary]
        stop = asyncio.Event()
        watchers = [Watcher(port, b) for b in boms]
        tasks = [asyncio.create_task(w.run(stop)) for w in watchers]
        await asyncio.wait_for(asyncio.gather(*(w.ready.wait() for w in watchers)), 30)
        publishing = asyncio.create_task(
            publish_paced(cluster.url, boms, FAILOVER_RATE, FAILOVER_S, cluster=True)
        )
        await asyncio.sleep(FAILOVER_S / 3)
        began = time.monotonic()
        seen_before = sum(len(w.ids) for w in watchers if w.bom in moved)
        await asyncio.to_thread(replica.command, "CLUSTER", "FAILOVER")
        while time.monotonic() - began < 30:
            role = await asyncio.to_thread(replica.command, "ROLE")
            if isinstance(role, list) and role[0] in (b"master", "master"):
                break
            await asyncio.sleep(0.02)
        promoted = time.monotonic() - began
        # The first event of a moved BOM after the switch.
        resumed_after = None
        while time.monotonic() - began < 30:
            if sum(len(w.ids) for w in watchers if w.bom in moved) > seen_before + len(moved):
                resumed_after = time.monotonic() - began
                break
            await asyncio.sleep(0.01)
        sent, stats = await publishing
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(len(w.ids) < len(sent[w.bom]) for w in watchers):
            await asyncio.sleep(0.1)
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        resyncs = metric(gw.url, "bomstream_redis_resyncs_total")
    finally:
        if gw is not None:
            gw.stop()
            gw.config.unlink()
        cluster.close()
    lost = dup = disorder = 0
    for w in watchers:
        want = sent[w.bom]
        lost += len(set(want) - set(w.ids))
        dup += len(w.ids) - len(set(w.ids))
        disorder += int([x for x in w.ids if x in set(want)] != want[: len(w.ids)])
    return {
        "boms": len(boms),
        "boms_on_failed_over_primary": len(moved),
        "events": sum(len(v) for v in sent.values()),
        "lost": lost,
        "duplicates": dup,
        "boms_out_of_order": disorder,
        "replica_promoted_s": round(promoted, 3),
        "moved_boms_flowing_again_s": None if resumed_after is None else round(resumed_after, 3),
        "publish_retries": int(stats["retries"]),
        "longest_publish_stall_s": round(stats["longest_stall_s"], 3),
        "resyncs": resyncs,
    }


def failover(repeat: int) -> dict[str, Any]:
    runs = []
    for i in range(repeat):
        runs.append(asyncio.run(failover_once(i)))
        print(f"bench: failover run {i + 1}: {json.dumps(runs[-1])}", flush=True)
    return {"runs": runs}


# -- report -----------------------------------------------------------------------


def readme_block(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [
        f"Measured {result['date']} on {m['nproc']} cores ({m['cpu_model']}), Python"
        f" {m['python']}, commit `{m['commit']}`; {result['repeat']} runs each."
        f" Command: `{result['command']}`",
        "",
    ]
    if "intake" in result:
        it = result["intake"]
        p, i = it["pattern"], it["interest"]
        lines += [
            f"Intake: {INSTANCES} instances, each with one stream on each of its"
            f" {BOMS // INSTANCES} BOMs; events to all {BOMS} BOMs for {DURATION_S:.0f} s at"
            f" up to {RATE:,}/s through bomstream.publisher. Per instance and per 1,000"
            " events published (medians over runs of each instance's figure; the range"
            " is over every instance of every run):",
            "",
            "| redis.subscribe | events published (median) | Redis-to-gateway bytes | gateway CPU ms | streams complete |",
            "|---|---|---|---|---|",
            f"| pattern | {p['events']:,.0f} | {p['feed_bytes_per_1k_events']:,.0f} | {p['cpu_ms_per_1k_events']:.1f} ({p['cpu_ms_spread'][0]:.1f}-{p['cpu_ms_spread'][1]:.1f}) | {p['complete']} of {BOMS} |",
            f"| interest | {i['events']:,.0f} | {i['feed_bytes_per_1k_events']:,.0f} ({100 * it['bytes_ratio']:.1f}% of pattern) | {i['cpu_ms_per_1k_events']:.1f} ({i['cpu_ms_spread'][0]:.1f}-{i['cpu_ms_spread'][1]:.1f}; {100 * it['cpu_ratio']:.0f}% of pattern) | {i['complete']} of {BOMS} |",
            "",
        ]  # fmt: skip
    if "failover" in result:
        lines += [
            f"Failover: 3 primaries + 3 replicas, one gateway, one stream on each of"
            f" {FAILOVER_BOMS} BOMs, {FAILOVER_RATE} events/s for {FAILOVER_S:.0f} s;"
            f" CLUSTER FAILOVER on a replica after {FAILOVER_S / 3:.0f} s:",
            "",
            "| run | BOMs moved | events | lost | duplicates | BOMs out of order | replica promoted after | moved BOMs' events flowing again after | publish retries (longest stall) | re-syncs |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]  # fmt: skip
        for n, r in enumerate(result["failover"]["runs"], 1):
            flowing = r["moved_boms_flowing_again_s"]
            lines.append(
                f"| {n} | {r['boms_on_failed_over_primary']} | {r['events']:,} | {r['lost']} |"
                f" {r['duplicates']} | {r['boms_out_of_order']} | {r['replica_promoted_s']:.2f} s |"
                f" {'-' if flowing is None else f'{flowing:.2f} s'} |"
                f" {r['publish_retries']} ({r['longest_publish_stall_s']:.2f} s) | {r['resyncs']:.0f} |"
            )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--only", choices=("intake", "failover", "workers"), action="append")
    parser.add_argument(
        "--workers-rate",
        type=int,
        action="append",
        metavar="R",
        help=f"events/s of the workers scenario (default {workers.DEFAULT_RATE})",
    )
    parser.add_argument("--out", type=Path, help="results file (default scaling-<date>.json)")
    parser.add_argument("--readme", action="store_true", help="rewrite the table in README.md")
    parser.add_argument(
        "--render", type=Path, metavar="JSON", help="only render an earlier results file"
    )
    args = parser.parse_args()
    if args.render is not None:
        result = json.loads(args.render.read_text())
        if "intake" in result:
            result["intake"] = summarise_intake(result["intake"]["runs"])
        return report(result, args.readme, None)
    run.raise_nofile()
    # The publisher and the streams' client share core 1 with Redis.
    subprocess.run(["taskset", "-cp", run.LOAD_CORE, str(os.getpid())],
                   check=True, capture_output=True)  # fmt: skip
    chosen = args.only or ["intake", "failover", "workers"]
    now = dt.datetime.now(dt.UTC)
    result: dict[str, Any] = {
        "date": now.strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python " + " ".join(["bench/scaling.py", *sys.argv[1:]]),
        "machine": run.machine(),
        "repeat": args.repeat,
    }
    if "intake" in chosen:
        with run.redis_server() as redis_url:
            result["intake"] = intake(redis_url, args.repeat)
    if "failover" in chosen:
        result["failover"] = failover(args.repeat)
    if "workers" in chosen:
        rates = args.workers_rate or [workers.DEFAULT_RATE]
        with run.redis_server() as redis_url:
            result["workers"] = workers.scenario(redis_url, rates, args.repeat)
    out = args.out or run.RESULTS / f"scaling-{now.strftime('%Y-%m-%d')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return report(result, args.readme, out)


def report(result: dict[str, Any], readme: bool, out: Path | None) -> int:
    # Each scenario group has its own README block, so running one group
    # leaves the others' numbers alone.
    blocks = []
    if "intake" in result or "failover" in result:
        blocks.append(("bench-scaling", readme_block(result)))
    if "workers" in result:
        blocks.append(("bench-workers", workers.readme_block(result)))
    for name, block in blocks:
        print(block)
        if readme:
            start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
            text = run.README.read_text()
            head, rest = text.split(start, 1)
            _, tail = rest.split(end, 1)
            run.README.write_text(f"{head}{start}\n{block}\n{end}{tail}")
    if out is not None:
        print(f"bench: results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
