"""Multi-BOM streams behind the shipped nginx.conf, two gateway processes on
one redis-server: a client whose instance goes away resumes on the other with
its last id and gets every event of every BOM exactly once, in order."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from urllib.parse import urlencode

import aiohttp

from tests.authkit import ADMIN
from tests.conftest import progress
from tests.multi_kit import STREAM, connected
from tests.nginx_stack import nginx_stack
from tests.redis_proc import RedisProcess
from tests.sse import SSEStream
from tests.waiting import eventually

BOMS = [f"bom-{i}" for i in range(10)]
EVENTS = 60  # per BOM
CLIENTS = 10


@dataclass
class MultiFollower:
    """An EventSource on a multi-BOM URL: reconnects with the last id until
    every BOM has sent its terminal event."""

    url: str
    events: dict[str, list[str]] = field(default_factory=dict)
    connects: list[bool] = field(default_factory=list)
    gaps: list[list[str]] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)

    async def run(self, http: aiohttp.ClientSession, boms: int, max_connects: int = 80) -> None:
        # nginx skips an instance for fail_timeout (5 s) after a failed connect, so
        # while the second restart runs it may answer 502 for a while: retry, as
        # EventSource would, every 0.1 s.
        last_id: str | None = None
        done: set[str] = set()
        for _ in range(max_connects):
            headers = {"Authorization": f"Bearer {ADMIN}"}
            if last_id is not None:
                headers["Last-Event-ID"] = last_id
            try:
                async with http.get(self.url, headers=headers) as resp:
                    self.statuses.append(resp.status)
                    if resp.status != 200:
                        raise aiohttp.ClientError(f"status {resp.status}")
                    s = SSEStream(resp)
                    hello = await connected(s)
                    self.connects.append(hello["resumed"])
                    self.gaps.append(hello["gaps"])
                    while (frame := await s.next_event(timeout=5)) is not None:
                        if frame.event == "stream_end":
                            # Only for the connection: here, an instance shutting down.
                            assert frame.json()["reason"] == "server_shutdown", frame.data
                            break
                        data = json.loads(frame.data)
                        self.events.setdefault(data["bom_id"], []).append(data["event_id"])
                        last_id = frame.id
                        if frame.event == "enrichment.completed":
                            done.add(data["bom_id"])
                            if len(done) == boms:
                                return
            except (aiohttp.ClientError, TimeoutError):
                pass  # the instance went away mid-stream: reconnect
            await asyncio.sleep(0.1)
        raise AssertionError(f"unfinished after {max_connects} connections: {self.statuses}")


async def test_two_instances_restarted_in_turn_every_bom_arrives_once_in_order(
    redis_server: RedisProcess,
) -> None:
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http,
        nginx_stack(redis_server, http, admin=ADMIN, grace_s=5.0) as stack,
    ):
        url = stack.url + STREAM + "?" + urlencode([("bom_id", b) for b in BOMS])
        followers = [MultiFollower(url) for _ in range(CLIENTS)]
        tasks = [asyncio.create_task(f.run(http, len(BOMS))) for f in followers]
        try:
            await eventually(lambda: stack.serving(http), lambda c: sum(c) == CLIENTS, timeout=10)
            restarts = {EVENTS // 3: 0, 2 * EVENTS // 3: 1}
            for n in range(1, EVENTS + 1):
                for b in BOMS:
                    stack.publish(b, progress(b, n, total=EVENTS))
                if n in restarts:
                    await stack.restart(restarts[n], http)
                else:
                    await asyncio.sleep(0.02)
            for b in BOMS:
                stack.publish(b, {"event_id": f"{b}-done", "event_type": "enrichment.completed"})
            await asyncio.wait_for(asyncio.gather(*tasks), 60)
        finally:
            for task in tasks:
                task.cancel()
    expected = {b: [f"{b}-e{n}" for n in range(1, EVENTS + 1)] + [f"{b}-done"] for b in BOMS}
    moved = 0
    for f in followers:
        assert f.events == expected
        assert f.connects[0] is False
        assert all(f.connects[1:]), (f.connects, f.gaps)
        moved += len(f.connects) - 1
    assert moved >= CLIENTS, moved


async def test_a_hundred_long_bom_ids_pass_through_nginx(redis_server: RedisProcess) -> None:
    boms = [f"{i:03d}" + "y" * 125 for i in range(100)]
    async with (
        aiohttp.ClientSession() as http,
        nginx_stack(redis_server, http, admin=ADMIN, grace_s=1.0) as stack,
    ):
        url = stack.url + STREAM + "?" + urlencode([("bom_id", b) for b in boms])
        assert len(url) > 13_000
        async with http.get(url, headers={"Authorization": f"Bearer {ADMIN}"}) as resp:
            assert resp.status == 200, await resp.text()
            s = SSEStream(resp)
            assert (await connected(s))["bom_ids"] == boms
            stack.publish(boms[99], progress(boms[99], 1))
            frame = await s.next_event(timeout=5)
            assert frame is not None and json.loads(frame.data)["bom_id"] == boms[99]
