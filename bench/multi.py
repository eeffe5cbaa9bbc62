#!/usr/bin/env python3
"""Benchmark of multi-BOM streams against single-BOM streams, in one run.

The target: 1,000 streams of 50 BOMs each (50,000 subscriptions) against
50,000 single-BOM streams, both at 1,000 events/s spread over 1,000 BOMs
(so 50 subscriptions a BOM either way). This machine cannot hold 50,000
streams: the gateway's open-files limit is 20,000 (hard, not raisable here)
and each stream is a socket. So both sides are scaled down by ``--scale``
(default 5): 200 streams of 50 BOMs against 10,000 single-BOM streams,
10,000 subscriptions each. What each stream sees is kept: the 1,000 BOMs,
the event rate and the 50 BOMs a multi stream are the target's, so a single
stream gets 1 event/s and a multi stream 50/s, as at full size; each event
goes to 10 subscriptions instead of 50, 10,000 deliveries/s instead of
50,000.

Each repeat runs both sides back to back, and a baseline of one single-BOM
stream at the same event rate (the order rotates), each on a fresh gateway
pinned to core 0, the load client (``loadtest --workers``) and Redis on
core 1, as in bench/run.py. Ratios are taken within a repeat. The baseline
gives the CPU that does not depend on the streams: taking in 1,000 events/s
(parsing and buffering every event, watched or not), which the "net" CPU
figures take off.

``--boms 200`` keeps instead what each event costs: 50 subscriptions a BOM
and 50,000 deliveries/s, as at full size, with 5 events/s a single stream
and 250/s a multi stream.

    python bench/multi.py [--repeat 3] [--scale 5] [--boms 1000] [--readme] [--render JSON]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run  # bench/run.py: the shared gateway, Redis and machine plumbing

FULL_SUBSCRIPTIONS, K, BOMS = 50_000, 50, 1000
RATE, DURATION_S, HOLD_S = 1000, 10, 3
SIDES = ("single", "multi")
BASELINE = "baseline"


def side_args(side: str, subscriptions: int, boms: int) -> list[str]:
    streams = {"single": subscriptions, "multi": subscriptions // K, BASELINE: 1}[side]
    args = ["--connections", str(streams), "--boms", str(boms), "--rate", str(RATE),
            "--duration", str(DURATION_S), "--hold", str(HOLD_S), "--drain", "10"]  # fmt: skip
    return args + (["--boms-per-stream", str(K)] if side == "multi" else [])


def summarise(report: dict[str, Any]) -> dict[str, Any]:
    c, d, lat, g = (report["connections"], report["deliveries"], report["latency_ms"],
                    report.get("gateway", {}))  # fmt: skip
    grown_kb = g["rss_kb_held"] - g["rss_kb_before"]
    shares = [p["cpu_share"] or 0.0 for p in report["client_processes"]]
    return {
        "streams": c["established"],
        "subscriptions": c["subscriptions"],
        "failed": sum(c["failed"].values()),
        "reconnects": c["reconnects"],
        "time_to_connect_s": c["time_to_connect_s"],
        "publish_rate": report["publish"]["achieved_rate"],
        "expected": d["expected"],
        "received": d["received"],
        "lost": d["lost"],
        "duplicates": d["duplicates"],
        "out_of_order": d["out_of_order"],
        "misrouted": d["misrouted"],
        "deliveries_per_s": d["per_s"],
        "p50_ms": lat["p50"],
        "p99_ms": lat["p99"],
        "max_ms": lat["max"],
        "gateway_cpu_s": g["cpu_s_publish"],
        "cpu_s_per_100k": g["cpu_s_per_100k_deliveries"],
        "rss_growth_mib": round(grown_kb / 1024, 2),
        "rss_bytes_per_subscription": round(1024 * grown_kb / max(1, c["subscriptions"]), 1),
        "client_cpu_share_max": max(shares),
        "client_cpu_share_sum": round(sum(shares), 3),
        "client_cpu_shares": {
            f"{p['role']} {p['pid']}": p["cpu_share"] for p in report["client_processes"]
        },
        "rss_kb_grown": grown_kb,
        "gateway_write_calls": g.get("write_calls_publish"),
    }


def add_net(row: dict[str, Any], base: dict[str, Any], history: str) -> None:
    """The row's CPU and write calls beyond the baseline's (run in the same
    repeat). Writes to streams are the rest only without shared history:
    with it (the default on Redis) the gateway also writes to Redis, in
    pipelines whose size follows the load, so the baseline's count is not
    the same run's."""
    row["net_cpu_s_per_100k"] = round(
        (row["gateway_cpu_s"] - base["gateway_cpu_s"]) * 100_000 / max(1, row["received"]), 3
    )
    writes = row["gateway_write_calls"], base["gateway_write_calls"]
    if history == "none" and None not in writes:
        to_streams = row["gateway_write_calls"] - base["gateway_write_calls"]
        row["deliveries_per_write"] = round(row["received"] / max(1, to_streams), 2)


def median(rows: list[dict[str, Any]], key: str) -> float:
    return float(statistics.median(r[key] for r in rows))


def summarise_all(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    keys = [k for k, v in runs["single"][0].items() if isinstance(v, (int, float))]
    out: dict[str, Any] = {side: {k: median(runs[side], k) for k in keys} for side in SIDES}
    for side in SIDES:
        out[side]["spread"] = {
            k: [min(r[k] for r in runs[side]), max(r[k] for r in runs[side])] for k in SPREAD
        }
    base = runs[BASELINE]
    out[BASELINE] = {k: median(base, k) for k in ("gateway_cpu_s", "rss_growth_mib")}
    pairs = list(zip(runs["single"], runs["multi"], strict=True))
    out["ratios"] = {
        k: statistics.median(m[k] / s[k] for s, m in pairs if s[k])
        for k in ("deliveries_per_s", *SPREAD)
    }
    return out


SPREAD = (
    "p99_ms",
    "cpu_s_per_100k",
    "net_cpu_s_per_100k",
    "rss_bytes_per_subscription",
)


def run_side(
    redis_url: str, auth: list[str], side: str, args: argparse.Namespace
) -> dict[str, Any]:
    port = run.free_port()
    extra = '\n[history]\nbackend = "none"\n' if args.history == "none" else ""
    config = run.write_config(redis_url, port, extra)
    gw = run.Gateway(config, port)
    try:
        # The baseline's one stream needs no worker processes.
        workers = 1 if side == BASELINE else args.client_workers
        lt_args = [
            *side_args(side, FULL_SUBSCRIPTIONS // args.scale, args.boms),
            "--workers",
            str(workers),
        ]
        report = run.loadtest(gw, config, auth, lt_args, args.client_cpus)
    finally:
        gw.stop()
        config.unlink()
    return report


def readme_block(result: dict[str, Any]) -> str:
    m, s = result["machine"], result["summary"]
    one, many, r = s["single"], s["multi"], s["ratios"]
    subs = FULL_SUBSCRIPTIONS // result["scale"]

    def spread(side: dict[str, Any], key: str, fmt: str) -> str:
        lo, hi = side["spread"][key]
        return f"{fmt.format(side[key])} ({fmt.format(lo)}-{fmt.format(hi)})"

    rows = [
        ("streams (connections)", f"{one['streams']:,.0f}", f"{many['streams']:,.0f}", ""),
        ("subscriptions", f"{one['subscriptions']:,.0f}", f"{many['subscriptions']:,.0f}", ""),
        ("events/s published (achieved)", f"{one['publish_rate']:,.0f}",
         f"{many['publish_rate']:,.0f}", ""),
        ("deliveries/s", f"{one['deliveries_per_s']:,.0f}", f"{many['deliveries_per_s']:,.0f}",
         f"{r['deliveries_per_s']:.2f}"),
        ("lost / duplicates / out of order (worst run)",
         f"{result['worst']['single']}", f"{result['worst']['multi']}", ""),
        ("latency p50 ms", f"{one['p50_ms']:.1f}", f"{many['p50_ms']:.1f}", ""),
        ("latency p99 ms (min-max)", spread(one, "p99_ms", "{:.1f}"),
         spread(many, "p99_ms", "{:.1f}"), f"{r['p99_ms']:.2f}"),
        ("gateway CPU-s per 100k deliveries (min-max)", spread(one, "cpu_s_per_100k", "{:.2f}"),
         spread(many, "cpu_s_per_100k", "{:.2f}"), f"{r['cpu_s_per_100k']:.2f}"),
        ("the same, net of the baseline's intake CPU", spread(one, "net_cpu_s_per_100k", "{:.2f}"),
         spread(many, "net_cpu_s_per_100k", "{:.2f}"), f"{r['net_cpu_s_per_100k']:.2f}"),
        ("gateway RSS growth per subscription, bytes (min-max)",
         spread(one, "rss_bytes_per_subscription", "{:,.0f}"),
         spread(many, "rss_bytes_per_subscription", "{:,.0f}"),
         f"{r['rss_bytes_per_subscription']:.3f}"),
        ("gateway RSS growth, MiB", f"{one['rss_growth_mib']:.1f}",
         f"{many['rss_growth_mib']:.1f}", ""),
        ("time to connect, s", f"{one['time_to_connect_s']:.1f}",
         f"{many['time_to_connect_s']:.1f}", ""),
        ("load client CPU share: busiest process / all processes",
         f"{one['client_cpu_share_max']:.0%} / {one['client_cpu_share_sum']:.0%}",
         f"{many['client_cpu_share_max']:.0%} / {many['client_cpu_share_sum']:.0%}", ""),
    ]  # fmt: skip
    lines = [
        f"Measured {result['date']} on {m['nproc']} cores ({m['cpu_model']}), Python"
        f" {m['python']}, commit `{m['commit']}`; auth: {result['auth']} per stream;"
        f" load average {result['load_before']} before the run. Medians of {result['repeat']}"
        f" repeats, each running both sides back to back; ratios are multi / single within"
        f" a repeat, then the median. Command: `{result['command']}`",
        "",
        f"Scaled down by {result['scale']} from the target (see above): {subs:,} subscriptions"
        f" a side, {result['boms']:,} BOMs ({subs // result['boms']} subscriptions each; events"
        f" a second: {RATE // result['boms']} to a single stream, {RATE * K // result['boms']}"
        f" to a multi stream), {RATE:,} events/s for {DURATION_S} s after a"
        f" {HOLD_S} s hold; shared history"
        f" {'off' if result['history'] == 'none' else 'on (redis, the default with Redis)'};"
        f" the gateway pinned to core 0, the load client (`loadtest --workers"
        f" {result['client_workers']}`) and Redis to CPU {result['client_cpus']}.",
        "",
        "| measure | single-BOM streams | multi-BOM streams (50 BOMs each) | multi / single |",
        "|---|---|---|---|",
    ]
    if "deliveries_per_write" in one:
        rows.insert(-4, ("deliveries per write call to a stream",
                         f"{one['deliveries_per_write']:.2f}",
                         f"{many['deliveries_per_write']:.2f}", ""))  # fmt: skip
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    b = s[BASELINE]
    lines += [
        "",
        f"Baseline (one single-BOM stream, the same events): {b['gateway_cpu_s']:.2f} gateway"
        f" CPU-s over the publishing phase, {b['rss_growth_mib']:.1f} MiB RSS growth.",
    ]
    return "\n".join(lines)


def worst(runs: list[dict[str, Any]]) -> str:
    return " / ".join(str(max(r[k] for r in runs)) for k in ("lost", "duplicates", "out_of_order"))


def load_average(n: int = 1) -> str:
    """The machine's 1 (5, 15) minute load averages: how much else was running."""
    return " ".join(Path("/proc/loadavg").read_text().split()[:n])


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--scale", type=int, default=5, help="divide the target's size by this")
    parser.add_argument(
        "--boms", type=int, default=BOMS, help=f"BOMs the events go to (default {BOMS})"
    )
    parser.add_argument(
        "--history",
        choices=("default", "none"),
        default="default",
        help="shared history: the gateway's default (redis), or none",
    )
    parser.add_argument("--client-workers", type=int, default=2, metavar="N")
    parser.add_argument("--client-cpus", default=run.LOAD_CORE, metavar="LIST")
    parser.add_argument("--readme", action="store_true", help="rewrite the block in README.md")
    parser.add_argument("--render", type=Path, metavar="JSON", help="only render a results file")
    args = parser.parse_args()
    if args.render is not None:
        return report(json.loads(args.render.read_text()), args.readme, None)
    run.raise_nofile()
    now = dt.datetime.now(dt.UTC)
    load_before = load_average(3)
    result: dict[str, Any] = {
        "date": now.strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python " + " ".join(["bench/multi.py", *sys.argv[1:]]),
        "machine": run.machine(),
        "repeat": args.repeat,
        "scale": args.scale,
        "boms": args.boms,
        "history": args.history,
        "client_workers": args.client_workers,
        "client_cpus": args.client_cpus,
        "load_before": load_before,
    }
    order = [*SIDES, BASELINE]
    runs: dict[str, list[dict[str, Any]]] = {side: [] for side in order}
    reports: dict[str, list[dict[str, Any]]] = {side: [] for side in order}
    with run.redis_server() as redis_url:
        auth_name, auth = run.pick_auth(redis_url)
        result["auth"] = auth_name
        for i in range(args.repeat):
            rows = {}
            for side in order[i % 3 :] + order[: i % 3]:
                load = load_average()
                rep = run_side(redis_url, auth, side, args)
                rows[side] = {**summarise(rep), "load_avg_1m": load}
                reports[side].append(rep)
            for side in SIDES:
                add_net(rows[side], rows[BASELINE], args.history)
            for side in order:
                runs[side].append(rows[side])
                print(f"bench: {side} run {i + 1}: {json.dumps(rows[side])}", flush=True)
    result["runs"], result["reports"] = runs, reports
    result["summary"] = summarise_all(runs)
    result["worst"] = {side: worst(runs[side]) for side in SIDES}
    tag = ("" if args.boms == BOMS else f"-{args.boms}boms") + (
        "-nohistory" if args.history == "none" else ""
    )
    out = run.RESULTS / f"multi-{now.strftime('%Y-%m-%d')}{tag}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return report(result, args.readme, out)


def report(result: dict[str, Any], readme: bool, out: Path | None) -> int:
    block = readme_block(result)
    print(block)
    if readme:
        tag = f"bench-multi-{result['boms']}" + (
            "-nohistory" if result["history"] == "none" else ""
        )
        start, end = f"<!-- {tag}:start -->", f"<!-- {tag}:end -->"
        text = run.README.read_text()
        head, rest = text.split(start, 1)
        _, tail = rest.split(end, 1)
        run.README.write_text(f"{head}{start}\n{block}\n{end}{tail}")
    if out is not None:
        print(f"bench: results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
