"""The ``workers`` scenario of bench/scaling.py: ``serve --workers 2`` against
one worker, on the same two cores, in one run.

Both gateways may use cores 0 and 1 (``taskset -c 0,1``), so only the number
of workers differs. The load client is ``loadtest --workers 2`` on the same
two cores (the gateway cannot have a core to itself on a 2-core machine
once it runs two workers), Redis on core 1 as in bench/run.py. Each repeat
runs both, in alternating order, so drift in other work on the machine
falls on both sides. Reported per run: deliveries/s, delivery p99, gateway
CPU-s per 100k deliveries (summed over the workers), each client process's
CPU share, and how the kernel spread the streams over the workers.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import threading
import time
import urllib.request
from dataclasses import dataclass
from typing import Any

import run  # bench/run.py: the shared gateway, Redis and machine plumbing

CPUS = "0,1"
CLIENT_WORKERS = 2
# Chosen from a sweep (README "Scaling out"): no client process came near
# loadtest's 85% CPU-share warning at any rate swept (300 to 3,000/s), so the
# choice is the highest rate below the first at which either side fell short
# of what was published (deliveries/s under 95% of it).
DEFAULT_RATE = 1000
METRICS = ("deliveries_per_s", "p99_ms", "cpu_s_per_100k")
EXTRA = (
    "p50_ms",
    "publish_rate",
    "lost",
    "machine_busy_cores_publishing",
    "other_cores_publishing",
)


@dataclass(frozen=True)
class Shape:
    """The load of one run; the default is bench/run.py's fan-out."""

    connections: int = 10000
    boms: int = 100
    duration_s: float = 10
    hold_s: float = 2


def health(url: str) -> dict[str, Any] | None:
    """One health answer over a connection of its own (urllib opens a new one
    each time, so SO_REUSEPORT may hand it to any worker)."""
    try:
        with urllib.request.urlopen(f"{url}/api/enrichment/health", timeout=5) as resp:
            body: dict[str, Any] = json.loads(resp.read())
            return body
    except OSError:
        return None


def worker_pids(gw: run.Gateway, workers: int) -> list[int]:
    """The serving processes: the gateway itself, or each worker of its
    supervisor once every one has answered a health check."""
    if workers == 1:
        return [gw.proc.pid]
    seen: dict[int, int] = {}
    deadline = time.monotonic() + 30
    while len(seen) < workers:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only workers {sorted(seen)} of {workers} answered")
        body = health(gw.url)
        if body is not None and body.get("status") == "healthy":
            seen[int(body["worker"])] = int(body["pid"])
        time.sleep(0.05)
    return [seen[i] for i in range(workers)]


class StreamSplit(threading.Thread):
    """Polls health while streams connect, until the workers' latest stream
    counts add up to every connection: how the kernel spread them."""

    def __init__(self, url: str, workers: int, connections: int) -> None:
        super().__init__(daemon=True)
        self.url, self.workers, self.connections = url, workers, connections
        self.counts: dict[int, int] = {}
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            body = health(self.url)
            if body is not None:
                self.counts[int(body.get("worker") or 0)] = int(body["streams"])
                if len(self.counts) == self.workers and self.total() >= self.connections:
                    return
            self.done.wait(0.2)

    def total(self) -> int:
        return sum(self.counts.values())

    def split(self) -> list[int] | None:
        if len(self.counts) < self.workers or self.total() < self.connections:
            return None
        return [self.counts[i] for i in range(self.workers)]


class MachineCPU(threading.Thread):
    """Samples /proc/stat, to tell how busy both cores were (every process,
    ours and others) while events were published: a client process can be
    short of CPU without being busy itself when the machine is full."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.samples: list[tuple[float, int, int]] = []
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            self._sample()
            self.done.wait(0.2)
        self._sample()  # the run is over: this one is after every window in it

    def _sample(self) -> None:
        with open("/proc/stat") as fh:
            ticks = [int(x) for x in fh.readline().split()[1:]]
        idle = ticks[3] + ticks[4]  # idle and iowait
        # Wall-clock time, to match the window the load client reports.
        self.samples.append((time.time(), sum(ticks) - idle, sum(ticks)))

    def busy_cores(self, start: float, end: float) -> float | None:
        """Cores in use on average between the samples around ``start`` and ``end``."""
        before = [s for s in self.samples if s[0] <= start]
        after = [s for s in self.samples if s[0] >= end]
        if not before or not after or after[0][2] == before[-1][2]:
            return None
        busy = after[0][1] - before[-1][1]
        share = busy / (after[0][2] - before[-1][2])
        return round(share * (os.cpu_count() or 1), 2)


def once(redis_url: str, auth: list[str], workers: int, rate: int, shape: Shape) -> dict[str, Any]:
    port = run.free_port()
    config = run.write_config(redis_url, port)
    gw = run.Gateway(config, port, cpus=CPUS, args=("--workers", str(workers)))
    try:
        pids = worker_pids(gw, workers)
        split = StreamSplit(gw.url, workers, shape.connections)
        split.start()
        machine = MachineCPU()
        machine.start()
        args = [
            "--connections", str(shape.connections), "--boms", str(shape.boms),
            "--rate", str(rate), "--duration", str(shape.duration_s), "--hold", str(shape.hold_s),
            "--workers", str(CLIENT_WORKERS),
        ]  # fmt: skip
        report = run.loadtest(gw, config, auth, args, cpus=CPUS, gateway_pids=pids)
        split.done.set()
        split.join()
        machine.done.set()
        machine.join()
    finally:
        gw.stop()
        config.unlink()
    row = run.summarise("fanout", report)
    window = report["publish"]["measured_window_unix"]
    busy = machine.busy_cores(*window) if window else None
    others = None
    if busy is not None and row["gateway_cpu_s"] is not None:
        ours = row["gateway_cpu_s"] + sum(p["cpu_s"] for p in report["client_processes"])
        others = round(busy - ours / (window[1] - window[0]), 2)
    row.update(
        {
            "machine_busy_cores_publishing": busy,
            # What the gateway and the load client did not use of that: Redis,
            # the kernel's own threads and any other work on the machine.
            "other_cores_publishing": others,
            "gateway_workers": workers,
            "gateway_pids": report["gateway"]["pids"],
            "streams_per_worker": split.split(),
            "client_cpu_shares": {
                f"{p['role']} {p['pid']}": p["cpu_share"] for p in report["client_processes"]
            },
            "client_cpu_share_max": max(
                (p["cpu_share"] or 0.0) for p in report["client_processes"]
            ),
            "client_cpu_warning": report["client_cpu_warning"],
        }
    )
    return {"row": row, "report": report}


def load() -> dict[str, Any]:
    """What else the machine was doing: its load average and busiest processes."""
    top = subprocess.run(
        ["top", "-bn1", "-o", "%CPU"], capture_output=True, text=True, check=False
    ).stdout.splitlines()
    start = next((i for i, line in enumerate(top) if line.lstrip().startswith("PID")), 0)
    return {
        "loadavg": [round(x, 2) for x in os.getloadavg()],
        "top": [line.rstrip() for line in top[start : start + 8]],
    }


def one_rate(
    redis_url: str, auth: list[str], rate: int, repeat: int, shape: Shape
) -> dict[str, Any]:
    pairs: list[dict[str, dict[str, Any]]] = []
    reports: list[dict[str, Any]] = []
    for i in range(repeat):
        pair: dict[str, dict[str, Any]] = {}
        # 1 then 2 workers, then 2 then 1: a trend in other load hits both sides.
        for workers in (1, 2) if i % 2 == 0 else (2, 1):
            result = once(redis_url, auth, workers, rate, shape)
            pair[str(workers)] = result["row"]
            reports.append(result["report"])
            print(
                f"bench: workers {rate}/s, {workers} gateway worker(s), run {i + 1}:"
                f" {json.dumps(result['row'])}",
                flush=True,
            )
        pairs.append(pair)
    return summarise(rate, pairs, reports)


def summarise(
    rate: int, pairs: list[dict[str, dict[str, Any]]], reports: list[dict[str, Any]]
) -> dict[str, Any]:
    """Medians per side, and the median of each run's own 2-to-1 ratio."""
    out: dict[str, Any] = {"rate": rate, "runs": pairs, "reports": reports}
    for n in ("1", "2"):
        rows = [{k: p[n][k] for k in (*METRICS, *EXTRA)} for p in pairs]
        shares = [p[n]["client_cpu_share_max"] for p in pairs]
        out[n] = {
            **run.median_row(rows),
            "lost": sum(r["lost"] or 0 for r in rows),
            "client_cpu_share_max": max(shares),
            "client_cpu_warnings": sum(1 for p in pairs if p[n]["client_cpu_warning"]),
        }
    out["ratio_2_to_1"] = {
        key: round(statistics.median(p["2"][key] / p["1"][key] for p in pairs), 3)
        for key in METRICS
        if all(p["1"][key] and p["2"][key] is not None for p in pairs)
    }
    out["ratio_2_to_1_range"] = {
        key: [round(min(p["2"][key] / p["1"][key] for p in pairs), 3),
              round(max(p["2"][key] / p["1"][key] for p in pairs), 3)]
        for key in out["ratio_2_to_1"]
    }  # fmt: skip
    return out


def scenario(
    redis_url: str, rates: list[int], repeat: int, shape: Shape | None = None
) -> dict[str, Any]:
    shape = shape or Shape()
    auth_name, auth = run.pick_auth(redis_url)
    result: dict[str, Any] = {
        "auth": auth_name,
        "shape": vars(shape),
        "load_before": load(),
        "rates": {},
    }
    for rate in rates:
        result["rates"][str(rate)] = one_rate(redis_url, auth, rate, repeat, shape)
    result["load_after"] = load()
    return result


def readme_block(result: dict[str, Any]) -> str:
    m, w = result["machine"], result["workers"]
    shape = Shape(**w["shape"])
    before, after = w["load_before"]["loadavg"], w["load_after"]["loadavg"]
    lines = [
        f"Measured {result['date']} on {m['nproc']} cores ({m['cpu_model']}), Python"
        f" {m['python']}, commit `{m['commit']}`; auth: {w['auth']} per stream;"
        f" {result['repeat']} runs of each side, alternating. Load average (1, 5, 15 min)"
        f" {', '.join(map(str, before))} before, {', '.join(map(str, after))} after."
        f" Command: `{result['command']}`",
        "",
        f"{shape.connections:,} streams over {shape.boms} BOMs, {shape.duration_s:.0f} s of"
        " events; gateway and"
        f" `loadtest --workers {CLIENT_WORKERS}` both on cores {CPUS}, Redis on core"
        f" {run.LOAD_CORE}. Medians; the ratio is the median of each run's own 2-to-1 ratio"
        " (range over the runs):",
        "",
        "| events/s | gateway workers | deliveries/s | p50 ms | p99 ms | gateway CPU-s per 100k | busiest client process (highest CPU share seen) | cores busy, all processes (not the gateway's or client's) | lost |",  # noqa: E501
        "|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip

    def busy(s: dict[str, Any]) -> str:
        cores = s.get("machine_busy_cores_publishing")
        if cores is None:
            return ""
        return f"{cores:.2f} of {m['nproc']} ({s.get('other_cores_publishing') or 0:.2f} not ours)"

    for rate, r in w["rates"].items():
        for n in ("1", "2"):
            s = r[n]
            lines.append(
                f"| {int(rate):,} | {n} | {s['deliveries_per_s']:,.0f} | {s['p50_ms']:.1f} |"
                f" {s['p99_ms']:.1f} | {s['cpu_s_per_100k']:.2f} |"
                f" {100 * s['client_cpu_share_max']:.0f}% | {busy(s)} | {s['lost']} |"
            )
        ratio, span = r["ratio_2_to_1"], r["ratio_2_to_1_range"]

        def cell(key: str, ratio: dict[str, float] = ratio, span: dict[str, Any] = span) -> str:
            if key not in ratio:
                return ""
            return f"{ratio[key]:.2f} ({span[key][0]:.2f}-{span[key][1]:.2f})"

        lines.append(
            f"| {int(rate):,} | 2 / 1 | {cell('deliveries_per_s')} | | {cell('p99_ms')} |"
            f" {cell('cpu_s_per_100k')} | | | |"
        )
    splits = [p["2"]["streams_per_worker"] for r in w["rates"].values() for p in r["runs"]]
    shown = ", ".join("/".join(f"{n:,}" for n in s) for s in splits if s)
    lines += ["", f"Streams per worker with 2 workers, each run: {shown or 'not seen'}."]
    return "\n".join(lines)
