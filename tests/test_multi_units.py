"""Unit tests of the multi-BOM parts: the cursor, placing it, and fan-out
writing one frame object to every stream."""

from __future__ import annotations

from typing import Any, cast

from bomstream.buffer import Position
from bomstream.channel import Channel
from bomstream.events import Event, parse_event
from bomstream.metrics import Metrics
from bomstream.multi.catchup import after, plan
from bomstream.multi.cursor import cursor_of, multi_chunk, parse_cursor
from bomstream.multi.registry import MultiSub, Registry
from bomstream.principal import OPEN, Principal


def ev(bom_id: str, n: int, *, arrival: int = 0, hseq: int = 0, org: str | None = None) -> Event:
    body = f'{{"event_id":"{bom_id}-{n}","event_type":"enrichment.progress"'
    if org:
        body += f',"organization_id":"{org}"'
    e = parse_event((body + "}").encode(), bom_id, max_bytes=65536, terminal_types=())
    e.arrival, e.hseq = arrival, hseq
    return e


def test_the_cursor_names_the_event_and_stays_short() -> None:
    e = ev("bom-1", 3)
    assert cursor_of(e) == "1/bom-1/bom-1-3"
    assert parse_cursor(cursor_of(e)) == ("bom-1", "bom-1-3")
    slashed = parse_event(
        b'{"event_id":"a/b/c","event_type":"x"}', "b", max_bytes=1000, terminal_types=()
    )
    assert parse_cursor(cursor_of(slashed)) == ("b", "a/b/c")
    long_id = "\U0001f600" * 128  # 512 bytes of UTF-8
    worst = parse_event(
        f'{{"event_id":"{long_id}","event_type":"x"}}'.encode(),
        "b" * 128,
        max_bytes=65536,
        terminal_types=(),
    )
    assert len(cursor_of(worst).encode()) <= 387
    for junk in ("", "1", "1/bom", "2/bom/e", "1//e", "1/-bad/e", "1/bom/"):
        assert parse_cursor(junk) is None, junk


def test_a_frame_names_its_bom_even_when_the_event_did_not() -> None:
    e = ev("bom-1", 1)
    assert b'"bom_id"' not in e.data
    frame = multi_chunk(e)
    assert frame is multi_chunk(e)  # built once
    assert b'data: {"bom_id":"bom-1","event_id":"bom-1-1"' in frame
    assert b"id: 1/bom-1/bom-1-1\n" in frame


class Recorder:
    """A transport that keeps what it was given (the objects themselves)."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def is_closing(self) -> bool:
        return False

    def get_write_buffer_size(self) -> int:
        return 0


def registry_with(channels: dict[str, Channel]) -> Registry:
    return Registry(channels, Metrics(), 1 << 20, lambda s, r: None, lambda s: None)


def add(
    reg: Registry,
    channels: dict[str, Channel],
    boms: tuple[str, ...] | None,
    principal: Principal = OPEN,
) -> tuple[MultiSub, Recorder]:
    t = Recorder()
    sub = MultiSub(boms, principal, cast(Any, t))

    def channel_for(b: str) -> Channel:
        return channels.setdefault(b, Channel(b, 10))

    reg.add(sub, channel_for)
    return sub, t


def test_one_event_is_one_bytes_object_written_to_every_stream() -> None:
    channels: dict[str, Channel] = {}
    reg = registry_with(channels)
    recorders = [add(reg, channels, ("a", "b"))[1] for _ in range(3)]
    org_rec = add(reg, channels, None)[1]
    e = ev("a", 1)
    reg.push(e)
    reg.flush()
    written = [r.writes for r in [*recorders, org_rec]]
    assert all(len(w) == 1 for w in written)
    assert all(w[0] is written[0][0] for w in written)
    # Two events in one batch: one write per stream, in arrival order.
    reg.push(ev("b", 1))
    reg.push(ev("a", 2))
    reg.flush()
    assert recorders[0].writes[1] == multi_chunk(ev("b", 1)) + multi_chunk(ev("a", 2))


def test_org_streams_get_their_orgs_events_only() -> None:
    channels: dict[str, Channel] = {}
    reg = registry_with(channels)
    a = add(reg, channels, None, Principal(kind="jwt", org="org-a"))[1]
    b = add(reg, channels, None, Principal(kind="jwt", org="org-b"))[1]
    for e in (ev("x", 1, org="org-a"), ev("y", 1, org="org-b"), ev("z", 1)):
        reg.push(e)
    reg.flush()
    assert [w.count(b"data:") for w in (a.writes[0], b.writes[0])] == [1, 1]
    assert b"org-a" in a.writes[0] and b"org-b" in b.writes[0]


def buffer_of(bom_id: str, events: list[Event], capacity: int = 10) -> Channel:
    ch = Channel(bom_id, capacity)
    for e in events:
        ch.buffer.append(e)
    return ch


def ids(events: list[Event]) -> list[str]:
    return [e.event_id for e in events]


def test_placing_a_cursor_by_arrival_and_by_history_sequence() -> None:
    # Live here: arrival order decides.
    a = buffer_of("a", [ev("a", 1, arrival=1), ev("a", 2, arrival=3)])
    b = buffer_of("b", [ev("b", 1, arrival=2), ev("b", 2, arrival=4)])
    p = plan({"a": a, "b": b}, ["a", "b"], None, ("b", "b-1"), Position())
    assert p.resumed and ids(p.events) == ["a-2", "b-2"]
    # A fresh process: everything from history, placed by sequence; a live
    # event not yet stored (arrival, no sequence) is newer than all of it.
    a = buffer_of("a", [ev("a", 1, hseq=1), ev("a", 2, hseq=3), ev("a", 3, arrival=1)])
    b = buffer_of("b", [ev("b", 1, hseq=2), ev("b", 2, hseq=4)])
    p = plan({"a": a, "b": b}, ["a", "b"], None, ("b", "b-1"), Position())
    assert p.resumed and ids(p.events) == ["a-2", "b-2", "a-3"]
    assert after(ev("q", 1, arrival=5), ev("r", 1, hseq=9))
    assert not after(ev("q", 1, hseq=9), ev("r", 1, arrival=5, hseq=10))


def test_a_bom_whose_buffer_let_go_of_newer_events_is_a_gap() -> None:
    a = buffer_of("a", [ev("a", n, arrival=n) for n in range(1, 6)], capacity=2)
    b = buffer_of("b", [ev("b", 1, arrival=0), ev("b", 2, arrival=6)])
    p = plan({"a": a, "b": b}, ["a", "b"], None, ("b", "b-2"), Position())
    assert p.resumed and p.events == []
    b = buffer_of("b", [ev("b", 1, arrival=2)])
    p = plan({"a": a, "b": b}, ["a", "b"], None, ("b", "b-1"), Position())
    assert not p.resumed and p.gaps == ["a"] and ids(p.events) == ["a-5"]
    # Not held at all, but forgotten after the position: a gap it cannot fill.
    forgotten = Position()
    forgotten.arrival = 9
    p = plan({"b": b}, ["b", "gone"], None, ("b", "b-1"), forgotten)
    assert not p.resumed and p.gaps == ["gone"] and p.events == []
    # Forgotten before the position: nothing was missed.
    forgotten.arrival = 1
    p = plan({"b": b}, ["b", "gone"], None, ("b", "b-1"), forgotten)
    assert p.resumed and p.gaps == []
