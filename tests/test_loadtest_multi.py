"""``bomstream loadtest --boms-per-stream K``: streams of several BOMs each,
counted per BOM. The parser on crafted bytes, the split over shards, a run
against the crafted server whose faults are known, and runs against a real
gateway fed by a real redis-server."""

from __future__ import annotations

import dataclasses
import random
from collections import Counter
from pathlib import Path

import orjson
import pytest

from bomstream.cli import main as cli_main
from bomstream.loadtest.multistream import MultiSSEConnection, Watch
from bomstream.loadtest.options import LoadOptions, bom_ids, watched
from bomstream.loadtest.records import StreamCounts
from bomstream.loadtest.run import run_load
from bomstream.loadtest.runner import LoadTest, Shard
from bomstream.loadtest.tally import StreamTally, make_event_id
from tests.gateway_proc import GatewayProcess
from tests.redis_proc import RedisProcess
from tests.test_loadtest_parts import HEAD, RecordingSink, chunked, without_clock
from tests.test_loadtest_runs import CUT_AFTER, CraftedServer, run_cli

RUN = "r1"
NAMES = [f"lt{RUN}-{b}" for b in range(4)]


def multi_frame(run: str, bom: int, seq: int, sent_us: int = 1, named: int | None = None) -> bytes:
    """A frame as the gateway writes it to a multi-BOM stream; ``named`` puts
    another BOM's id in the JSON than the event id says."""
    eid = make_event_id(run, bom, seq, sent_us)
    body = orjson.dumps(
        {
            "event_id": eid,
            "event_type": "enrichment.progress",
            "bom_id": f"lt{run}-{bom if named is None else named}",
            "state": {"note": 'a "quoted"\nline', "event_id": "decoy"},
        }
    )
    cursor = f"1/lt{run}-{bom}/{eid}".encode()
    return b"id: " + cursor + b"\nevent: enrichment.progress\ndata: " + body + b"\n\n"


def crafted_multi_body() -> bytes:
    """A stream of BOMs 0 and 2 with faults on each, interleaved."""
    frames = [b"retry: 3000\n\n", b'event: connected\ndata: {"type":"connected"}\n\n']
    for s0, s2 in [(1, 1), (2, 3), (4, 2), (4, 5), (3, 5), (6, 6)]:
        frames += [multi_frame(RUN, 0, s0), multi_frame(RUN, 2, s2)]
    frames.append(b": keepalive\n\n")
    # A burst coalesced into one chunk, as the gateway writes one.
    frames.append(multi_frame(RUN, 0, 7) + multi_frame(RUN, 2, 7) + multi_frame(RUN, 0, 8))
    frames.append(multi_frame(RUN, 1, 1))  # a BOM the stream did not list: misrouted
    frames.append(multi_frame(RUN, 2, 8, named=3))  # JSON names another BOM: misrouted
    frames.append(multi_frame("other", 0, 1))  # not from this run
    # The id line after the others: still one event (BOM 2, seq 9).
    late_id = multi_frame(RUN, 2, 9).split(b"\n")
    frames.append(b"\n".join([*late_id[1:3], late_id[0]]) + b"\n\n")
    frames.append(b'event: stream_end\ndata: {"type":"stream_end","reason":"max_duration"}\n\n')
    return HEAD + chunked(*frames)


def multi_conn(boms: list[int]) -> tuple[MultiSSEConnection, RecordingSink, list[StreamTally]]:
    sink = RecordingSink(RUN)
    tallies = [StreamTally() for _ in boms]
    watches = {
        str(b).encode(): Watch(NAMES[b].encode(), t) for b, t in zip(boms, tallies, strict=True)
    }
    return MultiSSEConnection(sink, 0, b"", watches), sink, tallies


def feed_multi(
    body: bytes, cuts: list[int]
) -> tuple[MultiSSEConnection, RecordingSink, list[StreamTally]]:
    """A stream of BOMs 0 and 2, fed ``body`` in pieces cut at ``cuts``."""
    conn, sink, tallies = multi_conn([0, 2])
    prev = 0
    for cut in [*sorted(cuts), len(body)]:
        if cut > prev:
            conn.data_received(body[prev:cut])
            prev = cut
    return conn, sink, tallies


def check_crafted_multi(
    conn: MultiSSEConnection, sink: RecordingSink, tallies: list[StreamTally]
) -> None:
    bom0, bom2 = tallies
    assert (bom0.received, bom0.duplicates, bom0.out_of_order, bom0.missing) == (7, 1, 1, {5})
    # Its seq 8 came named as BOM 3, so it counts as misrouted, not as BOM 2's.
    assert (bom2.received, bom2.duplicates, bom2.out_of_order, bom2.missing) == (7, 1, 1, {4, 8})
    assert bom0.lost(8) == 1 and bom2.lost(9) == 2
    assert sink.delivered == 14
    assert sink.latency.count == 14
    assert sink.misrouted == 2
    assert sink.foreign == 1
    assert sink.keepalives == 1
    assert sink.events == ["opened", "ended max_duration"]
    # The cursor of the last event frame, kept as-is to resume with.
    assert conn.last_event_id == f"1/lt{RUN}-2/{make_event_id(RUN, 2, 9, 1)}".encode()


def test_multi_parser_counts_each_bom_on_its_own() -> None:
    check_crafted_multi(*feed_multi(crafted_multi_body(), []))


def test_multi_parser_gives_the_same_counts_for_every_split_point() -> None:
    body = crafted_multi_body()
    for cut in range(1, len(body)):
        check_crafted_multi(*feed_multi(body, [cut]))


def test_multi_parser_gives_the_same_counts_fed_byte_by_byte_and_with_crlf() -> None:
    body = crafted_multi_body()
    check_crafted_multi(*feed_multi(body, list(range(len(body)))))
    frames = [multi_frame(RUN, 0, s).replace(b"\n", b"\r\n") for s in (1, 2, 3)]
    _, sink, tallies = feed_multi(HEAD + chunked(*frames), [])
    assert tallies[0].received == 3
    assert sink.delivered == 3 and sink.misrouted == 0


@pytest.mark.parametrize(("streams", "boms", "k"), [(200, 1000, 50), (20, 10, 5), (6, 3, 2)])
def test_streams_of_k_boms_list_every_bom_equally_often(streams: int, boms: int, k: int) -> None:
    opts = LoadOptions(url="http://127.0.0.1:1", connections=streams, boms=boms, boms_per_stream=k)
    lists = [watched(opts, n) for n in range(streams)]
    assert all(len(set(w)) == k for w in lists)
    listed = Counter(b for w in lists for b in w)
    assert set(listed.values()) == {streams * k // boms}
    assert len(listed) == boms


def test_a_multi_stream_asks_for_its_boms_in_one_request() -> None:
    opts = LoadOptions(url="http://127.0.0.1:1/gw", connections=3, boms=4, boms_per_stream=3)
    lt = LoadTest(opts, RUN)
    request = lt._request(1, b"1/x/y")
    line = request.split(b"\r\n")[0].decode()
    names = bom_ids(opts, RUN)
    query = "&".join(f"bom_id={names[b]}" for b in (3, 0, 1))
    assert line == f"GET /gw/api/enrichment/stream?{query} HTTP/1.1"
    assert b"\r\nLast-Event-ID: 1/x/y\r\n" in request


def faulty_multi_body(run: str, number: int, boms: list[int], all_boms: int) -> bytes:
    """Per listed BOM: a gap, a duplicate, a late event, on some a missing
    tail; on some streams an unlisted BOM's event and another run's."""
    rng = random.Random(number)
    frames = [b'event: connected\ndata: {"type":"connected"}\n\n']
    per_bom = []
    for b in boms:
        seqs = list(range(1, 13))
        seqs.remove(rng.randrange(2, 6))
        seqs.insert(rng.randrange(3, 8), rng.randrange(1, 4))
        late = rng.randrange(6, 9)
        seqs.remove(late)
        seqs.insert(rng.randrange(late, 11), late)
        del seqs[-rng.randrange(0, 3) or len(seqs) :]
        per_bom.append([multi_frame(run, b, s, sent_us=1000 * number + s) for s in seqs])
    while any(per_bom):  # the BOMs' events interleaved, as they arrive
        for queue in per_bom:
            if queue:
                frames.append(queue.pop(0))
    unlisted = [b for b in range(all_boms) if b not in boms]
    if number % 3 == 0 and unlisted:
        frames.append(multi_frame(run, unlisted[0], 1))
    if number % 4 == 0:
        frames.append(multi_frame("other", boms[0], 1))
        frames.append(b": keepalive\n\n")
    return HEAD + chunked(*frames)


def count_sharded_multi(shards: int) -> list[StreamCounts]:
    opts = LoadOptions(url="http://127.0.0.1:1", connections=24, boms=6, boms_per_stream=3)
    opts = dataclasses.replace(opts, slow_consumers=4)
    published = [12 + b for b in range(6)]
    parts = []
    for k in range(shards):
        lt = LoadTest(opts, "r7", Shard(k, shards))
        for j, number in enumerate(lt.numbers):
            conn = lt._connection(j, None)
            body = faulty_multi_body("r7", number, lt.watched[j], 6)
            rng = random.Random(number)
            cuts = sorted(rng.randrange(1, len(body)) for _ in range(3))
            for start, end in zip([0, *cuts], [*cuts, len(body)], strict=True):
                conn.data_received(body[start:end])
        parts.append(StreamCounts.from_json(lt.counts(published).to_json()))
    return parts


@pytest.mark.parametrize("shards", [2, 5])
def test_multi_streams_split_over_shards_count_what_one_process_counts(shards: int) -> None:
    (single,) = count_sharded_multi(1)
    assert single.lost > 0 and single.duplicates > 0 and single.out_of_order > 0
    assert single.misrouted > 0 and single.foreign > 0
    assert single.subscriptions == 24 * 3
    # Every listed BOM's events are expected, slow consumers' aside.
    assert single.expected == sum(
        12 + b for n in range(4, 24) for b in range(n * 3 % 6, n * 3 % 6 + 3)
    )
    merged = StreamCounts.merged(count_sharded_multi(shards))
    assert without_clock(merged) == without_clock(single)


@pytest.mark.parametrize("workers", [1, 2])
async def test_multi_streams_count_the_faults_the_server_injected_per_bom(workers: int) -> None:
    server = CraftedServer()
    await server.start()
    try:
        opts = LoadOptions(
            url=server.url,
            connections=6,
            boms=3,
            boms_per_stream=2,
            source_ips=2,
            rate=60,
            duration=1.0,
            drain_s=3.0,
            publish_via="http",
            progress=False,
            workers=workers,
        )
        report = (await run_load(opts)).data
    finally:
        await server.stop()
    # Stream n lists BOMs 2n and 2n+1 mod 3: each BOM on 4 of the 6 streams.
    subscriptions, per_bom = 12, 20
    c, d = report["connections"], report["deliveries"]
    assert report["publish"]["sent"] == 3 * per_bom
    assert (c["established"], c["subscriptions"], c["boms_per_stream"]) == (6, 12, 2)
    assert d["expected"] == subscriptions * per_bom
    # The crafted faults, once per BOM a stream lists.
    assert (d["lost"], d["duplicates"], d["out_of_order"]) == (12, 12, 12)
    assert d["received"] == subscriptions * (per_bom - 1)
    assert d["streams_with_loss"] == 6
    assert (d["misrouted"], d["foreign"]) == (0, 0)
    assert report["latency_ms"]["samples"] == d["received"]
    # The 4 streams listing BOM 0 were cut and resumed from their cursor:
    # BOM 0's event CUT_AFTER, the last frame each got, whichever BOM it
    # interleaves with.
    assert c["reconnects"] == 4
    assert len(server.resumed_from) == 4
    for cursor in server.resumed_from:
        version, bom, eid = cursor.split("/")
        assert (version, bom.rsplit("-", 1)[1], eid.split("-")[2]) == ("1", "0", str(CUT_AFTER))


@pytest.fixture
def live_only_gateway(redis_server: RedisProcess) -> tuple[GatewayProcess, RedisProcess]:
    """A gateway on Redis without shared history, so that every write it makes
    while events are published goes to a stream."""
    gw = GatewayProcess(
        env={
            "BOMSTREAM_REDIS_URL": redis_server.url,
            "BOMSTREAM_HISTORY_BACKEND": "none",
            "BOMSTREAM_AUTH_ADMIN_TOKEN": "admin-secret",
        }
    )
    gw.start_sync()
    return gw, redis_server


@pytest.mark.parametrize("workers", ["1", "2"])
def test_multi_streams_against_a_real_gateway_get_every_event_of_every_bom_once(
    live_only_gateway: tuple[GatewayProcess, RedisProcess], tmp_path: Path, workers: str
) -> None:
    gw, redis = live_only_gateway
    assert gw.proc is not None
    args = [
        "--url", gw.url,
        "--connections", "20",
        "--boms", "10",
        "--boms-per-stream", "5",
        "--source-ips", "2",
        "--rate", "100",
        "--duration", "1",
        "--token", "admin-secret",
        "--redis", redis.url,
        "--gateway-pid", str(gw.proc.pid),
        "--workers", workers,
    ]  # fmt: skip
    try:
        report = run_cli(args, tmp_path, f"multi-{workers}")
    finally:
        gw.stop()
    c, pub, d = report["connections"], report["publish"], report["deliveries"]
    assert isinstance(c, dict) and isinstance(pub, dict) and isinstance(d, dict)
    assert (c["established"], c["subscriptions"], c["failed"]) == (20, 100, {})
    assert pub["sent"] == 100
    # 100 subscriptions, 10 events published to each BOM.
    assert d["expected"] == 100 * 10
    assert d["received"] == d["expected"]
    assert (d["lost"], d["duplicates"], d["out_of_order"]) == (0, 0, 0)
    assert (d["misrouted"], d["foreign"]) == (0, 0)
    assert c["reconnects"] == 0
    gateway = report["gateway"]
    assert isinstance(gateway, dict)
    # Each write carries one event or more, to one stream; besides them only
    # a stream's heartbeat or the feed's ping to Redis may fall due.
    assert 1 <= gateway["write_calls_publish"] <= d["received"] + c["established"]
    # The same slack as above: a heartbeat or ping may add a write or two.
    assert gateway["deliveries_per_write"] == round(
        d["received"] / gateway["write_calls_publish"], 3
    )
    assert gateway["deliveries_per_write"] * (d["received"] + c["established"]) >= d["received"]
    assert gateway["rss_kb_per_subscription"] == pytest.approx(
        (gateway["rss_kb_held"] - gateway["rss_kb_before"]) / 100, abs=0.001
    )


def test_more_boms_per_stream_than_boms_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["loadtest", "--url", "http://127.0.0.1:9", "--boms", "4", "--boms-per-stream", "5"]
    assert cli_main(argv) == 2
    assert "--boms-per-stream must be between 0 and --boms" in capsys.readouterr().err
