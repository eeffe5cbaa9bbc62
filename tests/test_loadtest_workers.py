"""``bomstream loadtest --workers N``: the streams spread over worker processes,
against the crafted server whose faults are known and against a real gateway
fed by a real redis-server."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from bomstream.cli import main as cli_main
from bomstream.loadtest.options import LoadOptions
from bomstream.loadtest.run import run_load
from tests.gateway_proc import GatewayProcess
from tests.redis_proc import RedisProcess
from tests.test_loadtest_runs import CUT_AFTER, CraftedServer, redis_gateway, run_cli

__all__ = ["redis_gateway"]  # the fixture, shared with test_loadtest_runs

COUNTED = (
    "expected",
    "received",
    "lost",
    "duplicates",
    "out_of_order",
    "streams_with_loss",
    "misrouted",
    "foreign",
)


async def crafted_run(workers: int) -> tuple[dict[str, Any], CraftedServer]:
    server = CraftedServer()
    await server.start()
    try:
        opts = LoadOptions(
            url=server.url,
            connections=6,
            boms=2,
            source_ips=2,
            rate=40,
            duration=1.0,
            drain_s=3.0,
            publish_via="http",
            progress=False,
            workers=workers,
        )
        report = (await run_load(opts)).data
    finally:
        await server.stop()
    return report, server


def parts_of(report: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in report["client_processes"] if p["role"] == "streams"]


def assert_totals_are_the_sum_of_the_parts(report: dict[str, Any], workers: int) -> None:
    parts = parts_of(report)
    assert len(parts) == workers
    roles = [p["role"] for p in report["client_processes"]]
    assert roles == ["publisher"] + ["streams"] * workers
    counts = [p["counts"] for p in parts]
    d, c = report["deliveries"], report["connections"]
    for key in COUNTED:
        assert d[key] == sum(part[key] for part in counts), key
    assert c["established"] == sum(part["established"] for part in counts)
    assert c["reconnects"] == sum(part["reconnects"] for part in counts)
    assert report["bytes_received"] == sum(part["bytes"] for part in counts)
    assert report["keepalives"] == sum(part["keepalives"] for part in counts)
    assert sum(p["streams"] for p in parts) == c["target"]
    buckets: Counter[str] = Counter()
    for part in counts:
        buckets.update(part["latency"]["buckets_us"])
    merged = report["latency_us_histogram"]
    assert dict(buckets) == merged["buckets_us"]
    assert merged["count"] == sum(part["latency"]["count"] for part in counts)
    assert merged["count"] == report["latency_ms"]["samples"]
    assert merged["max_us"] == max(part["latency"]["max_us"] for part in counts)


async def test_worker_processes_count_exactly_what_one_process_counts() -> None:
    single, _ = await crafted_run(1)
    streams, per_bom = 6, 20
    # The crafted faults, once per stream (see CraftedServer).
    assert single["deliveries"]["lost"] == streams
    assert single["deliveries"]["duplicates"] == streams
    assert single["deliveries"]["out_of_order"] == streams
    assert single["deliveries"]["expected"] == streams * per_bom
    assert single["connections"]["reconnects"] == 3
    assert [p["role"] for p in single["client_processes"]] == ["streams+publisher"]
    for workers in (2, 3):
        report, server = await crafted_run(workers)
        for key in COUNTED:
            assert report["deliveries"][key] == single["deliveries"][key], (workers, key)
        for key in ("established", "reconnects", "failed", "stream_end_reasons"):
            assert report["connections"][key] == single["connections"][key], (workers, key)
        assert report["latency_ms"]["samples"] == single["latency_ms"]["samples"]
        assert report["bytes_received"] == single["bytes_received"]
        assert report["publish"]["sent"] == single["publish"]["sent"]
        # Each client of the cut BOM resumed from the last event it had seen,
        # whichever process it lived in.
        assert len(server.resumed_from) == 3
        assert all(eid.split("-")[2] == str(CUT_AFTER) for eid in server.resumed_from)
        assert_totals_are_the_sum_of_the_parts(report, workers)


def test_two_workers_against_a_real_gateway_lose_nothing_and_add_up(
    redis_gateway: tuple[GatewayProcess, RedisProcess], tmp_path: Path
) -> None:
    gw, redis = redis_gateway
    assert gw.proc is not None
    args = [
        "--url", gw.url,
        "--connections", "60",
        "--boms", "6",
        "--source-ips", "3",
        "--rate", "120",
        "--duration", "1",
        "--token", "admin-secret",
        "--redis", redis.url,
        "--gateway-pid", str(gw.proc.pid),
        "--workers", "2",
    ]  # fmt: skip
    try:
        report = run_cli(args, tmp_path, "workers")
    finally:
        gw.stop()
    conns, pub, d = report["connections"], report["publish"], report["deliveries"]
    assert isinstance(conns, dict) and isinstance(pub, dict) and isinstance(d, dict)
    assert conns["established"] == 60
    assert conns["failed"] == {}
    assert pub["sent"] == 120
    assert d["expected"] == 60 * 20
    assert d["received"] == d["expected"]
    assert (d["lost"], d["duplicates"], d["out_of_order"], d["misrouted"]) == (0, 0, 0, 0)
    assert_totals_are_the_sum_of_the_parts(report, 2)
    processes = report["client_processes"]
    assert isinstance(processes, list)
    assert [p["streams"] for p in processes] == [0, 30, 30]
    assert len({p["pid"] for p in processes}) == 3
    for p in processes:
        assert p["wall_s"] > 0
        assert p["cpu_share"] == pytest.approx(p["cpu_s"] / p["wall_s"], abs=0.002)


class LineReader(threading.Thread):
    """Reads a pipe line by line, so a test can wait for a line with a bound."""

    def __init__(self, pipe: Any) -> None:
        super().__init__(daemon=True)
        self.pipe = pipe
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []

    def run(self) -> None:
        for raw in self.pipe:
            line = raw.decode(errors="replace")
            self.seen.append(line)
            self.lines.put(line)

    def wait_for(self, *needles: str, within_s: float = 60.0) -> str:
        deadline = time.monotonic() + within_s
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                break
            if all(n in line for n in needles):
                return line
        raise AssertionError(f"no line with {needles} in: {''.join(self.seen)[-2000:]}")


def children_of(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        if int(text[text.rindex(")") + 2 :].split()[1]) == pid:
            found.append(int(stat.parent.name))
    return sorted(found)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def start_holding_run(gw: GatewayProcess) -> tuple[subprocess.Popen[bytes], LineReader, list[int]]:
    """A two-worker run that holds its 40 streams open for a minute."""
    args = [
        sys.executable, "-m", "bomstream", "loadtest", "--url", gw.url,
        "--connections", "40", "--boms", "4", "--token", "admin-secret",
        "--hold", "60", "--workers", "2",
    ]  # fmt: skip
    proc = subprocess.Popen(
        args,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        # A shell may start background jobs with SIGINT ignored; Ctrl-C needs it.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    assert proc.stderr is not None
    reader = LineReader(proc.stderr)
    reader.start()
    reader.wait_for("hold]", "open 40/40")
    workers = children_of(proc.pid)
    assert len(workers) == 2
    return proc, reader, workers


def finish(proc: subprocess.Popen[bytes], reader: LineReader) -> tuple[int, str, bytes]:
    assert proc.stdout is not None
    out = proc.stdout.read()
    code = proc.wait(timeout=60)
    reader.join(timeout=10)
    return code, "".join(reader.seen), out


def reap(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is None:
        return
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    for pipe in (proc.stdout, proc.stderr):
        if pipe is not None:
            pipe.close()


def test_a_worker_that_dies_fails_the_run_and_the_others_are_stopped(
    redis_gateway: tuple[GatewayProcess, RedisProcess],
) -> None:
    gw, _ = redis_gateway
    proc: subprocess.Popen[bytes] | None = None
    try:
        proc, reader, workers = start_holding_run(gw)
        os.kill(workers[0], signal.SIGKILL)
        code, err, out = finish(proc, reader)
    finally:
        reap(proc)
        gw.stop()
    assert code == 1, err
    assert f"load worker 1 of 2 (pid {workers[0]}) was killed by SIGKILL during hold" in err
    assert b"deliveries" not in out
    assert [w for w in workers if alive(w)] == []


def test_ctrl_c_stops_the_run_and_every_worker(
    redis_gateway: tuple[GatewayProcess, RedisProcess],
) -> None:
    gw, _ = redis_gateway
    proc: subprocess.Popen[bytes] | None = None
    try:
        proc, reader, workers = start_holding_run(gw)
        proc.send_signal(signal.SIGINT)
        code, err, out = finish(proc, reader)
    finally:
        reap(proc)
        gw.stop()
    assert code == 130, err
    assert "interrupted" in err
    assert "Traceback" not in err
    assert b"deliveries" not in out
    assert [w for w in workers if alive(w)] == []


@pytest.mark.parametrize("workers", ["0", "5"])
def test_workers_outside_one_to_connections_are_refused(
    workers: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["loadtest", "--url", "http://127.0.0.1:9", "--connections", "4", "--workers", workers]
    assert cli_main(argv) == 2
    assert "--workers must be between 1 and --connections" in capsys.readouterr().err
