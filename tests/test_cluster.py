"""Redis Cluster (spec section 10, ``redis.cluster = true``) on a real cluster
of redis-server processes: sharded pub/sub to streams, history kept in the
channel's own slot, and nothing lost or doubled while a node restarts or a
primary is failed over."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import pytest
import redis

from bomstream.publisher import AsyncPublisher, Publisher
from tests.cli_proc import cli_env, run_cli
from tests.conftest import publish
from tests.gateway_proc import GatewayProcess
from tests.interest_kit import ADMIN, AUTH, check_stream, event, read_all
from tests.metrics_scrape import scrape, value
from tests.redis_cluster import ClusterNode, RedisClusterProcesses
from tests.sse import SSEStream
from tests.waiting import eventually

GRACE_S = 0.5


@pytest.fixture
def cluster() -> Iterator[RedisClusterProcesses]:
    c = RedisClusterProcesses(primaries=3)
    try:
        c.start()
        yield c
    finally:
        c.close()


@pytest.fixture
def replicated() -> Iterator[RedisClusterProcesses]:
    c = RedisClusterProcesses(primaries=3, replicas=1)
    try:
        c.start()
        yield c
    finally:
        c.close()


@pytest.fixture
async def gateways() -> AsyncIterator[list[GatewayProcess]]:
    made: list[GatewayProcess] = []
    yield made
    for g in made:
        g.close()


@pytest.fixture
async def tasks() -> AsyncIterator[list[asyncio.Task[object]]]:
    """Tasks a test starts; whatever is left when it ends (a failure) is cancelled."""
    made: list[asyncio.Task[object]] = []
    yield made
    for t in made:
        t.cancel()
    await asyncio.gather(*made, return_exceptions=True)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0),
        timeout=aiohttp.ClientTimeout(total=None, sock_read=60),
    ) as s:
        yield s


async def started(
    made: list[GatewayProcess],
    c: RedisClusterProcesses,
    http: aiohttp.ClientSession,
    **settings: object,
) -> GatewayProcess:
    base: dict[str, object] = {
        "redis_url": c.url,
        "redis_cluster": "true",
        "redis_unsubscribe_grace_s": GRACE_S,
        "auth_admin_token": ADMIN,
        "server_heartbeat_s": 0.5,
        "redis_backoff_initial_s": 0.05,
        "redis_backoff_max_s": 0.5,
    }
    base.update(settings)
    g = GatewayProcess(**base)  # type: ignore[arg-type]
    made.append(g)
    await g.start(http)
    return g


def boms_on(c: RedisClusterProcesses, node: ClusterNode, count: int, tag: str) -> list[str]:
    out = []
    i = 0
    while len(out) < count:
        bom = f"{tag}-{i}"
        if c.owner(f"enrichment:{bom}") is node:
            out.append(bom)
        i += 1
    return out


def primaries(c: RedisClusterProcesses) -> list[ClusterNode]:
    return sorted({c.owner(f"enrichment:probe-{i}") for i in range(64)}, key=lambda n: n.port)


def shard_subscribers(node: ClusterNode, bom_id: str) -> int:
    reply = node.command("PUBSUB", "SHARDNUMSUB", f"enrichment:{bom_id}")
    assert isinstance(reply, list)
    return int(reply[1])


class Publishing:
    """A worker publishing through bomstream.publisher (cluster client) in a
    loop, retrying an event with the same event_id while its node is away."""

    def __init__(self, pub: AsyncPublisher, boms: list[str], events: int) -> None:
        self.pub = pub
        self.boms = boms
        self.events = events
        self.sent: dict[str, list[str]] = {b: [] for b in boms}
        self.retries = 0
        self.done = 0

    async def _one(self, bom: str, body: dict[str, object]) -> None:
        while True:
            try:
                await self.pub.publish(bom, body)
                self.sent[bom].append(str(body["event_id"]))
                return
            except (redis.RedisError, redis.exceptions.RedisClusterException, OSError):
                self.retries += 1
                await asyncio.sleep(0.05)

    async def run(self) -> None:
        for n in range(1, self.events + 1):
            for bom in self.boms:
                await self._one(bom, event(bom, n))
            self.done = n
            await asyncio.sleep(0.005)
        for bom in self.boms:
            await self._one(bom, event(bom, 0, terminal=True))

    async def reached(self, n: int) -> None:
        await eventually(lambda: asyncio.sleep(0), lambda _: self.done >= n, timeout=60)


async def test_events_reach_streams_through_sharded_pub_sub_and_history_is_in_the_channels_slot(
    cluster: RedisClusterProcesses, gateways: list[GatewayProcess], http: aiohttp.ClientSession
) -> None:
    nodes = primaries(cluster)
    assert len(nodes) == 3
    boms = [b for node in nodes for b in boms_on(cluster, node, 2, f"sh{node.port}")]
    g = await started(gateways, cluster, http)
    async with contextlib.AsyncExitStack() as stack:
        streams: dict[str, SSEStream] = {}
        for bom in boms:
            resp = await stack.enter_async_context(
                http.get(f"{g.url}/api/enrichment/stream/{bom}", headers=AUTH)
            )
            assert resp.status == 200, await resp.text()
            streams[bom] = SSEStream(resp)
            assert (await streams[bom].next_event()).event == "connected"  # type: ignore[union-attr]
        for bom in boms:
            assert shard_subscribers(cluster.owner(f"enrichment:{bom}"), bom) == 1
        with Publisher(cluster.url, cluster=True) as pub:
            for bom in boms:
                # Through the gateway's publish endpoint, then through the publisher.
                await publish(http, g.url, bom, event(bom, 1), token=ADMIN)
                sent = pub.publish(bom, event(bom, 2))
                assert sent.receivers == 1 and not sent.duplicate
                assert pub.publish(bom, event(bom, 2)).duplicate
        env = cli_env(BOMSTREAM_REDIS_URL=cluster.url, BOMSTREAM_REDIS_CLUSTER="true")
        out = run_cli(
            "publish", boms[0], "enrichment.progress", "--event-id", f"{boms[0]}-e3", env=env
        )
        assert out.returncode == 0, out.stderr
        for bom in boms:
            got = [(await streams[bom].next_event()).id for _ in range(2)]  # type: ignore[union-attr]
            assert got == [f"{bom}-e1", f"{bom}-e2"]
        assert (await streams[boms[0]].next_event()).id == f"{boms[0]}-e3"  # type: ignore[union-attr]
    for bom in boms:
        owner = cluster.owner(f"enrichment:{bom}")
        key = f"enrichment-history:{{enrichment:{bom}}}"
        assert cluster.slot(key) == cluster.slot(f"enrichment:{bom}")
        assert cluster.keys_on(owner, f"*{bom}}}*") == [key, key + ":ids"]
        client = owner.client()
        try:
            stored = [f[b"i"].decode() for _, f in client.xrange(key)]
        finally:
            client.close()
        assert stored[:2] == [f"{bom}-e1", f"{bom}-e2"]
    samples = await scrape(http, g.url)
    for node in nodes:
        assert value(samples, "bomstream_redis_shard_connected", node=node.name) == 1
    # One SSUBSCRIBE per slot: the six BOMs' subscriptions cannot share a command.
    assert value(samples, "bomstream_redis_subscription_commands_total", command="ssubscribe") == 6
    # A fresh instance resumes from the cluster's history.
    other = await started(gateways, cluster, http)
    resumed, frames = await read_first(http, other.url, boms[1], f"{boms[1]}-e1")
    assert resumed is True and [f.id for f in frames] == [f"{boms[1]}-e2"]
    # A stream ticket issued by one instance is redeemed at the other, once.
    async with http.post(
        f"{g.url}/api/enrichment/tickets", json={"bom_id": boms[2]}, headers=AUTH
    ) as resp:
        assert resp.status == 201, await resp.text()
        ticket = (await resp.json())["ticket"]
    url = f"{other.url}/api/enrichment/stream/{boms[2]}?ticket={ticket}"
    async with http.get(url) as resp:
        assert resp.status == 200
        assert (await SSEStream(resp).next_event()).event == "connected"  # type: ignore[union-attr]
    async with http.get(url) as resp:
        assert resp.status == 401
    # SIGTERM stops a cluster-mode gateway cleanly, and nothing connects again
    # once shutdown has begun.
    other.signal(signal.SIGTERM)
    assert await other.wait(15) == 0
    assert "connected" not in other.log_text().split("shutting down", 1)[1]
    await eventually(
        lambda: asyncio.to_thread(
            lambda: sum(shard_subscribers(cluster.owner(f"enrichment:{b}"), b) for b in boms)
        ),
        lambda n: n == 0,
        timeout=10,
    )


async def read_first(
    http: aiohttp.ClientSession, base: str, bom_id: str, last_event_id: str
) -> tuple[bool, list[object]]:
    headers = {**AUTH, "Last-Event-ID": last_event_id}
    async with http.get(f"{base}/api/enrichment/stream/{bom_id}", headers=headers) as resp:
        assert resp.status == 200, await resp.text()
        s = SSEStream(resp)
        connected = await s.next_event()
        assert connected is not None
        return connected.json()["resumed"], [await s.next_event()]


async def test_a_stream_loses_nothing_while_the_node_owning_its_bom_restarts(
    cluster: RedisClusterProcesses,
    gateways: list[GatewayProcess],
    http: aiohttp.ClientSession,
    tasks: list[asyncio.Task[object]],
) -> None:
    victim, *others = primaries(cluster)
    hit = boms_on(cluster, victim, 2, "down")
    spared = boms_on(cluster, others[0], 1, "up")
    # The gateway comes back to the node seconds after the publisher does,
    # so what is published in between reaches it only through history.
    g = await started(gateways, cluster, http, redis_backoff_initial_s=4, redis_backoff_max_s=5)
    readers = {b: asyncio.create_task(read_all(http, g.url, b)) for b in hit + spared}
    tasks.extend(readers.values())
    await eventually(
        lambda: scrape(http, g.url),
        lambda s: value(s, "bomstream_redis_subscribed_channels") == 3,
        timeout=10,
    )
    async with AsyncPublisher(cluster.url, cluster=True) as pub:
        run = Publishing(pub, hit + spared, 150)
        publishing = asyncio.create_task(run.run())
        tasks.append(publishing)
        await run.reached(30)
        victim.kill()
        await eventually(
            lambda: scrape(http, g.url),
            lambda s: value(s, "bomstream_redis_shard_connected", node=victim.name) == 0,
            timeout=10,
        )
        # While it is down, a new stream of one of its BOMs is refused at once;
        # the other shards carry on.
        async with http.get(f"{g.url}/api/enrichment/stream/{hit[0]}", headers=AUTH) as resp:
            assert resp.status == 503
            assert (await resp.json())["code"] == "broker_unavailable"
        health = await g.health(http)
        assert health["redis"] == "degraded" and health["status"] == "healthy"
        await asyncio.sleep(1.0)
        victim.start()
        await asyncio.to_thread(cluster.wait_ok)
        await publishing
        results = {b: await r for b, r in readers.items()}
        samples = await scrape(http, g.url)
    assert run.retries > 0  # publishing really did stall on the dead node
    for bom, (resumed, frames) in results.items():
        check_stream(run.sent[bom], resumed, frames, None)
        assert len(frames) == len(run.sent[bom]) + 1
    assert value(samples, "bomstream_redis_resyncs_total", result="filled") >= 2
    assert value(samples, "bomstream_redis_shard_connected", node=victim.name) == 1


async def test_events_arrive_in_order_while_a_primary_is_failed_over(
    replicated: RedisClusterProcesses,
    gateways: list[GatewayProcess],
    http: aiohttp.ClientSession,
    tasks: list[asyncio.Task[object]],
) -> None:
    c = replicated
    primary = primaries(c)[0]
    replica = c.replica_of(primary)
    moving = boms_on(c, primary, 3, "fo")
    g = await started(gateways, c, http)
    readers = {b: asyncio.create_task(read_all(http, g.url, b)) for b in moving}
    tasks.extend(readers.values())
    await eventually(
        lambda: scrape(http, g.url),
        lambda s: value(s, "bomstream_redis_subscribed_channels") == 3,
        timeout=10,
    )
    async with AsyncPublisher(c.url, cluster=True) as pub:
        # Long enough (about 20 s) that a failover asked three times falls inside it.
        run = Publishing(pub, moving, 2000)
        publishing = asyncio.create_task(run.run())
        tasks.append(publishing)
        await run.reached(40)
        await fail_over(replica)
        await asyncio.to_thread(c.wait_ok)
        assert run.done < 2000, "the failover should happen while events are published"
        await publishing
        results = {b: await r for b, r in readers.items()}
        samples = await scrape(http, g.url)
    for bom in moving:
        assert c.owner(f"enrichment:{bom}") is replica
        resumed, frames = results[bom]
        check_stream(run.sent[bom], resumed, frames, None)
        assert len(frames) == len(run.sent[bom]) + 1
    assert value(samples, "bomstream_redis_cluster_refreshes_total") >= 2
    assert value(samples, "bomstream_redis_shard_connected", node=replica.name) == 1
    # Each BOM's subscription moved to the new primary, and history filled the switch.
    assert value(samples, "bomstream_redis_resyncs_total", result="filled") >= 3


def test_cluster_keys_hash_to_the_channels_slot_and_plain_keys_stay_as_they_were() -> None:
    from redis.crc import key_slot

    from bomstream.history.redis_scripts import ids_key, stream_key

    for bom in ("bom-1", "7f0c-a", "x" * 128):
        channel = f"enrichment:{bom}"
        for key in (
            stream_key("enrichment-history:", bom, channel),
            ids_key("enrichment-history:", bom, channel),
        ):
            assert key_slot(key.encode()) == key_slot(channel.encode())
    assert stream_key("enrichment-history:", "bom-1") == "enrichment-history:bom-1"
    assert ids_key("enrichment-history:", "bom-1") == "enrichment-history:bom-1:ids"


async def fail_over(replica: Any) -> None:
    """CLUSTER FAILOVER on a replica, asked again while it has not taken over:
    Redis drops a manual failover after 5 s when its primary does not hand
    over in time, and never asks again itself. (Not FORCE: that lets both
    nodes take writes for a moment, and no order survives that.)"""
    for attempt in range(3):
        assert replica.command("CLUSTER", "FAILOVER") in (b"OK", "OK", True)
        try:
            await eventually(
                lambda: asyncio.to_thread(replica.command, "ROLE"),
                lambda role: role[0] in (b"master", "master"),
                timeout=6,
            )
            return
        except AssertionError:
            if attempt == 2:
                raise
