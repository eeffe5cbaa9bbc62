#!/usr/bin/env python3
"""The bomstream benchmark: idle streams, fan-out and latency on this machine.

The gateway runs pinned to core 0 (``taskset -c 0``); redis-server and the load
client share core 1. Each run starts a fresh gateway, drives it with
``bomstream loadtest`` (which samples the gateway's RSS and CPU seconds from
/proc), and stops it. Every scenario is repeated and the median is reported,
since other work may share this machine.

    python bench/run.py                      # everything, 3 repeats
    python bench/run.py --only fanout --repeat 1
    python bench/run.py --only fanout --label 100 --label 600 --only ramp
    python bench/run.py --readme             # also rewrite the README table
    python bench/run.py --only fanout --client-workers 2 --client-cpus 1-3
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import datetime as dt
import json
import os
import platform
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
README = ROOT / "README.md"
GATEWAY_CORE, LOAD_CORE = "0", "1"
# Scenarios whose client may be spread over --client-workers processes.
MULTI_CLIENT = ("fanout", "slow")
ADMIN_TOKEN = "bench-admin-token"
JWT_SECRET = "bench-jwt-secret-bench-jwt-secret-0123"
ORG = "bench-org"
OPEN_FILES = 20000
BOMS = 100
SOURCE_IPS = 4
CONNECT_RATE = 4000

# (scenario, label, loadtest arguments)
IDLE = [
    (n, ["--connections", str(n), "--boms", str(BOMS), "--hold", "3"]) for n in (1000, 10000, 15000)
]
FANOUT = [
    (rate, ["--connections", "10000", "--boms", str(BOMS), "--rate", str(rate), "--duration", "10", "--hold", "1"])
    for rate in (100, 600, 1000, 3000)
]  # fmt: skip
# A few streams that stop reading, among 10k: at the 60k/s target, where the
# load client has headroom, and at 100k/s.
SLOW = [
    (f"{rate}+10slow", ["--connections", "10000", "--boms", str(BOMS), "--rate", str(rate), "--duration", "10", "--hold", "1", "--slow-consumers", "10"])
    for rate in (600, 1000)
]  # fmt: skip
# Connects as fast as a crowd reconnecting after a restart: event-loop lag
# (bomstream_loop_lag_seconds) while 15k streams arrive at 5,000/s.
RAMP_RATE = 5000
RAMP_STREAMS = 15000
RAMP = [(RAMP_STREAMS, ["--connections", str(RAMP_STREAMS), "--boms", str(BOMS), "--hold", "4"])]
LATENCY = [(100, ["--connections", "1000", "--boms", str(BOMS), "--rate", "100", "--duration", "10", "--hold", "1"])]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def raise_nofile() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = OPEN_FILES if hard == resource.RLIM_INFINITY else min(OPEN_FILES, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


@contextlib.contextmanager
def redis_server() -> Iterator[str]:
    binary = shutil.which("redis-server") or "/usr/sbin/redis-server"
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="bomstream-bench-redis-")
    proc = subprocess.Popen(
        ["taskset", "-c", LOAD_CORE, binary, "--port", str(port), "--bind", "127.0.0.1",
         "--save", "", "--appendonly", "no", "--dir", workdir, "--loglevel", "warning",
         "--client-output-buffer-limit", "pubsub 0 0 0"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.kill()
        proc.wait()


def write_config(redis_url: str, port: int, extra: str = "") -> Path:
    """A gateway config for one run; ``extra`` is more TOML (whole sections)."""
    path = Path(tempfile.mkstemp(prefix="bomstream-bench-", suffix=".toml")[1])
    path.write_text(
        f"""[server]
host = "127.0.0.1"
port = {port}
access_log = false
log_level = "warning"
max_connections = 50000

[redis]
url = "{redis_url}"

[auth]
admin_token = "{ADMIN_TOKEN}"
jwt_secret = "{JWT_SECRET}"
{extra}"""
    )
    return path


class Gateway:
    def __init__(
        self, config: Path, port: int, cpus: str = GATEWAY_CORE, args: tuple[str, ...] = ()
    ) -> None:
        """``args`` go after ``serve --config``; ``cpus`` is the ``taskset -c`` list."""
        self.config, self.port = config, port
        self.log = tempfile.NamedTemporaryFile(  # noqa: SIM115 - the child process writes it
            prefix="bomstream-bench-gw-", suffix=".log", delete=False
        )
        self.proc = subprocess.Popen(
            ["taskset", "-c", cpus, sys.executable, "-m", "bomstream", "serve", "--config", str(config), *args],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            preexec_fn=raise_nofile,
            cwd=ROOT,
        )  # fmt: skip
        self._wait_healthy()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited: {Path(self.log.name).read_text()}")
            try:
                with urllib.request.urlopen(f"{self.url}/api/enrichment/health", timeout=1):
                    time.sleep(0.5)  # let start-up allocation settle before sampling RSS
                    return
            except (urllib.error.URLError, OSError):
                time.sleep(0.1)
        raise RuntimeError("gateway did not become healthy")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def loadtest(
    gw: Gateway,
    config: Path,
    auth: list[str],
    args: list[str],
    cpus: str = LOAD_CORE,
    connect_rate: int = CONNECT_RATE,
    gateway_pids: list[int] | None = None,
) -> dict[str, Any]:
    """``gateway_pids``: the processes to sample (default: the one started)."""
    out = Path(tempfile.mkstemp(prefix="bomstream-bench-", suffix=".json")[1])
    sampled = [a for pid in gateway_pids or [gw.proc.pid] for a in ("--gateway-pid", str(pid))]
    cmd = [
        "taskset", "-c", cpus, sys.executable, "-m", "bomstream", "loadtest",
        "--config", str(config), "--url", gw.url, *sampled,
        "--source-ips", str(SOURCE_IPS), "--connect-rate", str(connect_rate),
        "--json", str(out), "--no-progress", *auth, *args,
    ]  # fmt: skip
    proc = subprocess.run(
        cmd, capture_output=True, preexec_fn=raise_nofile, cwd=ROOT, check=False, timeout=600
    )
    if not out.exists() or out.stat().st_size == 0:
        raise RuntimeError(f"loadtest failed: {proc.stderr.decode()[-2000:]}")
    report: dict[str, Any] = json.loads(out.read_text())
    out.unlink()
    return report


def lag_buckets(gw: Gateway) -> dict[float, float] | None:
    """Cumulative bucket counts of bomstream_loop_lag_seconds (None: no such metric)."""
    with urllib.request.urlopen(f"{gw.url}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    out: dict[float, float] = {}
    for line in text.splitlines():
        if line.startswith("bomstream_loop_lag_seconds_bucket{"):
            le = line.split('le="', 1)[1].split('"', 1)[0]
            out[float(le)] = float(line.rsplit(" ", 1)[1])
    return out or None


def open_streams(gw: Gateway) -> int:
    """Streams the gateway holds; 0 while it is too busy accepting to answer."""
    try:
        with urllib.request.urlopen(f"{gw.url}/api/enrichment/health", timeout=5) as resp:
            return int(json.loads(resp.read())["streams"])
    except OSError:
        return 0


def lag_quantile(before: dict[float, float], after: dict[float, float], q: float) -> float:
    """The q-quantile of the samples between two scrapes, interpolated in its bucket."""
    bounds = sorted(after)
    counts = [after[b] - before.get(b, 0.0) for b in bounds]
    total = counts[-1]
    if total <= 0:
        return 0.0
    rank = q * total
    lower, below = 0.0, 0.0
    for bound, cum in zip(bounds, counts, strict=True):
        if cum >= rank:
            if bound == float("inf"):
                return lower
            return lower + (bound - lower) * (rank - below) / max(cum - below, 1e-9)
        lower, below = bound, cum
    return lower


def pick_auth(redis_url: str) -> tuple[str, list[str]]:
    """A minted JWT per stream when this gateway build verifies JWTs, else the admin token."""
    port = free_port()
    config = write_config(redis_url, port)
    gw = Gateway(config, port)
    try:
        probe = loadtest(
            gw, config, ["--mint-token", "--org", ORG], ["--connections", "2", "--boms", "1"]
        )
    finally:
        gw.stop()
    if probe["connections"]["established"] == 2:
        return "jwt", ["--mint-token", "--org", ORG]
    return "admin", ["--token", ADMIN_TOKEN, "--org", ORG]


def ramp(gw: Gateway, config: Path, auth: list[str], args: list[str], cpus: str) -> dict[str, Any]:
    """A loadtest at RAMP_RATE connects/s, with the loop lag sampled from before
    the first connect until every stream is open (not while they all close)."""
    before = lag_buckets(gw)
    after = None
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        running = pool.submit(loadtest, gw, config, auth, args, cpus, RAMP_RATE)
        while not running.done():
            if open_streams(gw) >= RAMP_STREAMS:
                after = lag_buckets(gw)
                break
            time.sleep(0.1)
        report = running.result()
    if before is not None and after is not None:
        report["lag_p50_ms"] = round(1000 * lag_quantile(before, after, 0.5), 1)
        report["lag_p99_ms"] = round(1000 * lag_quantile(before, after, 0.99), 1)
        report["lag_samples"] = after[float("inf")] - before.get(float("inf"), 0.0)
    return report


def summarise(scenario: str, report: dict[str, Any]) -> dict[str, Any]:
    c, p, d, lat = (
        report["connections"],
        report["publish"],
        report["deliveries"],
        report["latency_ms"],
    )
    g = report.get("gateway", {})
    row = {
        "streams": c["established"],
        "failed": sum(c["failed"].values()),
        "time_to_connect_s": c["time_to_connect_s"],
        "rss_mib": round(g.get("rss_kb_held", 0) / 1024, 1),
        "rss_kib_per_stream": g.get("rss_kb_per_stream"),
    }
    if "lag_p99_ms" in report:
        row.update({k: report[k] for k in ("lag_p50_ms", "lag_p99_ms", "lag_samples")})
    if scenario not in ("idle", "ramp"):
        row.update(
            {
                "publish_rate": p["achieved_rate"],
                "deliveries_per_s": d["per_s"],
                "expected": d["expected"],
                "lost": d["lost"],
                "duplicates": d["duplicates"],
                "out_of_order": d["out_of_order"],
                "reconnects": c["reconnects"],
                "p50_ms": lat["p50"],
                "p99_ms": lat["p99"],
                "p99_9_ms": lat["p99_9"],
                "max_ms": lat["max"],
                "gateway_cpu_s": g.get("cpu_s_publish"),
                "cpu_s_per_100k": g.get("cpu_s_per_100k_deliveries"),
                "client_cpu_s": report["client_cpu_s_publish"],
                "rss_growth_during_publish_mib": (
                    round((g["rss_kb_after_publish"] - g["rss_kb_held"]) / 1024, 1)
                    if g.get("rss_kb_after_publish") is not None
                    else None
                ),
                "slow_consumers_cut": c["slow_consumers_cut"],
            }
        )
    return row


def median_row(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in rows[0]:
        values = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
        out[key] = round(statistics.median(values), 3) if values else None
    return out


def machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        for line in subprocess.run(
            ["lscpu"], capture_output=True, text=True, check=False
        ).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    ).stdout.strip()
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "python": platform.python_version(),
        "kernel": platform.release(),
        "commit": commit,
    }


def readme_table(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [
        f"Measured {result['date']} on {m['nproc']} cores ({m['cpu_model']}), Python {m['python']},"
        f" commit `{m['commit']}`; auth: {result['auth']} per stream. Medians of"
        f" {result['repeat']} runs each (other work may share this machine, so single runs vary).",
        f"Command: `{result['command']}`",
        "",
        "| scenario | streams | events/s (achieved) | deliveries/s | lost | p50 ms | p99 ms (min-max) | RSS MiB | KiB/stream | gateway CPU s per 100k | time to connect s | loop lag p99 ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for name, runs in result["scenarios"].items():
        for label, entry in runs.items():
            r = entry["median"]

            def f(key: str, fmt: str = "{}", r: dict[str, Any] = r) -> str:
                v = r.get(key)
                return "" if v is None else fmt.format(v)

            lines.append(
                f"| {name} {label} | {f('streams', '{:.0f}')} | {f('publish_rate', '{:,.0f}')} |"
                f" {f('deliveries_per_s', '{:,.0f}')} | {f('lost', '{:.0f}')} | {f('p50_ms', '{:.1f}')} |"
                f" {p99_range(entry)} | {f('rss_mib', '{:.0f}')} | {f('rss_kib_per_stream', '{:.1f}')} |"
                f" {f('cpu_s_per_100k', '{:.2f}')} | {f('time_to_connect_s', '{:.1f}')} |"
                f" {f('lag_p99_ms', '{:.1f}')} |"
            )
    return "\n".join(lines)


def p99_range(entry: dict[str, Any]) -> str:
    """The median p99 with the spread over the repeats, which shows how much
    other work on the machine disturbed single runs."""
    values = [r["p99_ms"] for r in entry["runs"] if r.get("p99_ms") is not None]
    if not values:
        return ""
    return f"{entry['median']['p99_ms']:.1f} ({min(values):.1f}-{max(values):.1f})"


def update_readme(table: str) -> None:
    start, end = "<!-- bench:start -->", "<!-- bench:end -->"
    text = README.read_text()
    if start not in text:
        raise SystemExit("README.md has no bench markers")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    README.write_text(f"{head}{start}\n{table}\n{end}{tail}")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--only", choices=("idle", "fanout", "latency", "slow", "ramp"), action="append"
    )
    parser.add_argument(
        "--label", action="append", help="only these runs of a scenario (e.g. 100 for fanout 100)"
    )
    parser.add_argument("--out", type=Path, help="results file (default bench/results/<date>.json)")
    parser.add_argument("--readme", action="store_true", help="rewrite the table in README.md")
    parser.add_argument(
        "--client-workers",
        type=int,
        default=1,
        metavar="N",
        help=f"load client processes (loadtest --workers) for {', '.join(MULTI_CLIENT)}",
    )
    parser.add_argument(
        "--client-cpus",
        default=LOAD_CORE,
        metavar="LIST",
        help=f"CPUs for the load client and its workers (taskset -c; default {LOAD_CORE})",
    )
    args = parser.parse_args()
    if args.client_workers < 1:
        raise SystemExit("bench: --client-workers must be at least 1")
    if shutil.which("taskset") is None:
        raise SystemExit("bench: taskset is required (util-linux)")
    raise_nofile()
    scenarios = {"idle": IDLE, "fanout": FANOUT, "latency": LATENCY, "slow": SLOW, "ramp": RAMP}
    chosen = args.only or list(scenarios)
    now = dt.datetime.now(dt.UTC)
    result: dict[str, Any] = {
        "date": now.strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python " + " ".join(["bench/run.py", *sys.argv[1:]]),
        "machine": machine(),
        "repeat": args.repeat,
        "client_workers": args.client_workers,
        "client_cpus": args.client_cpus,
        "scenarios": {},
    }
    with redis_server() as redis_url:
        auth_name, auth = pick_auth(redis_url)
        result["auth"] = auth_name
        print(f"bench: auth per stream = {auth_name}", flush=True)
        for name in chosen:
            result["scenarios"][name] = {}
            workers = args.client_workers if name in MULTI_CLIENT else 1
            for label, scenario_args in scenarios[name]:
                if args.label and str(label) not in args.label:
                    continue
                lt_args = [*scenario_args, "--workers", str(workers)]
                rows, reports = [], []
                for i in range(args.repeat):
                    port = free_port()
                    config = write_config(redis_url, port)
                    gw = Gateway(config, port)
                    try:
                        if name == "ramp":
                            report = ramp(gw, config, auth, lt_args, args.client_cpus)
                        else:
                            report = loadtest(gw, config, auth, lt_args, args.client_cpus)
                    finally:
                        gw.stop()
                        config.unlink()
                    row = summarise(name, report)
                    rows.append(row)
                    reports.append(report)
                    print(f"bench: {name} {label} run {i + 1}: {json.dumps(row)}", flush=True)
                result["scenarios"][name][str(label)] = {
                    "median": median_row(rows),
                    "runs": rows,
                    "reports": reports,
                }
    out = args.out or RESULTS / f"{now.strftime('%Y-%m-%d')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    table = readme_table(result)
    print(table)
    if args.readme:
        update_readme(table)
    print(f"bench: results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
