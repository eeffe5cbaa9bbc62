"""Unit tests of the load client's pieces: histogram, tally, SSE parser, tokens."""

from __future__ import annotations

import random

import jwt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bomstream.loadtest.histogram import LogHistogram
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
