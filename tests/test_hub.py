"""Unit tests of the hub's bookkeeping: encode once, bounded buffers, ordering."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson

from bomstream.config import Config
from bomstream.events import Event, parse_event
from bomstream.hub import Hub
from bomstream.metrics import Metrics
from bomstream.principal import OPEN
from tests.conftest import gateway_config, progress


class RecordingTransport(asyncio.WriteTransport):
    """Stands in for a socket in these unit tests: keeps every object written."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closing = False

    def write(self, data: Any) -> None:
        self.writes.append(data)

    def is_closing(self) -> bool:
        return self.closing

    def get_write_buffer_size(self) -> int:
        return 0

    def abort(self) -> None:
        self.closing = True


def make_event(cfg: Config, bom_id: str, n: int, **extra: Any) -> Event:
    return parse_event(
        orjson.dumps(progress(bom_id, n, **extra)),
        bom_id,
        max_bytes=cfg.limits.max_event_bytes,
        terminal_types=cfg.events.terminal_types,
    )


async def settle() -> None:
    await asyncio.sleep(0)
    await asyncio.sleep(0)


async def test_an_event_is_encoded_once_and_the_same_bytes_object_goes_to_every_stream() -> None:
    cfg = gateway_config()
    hub = Hub(cfg, Metrics())
    transports = [RecordingTransport() for _ in range(5)]
    for t in transports:
        hub.open("bom", OPEN, None, t)
    hub.ingest(make_event(cfg, "bom", 1), "test")
    await settle()
    written = [t.writes[-1] for t in transports]
    assert all(w is written[0] for w in written)
    assert b"id: bom-e1\n" in written[0]


async def test_events_arriving_together_are_coalesced_into_one_write_per_stream() -> None:
    cfg = gateway_config()
    hub = Hub(cfg, Metrics())
    t = RecordingTransport()
    hub.open("bom", OPEN, None, t)
    before = len(t.writes)
    for n in range(1, 4):
        hub.ingest(make_event(cfg, "bom", n), "test")
    await settle()
    assert len(t.writes) == before + 1
    blob = t.writes[-1]
    assert blob.index(b"id: bom-e1") < blob.index(b"id: bom-e2") < blob.index(b"id: bom-e3")


async def test_a_stream_opened_while_events_are_in_flight_gets_each_exactly_once() -> None:
    cfg = gateway_config()
    hub = Hub(cfg, Metrics())
    early = RecordingTransport()
    hub.open("bom", OPEN, None, early)
    hub.ingest(make_event(cfg, "bom", 1), "test")
    hub.ingest(make_event(cfg, "bom", 2), "test")
    # Not yet fanned out when the second stream resumes from e1.
    late = RecordingTransport()
    opened = hub.open("bom", OPEN, "bom-e1", late)
    late.write(opened.initial)
    hub.ingest(make_event(cfg, "bom", 3), "test")
    await settle()
    for t in (early, late):
        wire = b"".join(t.writes)
        assert wire.count(b"id: bom-e2\n") == 1
        assert wire.count(b"id: bom-e3\n") == 1
    assert b"".join(late.writes).count(b"id: bom-e1\n") == 0


async def test_buffer_keeps_only_events_per_bom() -> None:
    cfg = gateway_config(buffer__events_per_bom=5)
    hub = Hub(cfg, Metrics())
    for n in range(1, 21):
        hub.ingest(make_event(cfg, "bom", n), "test")
    assert [e.event_id for e in hub.held("bom")] == [f"bom-e{n}" for n in range(16, 21)]
    # An evicted id no longer resumes: the client is told it was not resumed.
    t = RecordingTransport()
    opened = hub.open("bom", OPEN, "bom-e3", t)
    assert opened.resumed is False


async def test_bom_forgotten_retention_s_after_its_last_event() -> None:
    cfg = gateway_config(buffer__retention_s=0.2)
    hub = Hub(cfg, Metrics())
    hub.ingest(make_event(cfg, "old", 1), "test")
    await asyncio.sleep(0.25)
    hub.ingest(make_event(cfg, "fresh", 1), "test")
    assert hub.sweep() == 1
    assert hub.held("old") == []
    assert len(hub.held("fresh")) == 1
    assert hub.bom_count == 1


async def test_number_of_boms_held_is_capped_least_recently_updated_first() -> None:
    cfg = gateway_config(buffer__max_boms=3)
    hub = Hub(cfg, Metrics())
    for i in range(5):
        hub.ingest(make_event(cfg, f"b{i}", 1), "test")
    hub.ingest(make_event(cfg, "b2", 2), "test")  # b2 is now the most recent
    hub.ingest(make_event(cfg, "b5", 1), "test")
    assert {b for b, _, _ in hub.boms()} == {"b4", "b2", "b5"}


async def test_forgetting_a_bom_keeps_its_open_streams_receiving() -> None:
    cfg = gateway_config(buffer__max_boms=1)
    hub = Hub(cfg, Metrics())
    t = RecordingTransport()
    opened = hub.open("watched", OPEN, None, t)
    hub.ingest(make_event(cfg, "watched", 1), "test")
    hub.ingest(make_event(cfg, "other", 1), "test")  # evicts "watched"'s history
    hub.ingest(make_event(cfg, "watched", 2), "test")
    await settle()
    assert opened.sub is not None and opened.sub.reason is None
    wire = b"".join(t.writes)
    assert b"id: watched-e1\n" in wire and b"id: watched-e2\n" in wire


async def test_stream_count_returns_to_zero_after_detach() -> None:
    cfg = gateway_config()
    hub = Hub(cfg, Metrics())
    subs = [hub.open("bom", OPEN, None, RecordingTransport()).sub for _ in range(3)]
    assert hub.stream_count == 3
    for sub in subs:
        assert sub is not None
        hub.detach(sub)
        hub.detach(sub)  # twice is harmless
    assert hub.stream_count == 0
    assert hub.boms() == []


def test_an_accepted_event_carries_its_wire_bytes_as_one_http_chunk() -> None:
    cfg = gateway_config()
    ev = make_event(cfg, "bom", 1)
    size, _, rest = ev.chunk.partition(b"\r\n")
    assert int(size, 16) == len(rest) - 2 and rest.endswith(b"\n\n\r\n")
    assert ev.frame.startswith(b"id: bom-e1\nevent: enrichment.progress\ndata: {")
    assert orjson.loads(ev.data)["event_id"] == "bom-e1"
