"""Unit tests of the load client's pieces: histogram, tally, SSE parser, tokens,
and the split of streams over shards."""

from __future__ import annotations

import ast
import dataclasses
import json
import random
import subprocess
import time
from pathlib import Path

import jwt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bomstream import loadtest
from bomstream.loadtest import procstat
from bomstream.loadtest.histogram import LogHistogram
from bomstream.loadtest.options import LoadOptions
from bomstream.loadtest.records import ClientPart, ClientUsage, StreamCounts
from bomstream.loadtest.report import Report
from bomstream.loadtest.runner import LoadTest, Shard
from bomstream.loadtest.sseclient import SSEConnection
from bomstream.loadtest.tally import StreamTally, make_event_id
from bomstream.loadtest.token import claims_for, mint_token


class RecordingSink:
    """Collects what a stream reports, standing in for the run."""

    def __init__(self, run_id: str = "r1") -> None:
        self.run_id = run_id
        self.latency = LogHistogram()
        self.delivered = 0
        self.foreign = 0
        self.misrouted = 0
        self.bytes = 0
        self.keepalives = 0
        self.events: list[str] = []

    def opened(self, conn: SSEConnection) -> None:
        self.events.append("opened")

    def refused(self, conn: SSEConnection, status: int) -> None:
        self.events.append(f"refused {status}")

    def ended(self, conn: SSEConnection, reason: str) -> None:
        self.events.append(f"ended {reason}")

    def lost(self, conn: SSEConnection, exc: BaseException | None) -> None:
        self.events.append("lost")


def chunked(*frames: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(f), f) for f in frames)


def event_frame(run: str, bom: int, seq: int, sent_us: int = 1) -> bytes:
    eid = make_event_id(run, bom, seq, sent_us).encode()
    return b"id: " + eid + b'\nevent: enrichment.progress\ndata: {"a":"b\\nc"}\n\n'


HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"


def crafted_body() -> bytes:
    seqs = [1, 2, 4, 4, 3, 6]
    frames = [b"retry: 3000\n\n", b'event: connected\ndata: {"type":"connected"}\n\n']
    frames += [event_frame("r1", 0, s) for s in seqs]
    frames.append(b": keepalive\n\n")
    # Two events coalesced into one chunk, as the gateway writes a burst.
    frames.append(event_frame("r1", 0, 7) + event_frame("r1", 0, 8))
    frames.append(event_frame("r1", 1, 9))  # another BOM's event: misrouted
    frames.append(event_frame("other", 0, 1))  # not from this run
    frames.append(b'event: stream_end\ndata: {"type":"stream_end","reason":"max_duration"}\n\n')
    return HEAD + chunked(*frames)


def feed(body: bytes, cuts: list[int]) -> tuple[SSEConnection, RecordingSink]:
    sink = RecordingSink()
    conn = SSEConnection(sink, 0, 0, b"", StreamTally())
    prev = 0
    for cut in [*sorted(cuts), len(body)]:
        if cut > prev:
            conn.data_received(body[prev:cut])
            prev = cut
    return conn, sink


def check_crafted(conn: SSEConnection, sink: RecordingSink) -> None:
    t = conn.tally
    assert t.received == 7  # 1 2 4 3 6 7 8
    assert t.duplicates == 1
    assert t.out_of_order == 1
    assert t.missing == {5}
    assert t.lost(9) == 2  # 5, and 9 never came
    assert sink.delivered == 7
    assert sink.misrouted == 1
    assert sink.foreign == 1
    assert sink.keepalives == 1
    assert sink.latency.count == 7
    assert sink.events == ["opened", "ended max_duration"]
    assert conn.last_event_id == b"other-0-1-1"


def test_parser_counts_gaps_duplicates_and_reordering_in_one_read() -> None:
    check_crafted(*feed(crafted_body(), []))


def test_parser_gives_the_same_counts_for_every_split_point() -> None:
    body = crafted_body()
    for cut in range(1, len(body)):
        check_crafted(*feed(body, [cut]))


def test_parser_gives_the_same_counts_when_fed_byte_by_byte() -> None:
    body = crafted_body()
    check_crafted(*feed(body, list(range(len(body)))))


def test_parser_accepts_crlf_line_endings_and_unchunked_bodies() -> None:
    frames = [event_frame("r1", 0, s).replace(b"\n", b"\r\n") for s in (1, 2, 3)]
    body = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\n" + b"".join(frames)
    rng = random.Random(7)
    for _ in range(50):
        conn, sink = feed(body, [rng.randrange(1, len(body)) for _ in range(4)])
        assert conn.tally.received == 3
        assert conn.tally.missing == set()
        assert sink.delivered == 3


def test_refused_stream_reports_its_status() -> None:
    conn, sink = feed(b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 2\r\n\r\n{}", [])
    assert sink.events == ["refused 503"]
    assert conn.status == 503
    assert conn.tally.received == 0


def test_tally_tail_loss_counts_events_after_the_last_one_seen() -> None:
    t = StreamTally()
    for s in (1, 2, 3):
        assert t.see(s)
    assert not t.see(2)
    assert t.lost(5) == 2
    assert t.duplicates == 1


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=60), max_size=200))
def test_tally_matches_a_set_based_count(seqs: list[int]) -> None:
    t = StreamTally()
    seen: set[int] = set()
    dups = ooo = 0
    high = 0
    for s in seqs:
        if s in seen:
            dups += 1
        elif s < high:
            ooo += 1
        seen.add(s)
        high = max(high, s)
        t.see(s)
    assert t.received == len(seen)
    assert t.duplicates == dups
    assert t.out_of_order == ooo
    assert t.lost(60) == 60 - len(seen)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=10_000_000), min_size=1, max_size=500))
def test_histogram_quantiles_are_within_four_percent(values: list[int]) -> None:
    h = LogHistogram()
    for v in values:
        h.record(v)
    ordered = sorted(values)
    for q in (0.5, 0.9, 0.99, 0.999, 1.0):
        exact = ordered[max(0, -(-int(q * len(ordered) * 1_000_000) // 1_000_000) - 1)]
        got = h.quantile(q)
        assert exact <= got <= max(exact * 1.04, exact + 1)
    assert h.max == ordered[-1]
    assert h.count == len(values)


def test_histogram_bucket_bounds_are_contiguous() -> None:
    previous = -1
    for i in range(2000):
        upper = LogHistogram.upper_bound(i)
        assert upper > previous
        assert LogHistogram.index(upper) == i
        assert LogHistogram.index(previous + 1) == i
        previous = upper


@pytest.mark.parametrize(
    ("claim", "path"),
    [
        ("organization_id", ["organization_id"]),
        ("app_metadata.org.id", ["app_metadata", "org", "id"]),
    ],
)
def test_minted_token_puts_the_org_at_the_dotted_claim(claim: str, path: list[str]) -> None:
    secret = "s" * 32
    token = mint_token(secret, claim, "org-9", subject="load-1", ttl_s=600, role="service_role")
    decoded = jwt.decode(token, secret, algorithms=["HS256"])
    node = decoded
    for name in path:
        node = node[name]
    assert node == "org-9"
    assert decoded["sub"] == "load-1"
    assert decoded["role"] == "service_role"
    assert decoded["exp"] - decoded["iat"] == 600
    assert claims_for("o", "a.b", "s", 1)["a"] == {"b": "o"}


def test_minting_without_a_secret_is_refused() -> None:
    with pytest.raises(ValueError, match="jwt_secret"):
        mint_token("", "organization_id", "o", subject="s", ttl_s=60)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.integers(min_value=0, max_value=10_000_000), max_size=300),
    st.lists(st.integers(min_value=0, max_value=10_000_000), max_size=300),
)
def test_merged_histograms_are_the_histogram_of_all_samples(a: list[int], b: list[int]) -> None:
    ha, hb, whole = LogHistogram(), LogHistogram(), LogHistogram()
    for v in a:
        ha.record(v)
        whole.record(v)
    for v in b:
        hb.record(v)
        whole.record(v)
    # Through JSON, as a worker process sends its histogram.
    merged = LogHistogram.from_json(ha.to_json())
    merged.merge(LogHistogram.from_json(hb.to_json()))
    assert merged.counts == whole.counts
    assert (merged.count, merged.total, merged.max) == (whole.count, whole.total, whole.max)
    assert merged.to_json() == whole.to_json()
    for q in (0.5, 0.99, 1.0):
        assert merged.quantile(q) == whole.quantile(q)


def faulty_stream_body(run: str, number: int, bom: int, boms: int) -> bytes:
    """The crafted faults, varied per stream: a gap, a duplicate, a late event,
    a missing tail, an event of another BOM, one of another run."""
    rng = random.Random(number)
    seqs = list(range(1, 13))
    seqs.remove(rng.randrange(2, 6))  # lost
    seqs.insert(rng.randrange(3, 8), rng.randrange(1, 4))  # duplicate
    late = rng.randrange(6, 9)
    seqs.remove(late)
    seqs.insert(rng.randrange(late, 11), late)  # out of order
    del seqs[-rng.randrange(0, 3) or len(seqs) :]  # missing tail, on some streams
    frames = [b'event: connected\ndata: {"type":"connected"}\n\n']
    frames += [event_frame(run, bom, s, sent_us=1000 * number + s) for s in seqs]
    if number % 3 == 0:
        frames.append(event_frame(run, (bom + 1) % boms, 1))
    if number % 4 == 0:
        frames.append(event_frame("other", bom, 1))
        frames.append(b": keepalive\n\n")
    return HEAD + chunked(*frames)


def count_sharded(shards: int, connections: int, boms: int, slow: int) -> list[StreamCounts]:
    """Every stream fed its crafted body, the streams split over ``shards``
    LoadTests the way worker processes split them."""
    opts = LoadOptions(url="http://127.0.0.1:1", connections=connections, boms=boms)
    opts = dataclasses.replace(opts, slow_consumers=slow)
    published = [12 + b for b in range(boms)]
    parts = []
    for k in range(shards):
        lt = LoadTest(opts, "r7", Shard(k, shards))
        for j, number in enumerate(lt.numbers):
            bom = number % boms
            conn = SSEConnection(lt, j, bom, b"", lt.tallies[j])
            body = faulty_stream_body("r7", number, bom, boms)
            rng = random.Random(number)
            cuts = sorted(rng.randrange(1, len(body)) for _ in range(3))
            for start, end in zip([0, *cuts], [*cuts, len(body)], strict=True):
                conn.data_received(body[start:end])
        # What crosses the pipe from a worker is JSON.
        parts.append(StreamCounts.from_json(lt.counts(published).to_json()))
    return parts


def without_clock(counts: StreamCounts) -> dict[str, object]:
    """Everything but what depends on when the test ran (latencies, timestamps)."""
    out = {k: v for k, v in counts.to_json().items() if not k.endswith("_at")}
    out["latency"] = counts.latency.count
    return out


@pytest.mark.parametrize("shards", [2, 3, 7])
def test_streams_split_over_shards_count_exactly_what_one_process_counts(shards: int) -> None:
    (single,) = count_sharded(1, connections=40, boms=6, slow=5)
    assert single.lost > 0 and single.duplicates > 0 and single.out_of_order > 0
    assert single.misrouted > 0 and single.foreign > 0 and single.keepalives > 0
    parts = count_sharded(shards, connections=40, boms=6, slow=5)
    assert [p.streams for p in parts] == [len(range(k, 40, shards)) for k in range(shards)]
    assert sum(p.slow_consumers for p in parts) == 5
    merged = StreamCounts.merged(parts)
    assert without_clock(merged) == without_clock(single)


def test_the_loadtest_package_has_no_import_circle() -> None:
    """Imports under TYPE_CHECKING and inside functions count too."""
    package = Path(loadtest.__file__).parent
    names = {p.stem for p in package.glob("*.py")}
    graph: dict[str, set[str]] = {}
    for path in package.glob("*.py"):
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                if node.module == "bomstream.loadtest":
                    deps.update(a.name for a in node.names if a.name in names)
                elif node.module.startswith("bomstream.loadtest."):
                    deps.add(node.module.split(".")[2])
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("bomstream.loadtest."):
                        deps.add(alias.name.split(".")[2])
        graph[path.stem] = deps - {path.stem}
    done: set[str] = set()

    def visit(name: str, trail: list[str]) -> None:
        assert name not in trail, " -> ".join([*trail, name])
        if name in done:
            return
        for dep in sorted(graph.get(name, ())):
            visit(dep, [*trail, name])
        done.add(name)

    assert "runner" in graph["conduct"] or "report" in graph["conduct"]
    for name in sorted(graph):
        visit(name, [])


def report_with_usage(*usage: ClientUsage) -> Report:
    opts = LoadOptions(url="http://127.0.0.1:1", connections=2, boms=1)
    parts = [ClientPart(u, StreamCounts(streams=1) if u.role == "streams" else None) for u in usage]
    counts = StreamCounts.merged([p.counts for p in parts if p.counts is not None])
    return Report.build(opts, "r1", counts, None, parts, drain_s=0.0, gateway=None)


def test_report_gives_each_client_process_its_cpu_share_and_warns_above_85_percent() -> None:
    calm = report_with_usage(
        ClientUsage(10, "publisher", 0.5, 10.0),
        ClientUsage(11, "streams", 8.5, 10.0),
        ClientUsage(12, "streams", 0.0, 0.0),
    )
    rows = [p["cpu_share"] for p in calm.data["client_processes"]]
    assert rows == [0.05, 0.85, None]
    assert calm.data["client_cpu_warning"] is None
    table = calm.table()
    assert "client pid 11" in table and "CPU share 85% of a core" in table
    assert "CPU share not measured" in table
    assert "warning" not in table

    busy = report_with_usage(
        ClientUsage(10, "publisher", 0.5, 10.0), ClientUsage(11, "streams", 8.6, 10.0)
    )
    warning = busy.data["client_cpu_warning"]
    assert warning is not None and "pid 11 at 86%" in warning and "pid 10" not in warning
    assert busy.table().splitlines()[-1] == f"warning: {warning}"


def test_gateway_samples_add_up_over_its_workers_and_fail_when_one_is_gone() -> None:
    """``--gateway-pid`` once per worker of ``serve --workers N``: a sum that
    silently left out a worker that had exited would pass for the whole."""
    sleepers = [subprocess.Popen(["sleep", "60"]) for _ in range(2)]
    try:
        pids = [p.pid for p in sleepers]
        # A sleeping process's RSS and CPU time stay put once it has exec'd.
        deadline = time.monotonic() + 10
        while any(Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "S" for pid in pids):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        one = [procstat.sample(pid) for pid in pids]
        assert all(s is not None and s.rss_kb > 0 for s in one)
        both = procstat.sample_sum(pids)
        writes = [s.write_calls for s in one if s is not None]
        assert both == procstat.ProcSample(
            sum(s.rss_kb for s in one if s is not None),
            sum(s.cpu_s for s in one if s is not None),
            None if None in writes else sum(w for w in writes if w is not None),
        )
        sleepers[1].kill()
        sleepers[1].wait()
        assert procstat.sample_sum(pids) is None
        assert procstat.sample_sum([]) is None
    finally:
        for p in sleepers:
            p.kill()
            p.wait()


def test_gateway_pids_survive_the_trip_to_json_but_not_to_a_worker() -> None:
    opts = LoadOptions(url="http://127.0.0.1:1", connections=2, boms=1, gateway_pids=(7, 8))
    back = LoadOptions.from_json(json.loads(json.dumps(opts.to_json())))
    assert back == opts and back.gateway_pids == (7, 8)
    assert opts.for_worker().gateway_pids == ()
