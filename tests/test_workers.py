"""``bomstream serve --workers N``: real supervisor and worker processes on one
port, a real redis-server, real connections."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from typing import Any

import aiohttp
import pytest

from tests.cli_proc import cli_env, run_cli
from tests.conftest import progress
from tests.gateway_proc import GatewayProcess, is_worker
from tests.redis_proc import RedisProcess
from tests.sse import Frame
from tests.waiting import eventually
from tests.worker_probe import (
    CUT,
    GRACE_S,
    START_S,
    every_worker_healthy,
    fresh_health,
    health_by_pid,
    next_or_cut,
    streams_on_every_worker,
    supervised,
    two_workers_running,
)


@pytest.fixture
async def two_workers(
    redis_server: RedisProcess, http: aiohttp.ClientSession
) -> AsyncIterator[GatewayProcess]:
    async with two_workers_running(redis_server, http) as gw:
        yield gw


def log_lines(gw: GatewayProcess, msg: str) -> list[dict[str, Any]]:
    return [line for line in gw.json_log() if line["msg"] == msg]


def publish(redis: RedisProcess, bom_id: str, n: int) -> None:
    redis.publish(f"enrichment:{bom_id}", json.dumps(progress(bom_id, n)))


def parent_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as fh:
        return int(fh.read().rsplit(")", 1)[1].split()[1])


async def test_two_workers_answer_on_one_port(two_workers: GatewayProcess) -> None:
    gw = two_workers
    assert gw.proc is not None
    by_pid = await health_by_pid(gw.url, 2)
    assert sorted(h["worker"] for h in by_pid.values()) == [0, 1]
    for pid in by_pid:
        assert pid != gw.proc.pid
        assert parent_of(pid) == gw.proc.pid
    listening = log_lines(gw, "bomstream listening")
    assert len(listening) == 1
    assert listening[0]["url"] == gw.url
    assert listening[0]["workers"] == 2
    assert listening[0]["logger"] == "bomstream.supervisor"
    started = {line["worker"]: line["pid"] for line in log_lines(gw, "worker started")}
    assert started == {h["worker"]: pid for pid, h in by_pid.items()}
    # Every line a worker writes says which worker wrote it.
    subscribed = log_lines(gw, "redis feed subscribed")
    assert sorted(line["worker"] for line in subscribed) == [0, 1]


async def test_streams_on_every_worker_get_the_events_published_to_redis(
    two_workers: GatewayProcess, redis_server: RedisProcess, http: aiohttp.ClientSession
) -> None:
    async with AsyncExitStack() as stack:
        streams, by_pid = await streams_on_every_worker(stack, http, two_workers.url, "bom-w", 2)
        print("streams per worker:", {h["worker"]: h["streams"] for h in by_pid.values()})
        for n in (1, 2, 3):
            publish(redis_server, "bom-w", n)
        for s in streams:
            assert [(await s.next_event()).id for _ in range(3)] == [
                "bom-w-e1",
                "bom-w-e2",
                "bom-w-e3",
            ]


async def test_a_killed_worker_is_replaced_and_the_other_workers_streams_carry_on(
    two_workers: GatewayProcess, redis_server: RedisProcess, http: aiohttp.ClientSession
) -> None:
    gw = two_workers
    async with AsyncExitStack() as stack:
        streams, by_pid = await streams_on_every_worker(stack, http, gw.url, "bom-k", 2)
        victim_pid, victim = next(iter(by_pid.items()))
        survivor = next(h for pid, h in by_pid.items() if pid != victim_pid)
        os.kill(victim_pid, signal.SIGKILL)

        async def exits() -> list[dict[str, Any]]:
            return log_lines(gw, "worker exited; restarting")

        [exited] = await eventually(exits, bool, timeout=START_S)
        assert exited["worker"] == victim["worker"]
        assert exited["pid"] == victim_pid
        assert exited["signal"] == "SIGKILL"
        assert exited["restart_in_s"] <= 10

        # The victim's streams were cut; every other stream still gets events.
        publish(redis_server, "bom-k", 1)
        first = await asyncio.gather(*(next_or_cut(s, timeout=10) for s in streams))
        cut = [s for s, f in zip(streams, first, strict=True) if f == CUT]
        alive = [s for s, f in zip(streams, first, strict=True) if f != CUT]
        assert len(cut) == victim["streams"]
        assert len(alive) == survivor["streams"]
        assert {f.id for f in first if isinstance(f, Frame)} == {"bom-k-e1"}

        # A new process takes the victim's place on the same port.
        async def replacement() -> dict[str, Any]:
            return await fresh_health(gw.url)

        new = await eventually(
            replacement,
            lambda h: h["worker"] == victim["worker"] and h["pid"] != victim_pid,
            timeout=START_S,
        )
        assert is_worker(new["pid"])
        assert new["pid"] == gw.started_worker_pids()[-1]
        await every_worker_healthy(gw.url, 2)
        publish(redis_server, "bom-k", 2)
        for s in alive:
            frame = await s.next_event(timeout=10)
            assert frame is not None and frame.id == "bom-k-e2"


async def test_a_worker_that_keeps_dying_is_restarted_later_each_time(
    two_workers: GatewayProcess,
) -> None:
    gw = two_workers

    async def worker0_pids() -> list[int]:
        return [line["pid"] for line in log_lines(gw, "worker started") if line["worker"] == 0]

    async def listening(pid: int) -> None:
        # The first start is in "bomstream listening"; restarts log their own line.
        async def lines() -> list[dict[str, Any]]:
            return [line for line in log_lines(gw, "worker listening") if line["pid"] == pid]

        await eventually(lines, bool, timeout=START_S)

    pids = await worker0_pids()
    for round_ in range(3):
        if round_:
            await listening(pids[-1])
        os.kill(pids[-1], signal.SIGKILL)
        before = len(pids)
        pids = await eventually(worker0_pids, lambda p: len(p) > before, timeout=START_S)  # noqa: B023
    delays = [line["restart_in_s"] for line in log_lines(gw, "worker exited; restarting")]
    assert delays == [0.5, 1.0, 2.0]
    assert len(set(pids)) == 4


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_a_signal_to_the_supervisor_drains_every_worker_and_exits_0(
    redis_server: RedisProcess, http: aiohttp.ClientSession, sig: signal.Signals
) -> None:
    gw = supervised(redis_server)
    try:
        await gw.start(http, timeout=START_S)
        await every_worker_healthy(gw.url, 2)
        async with AsyncExitStack() as stack:
            streams, by_pid = await streams_on_every_worker(stack, http, gw.url, "bom-t", 2)
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            gw.signal(sig)
            ends = await asyncio.gather(*(s.events_until_end(timeout=GRACE_S) for s in streams))
            rc = await gw.wait(timeout=GRACE_S + 10)
            elapsed = loop.time() - t0
        print(f"{sig.name}, {len(streams)} streams on 2 workers: exit {rc} after {elapsed:.3f}s")
        assert rc == 0
        assert elapsed < GRACE_S, f"took {elapsed:.2f}s, grace is {GRACE_S}s"
        for frames in ends:
            assert [(f.event, f.json()) for f in frames] == [
                ("stream_end", {"type": "stream_end", "reason": "server_shutdown"})
            ]
        ended = {line["worker"]: line["streams_ended"] for line in log_lines(gw, "shutting down")}
        assert ended == {h["worker"]: h["streams"] for h in by_pid.values()}
        exits = {line["worker"]: line.get("exit_code") for line in log_lines(gw, "worker exited")}
        assert exits == {0: 0, 1: 0}
        [stopping] = log_lines(gw, "stopping workers")
        assert stopping["signal"] == sig.name
        last = gw.json_log()[-1]
        assert (last["logger"], last["msg"]) == ("bomstream.supervisor", "bomstream stopped")
        assert list(gw.dir.glob("bomstream-metrics-*")) == []
        assert not any(is_worker(pid) for pid in by_pid)
    finally:
        gw.close()


async def test_workers_shut_down_when_the_supervisor_is_killed(
    redis_server: RedisProcess, http: aiohttp.ClientSession
) -> None:
    gw = supervised(redis_server)
    try:
        await gw.start(http, timeout=START_S)
        await every_worker_healthy(gw.url, 2)
        async with AsyncExitStack() as stack:
            streams, by_pid = await streams_on_every_worker(stack, http, gw.url, "bom-o", 2)
            gw.kill()  # SIGKILL: the supervisor gets no say
            ends = await asyncio.gather(*(s.events_until_end(timeout=GRACE_S) for s in streams))
        for frames in ends:
            assert [f.json()["reason"] for f in frames] == ["server_shutdown"]

        async def alive() -> list[int]:
            return [pid for pid in by_pid if is_worker(pid)]

        await eventually(alive, lambda pids: pids == [], timeout=GRACE_S + 5)
        gone = [line["worker"] for line in log_lines(gw, "supervisor gone; shutting down")]
        assert sorted(gone) == [0, 1]
        # Nobody was left to remove the metrics directory (close() does).
        assert [p.name[:18] for p in gw.dir.glob("bomstream-metrics-*")] == ["bomstream-metrics-"]
    finally:
        gw.close()


async def test_a_second_supervisor_on_a_taken_port_is_refused(
    two_workers: GatewayProcess, redis_server: RedisProcess
) -> None:
    """SO_REUSEPORT would let it join the first one's workers unnoticed."""
    second = supervised(redis_server, "--port", str(two_workers.port))
    try:
        second.spawn()
        assert await second.wait(timeout=START_S) == 1
        lines = [ln for ln in second.log_text().splitlines() if ln.startswith("bomstream:")]
        assert lines == [
            f"bomstream: cannot listen on 127.0.0.1:{two_workers.port}: Address already in use"
        ]
        assert second.started_worker_pids() == []
    finally:
        second.close()


async def test_one_worker_serves_in_a_single_process(
    redis_server: RedisProcess, http: aiohttp.ClientSession
) -> None:
    gw = GatewayProcess("--workers", "1", "--log-format", "json", redis_url=redis_server.url)
    try:
        await gw.start(http, timeout=START_S)
        assert gw.proc is not None
        health = await gw.health(http)
        assert (health["worker"], health["pid"]) == (None, gw.proc.pid)
        [listening] = log_lines(gw, "bomstream listening")
        assert listening["logger"] == "bomstream.server"
        assert gw.started_worker_pids() == []
    finally:
        gw.stop()
        gw.close()


@pytest.mark.parametrize("cpus", [1, 2])
async def test_workers_0_starts_one_per_cpu_the_process_may_use(
    redis_server: RedisProcess, http: aiohttp.ClientSession, cpus: int
) -> None:
    available = sorted(os.sched_getaffinity(0))
    if len(available) < cpus:
        pytest.skip(f"only {len(available)} CPU available")
    gw = GatewayProcess("--log-format", "json", redis_url=redis_server.url, server_workers=0)
    # taskset narrows the affinity mask of the gateway, as a cpuset would.
    gw.args = ["taskset", "-c", ",".join(map(str, available[:cpus])), *gw.args]
    try:
        await gw.start(http, timeout=START_S)
        assert gw.proc is not None
        by_pid = await health_by_pid(gw.url, cpus)
        if cpus == 1:
            assert list(by_pid) == [gw.proc.pid]
            assert gw.started_worker_pids() == []
        else:
            assert sorted(h["worker"] for h in by_pid.values()) == list(range(cpus))
            [listening] = log_lines(gw, "bomstream listening")
            assert listening["workers"] == cpus
    finally:
        gw.stop()
        gw.close()


@pytest.mark.parametrize(
    ("args", "env", "needle"),
    [
        (["--workers", "2"], {}, "server.workers: 2 needs redis.url"),
        ([], {"BOMSTREAM_SERVER_WORKERS": "0"}, "server.workers: 0 (one per CPU) needs redis.url"),
        (["--workers", "-1"], {}, "server.workers: must be 0 (one per CPU) or more"),
    ],
)
def test_bad_worker_counts_stop_start_up_with_one_line(
    args: list[str], env: dict[str, str], needle: str
) -> None:
    out = run_cli("serve", "--port", "0", *args, env=cli_env(**env))
    assert out.returncode == 2, out.stderr
    assert out.stdout == ""
    lines = out.stderr.splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith(f"bomstream: config error: {needle}")
