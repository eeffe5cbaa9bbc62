"""Unit tests of the merge by event_id and of the re-sync after a lapsed
subscription: streams open across the lapse get what they missed, in order,
before what was held back, and nothing twice."""

from __future__ import annotations

from bomstream.events import Event
from bomstream.hub import Hub
from bomstream.merge import interleave
from bomstream.metrics import Metrics
from bomstream.principal import OPEN
from tests.conftest import gateway_config
from tests.test_history_merge import done, ends_written, ev, ids_written
from tests.test_hub import RecordingTransport, settle

CFG = gateway_config()


def ids(events: list[Event]) -> list[str]:
    return [e.event_id for e in events]


def test_interleave_keeps_history_order_and_places_buffer_only_events_after_their_predecessor() -> (
    None
):
    held = [ev(2), ev(90), ev(3), ev(5)]  # 90: only this process got it, after 2
    history = [ev(1), ev(2), ev(3), ev(4), ev(5), ev(6)]
    merged, added = interleave(held, history, disjoint_newer=False)
    assert ids(merged) == [f"bom-e{n}" for n in (1, 2, 90, 3, 4, 5, 6)]
    assert ids(added) == ["bom-e1", "bom-e4", "bom-e6"]
    # The held objects are kept (they carry the buffer's state), not history's copies.
    assert merged[1] is held[0]


def test_interleave_without_a_common_event_puts_history_first_or_last() -> None:
    held, history = [ev(7), ev(8)], [ev(1), ev(2)]
    before, _ = interleave(held, history, disjoint_newer=False)
    after, _ = interleave(held, history, disjoint_newer=True)
    assert ids(before) == ["bom-e1", "bom-e2", "bom-e7", "bom-e8"]
    assert ids(after) == ["bom-e7", "bom-e8", "bom-e1", "bom-e2"]


def test_interleave_keeps_each_event_once_whatever_the_orders_say() -> None:
    held = [ev(2), ev(1), ev(9)]
    history = [ev(1), ev(2), ev(2), ev(3)]
    merged, added = interleave(held, history, disjoint_newer=False)
    assert sorted(ids(merged)) == sorted({"bom-e1", "bom-e2", "bom-e3", "bom-e9"})
    assert ids(added) == ["bom-e3"]


async def test_streams_open_across_a_lapse_get_the_gap_then_the_held_back_events_in_order() -> None:
    hub = Hub(CFG, Metrics())
    t = RecordingTransport()
    hub.open("bom", OPEN, None, t)
    for n in (1, 2):
        hub.ingest(ev(n), "redis")
    await settle()
    hub.begin_resync("bom")  # the subscription lapsed: 3 and 4 are published meanwhile
    assert hub.needs_history("bom") and hub.resyncing("bom")
    hub.ingest(ev(5), "redis")  # live again: held back
    await settle()
    assert ids_written(t) == ["bom-e1", "bom-e2"]
    hub.merge_history("bom", [ev(n) for n in (1, 2, 3, 4, 5)])
    assert not hub.resyncing("bom") and not hub.needs_history("bom")
    assert ids_written(t) == [f"bom-e{n}" for n in (1, 2, 3, 4, 5)]
    # Late live copies of the gap are duplicates now; what follows is live as usual.
    assert hub.ingest(ev(4), "redis") is False
    hub.ingest(ev(6), "redis")
    await settle()
    assert ids_written(t) == [f"bom-e{n}" for n in range(1, 7)]
    assert [e.event_id for e in hub.held("bom")] == [f"bom-e{n}" for n in range(1, 7)]


async def test_a_stream_that_opens_during_the_wait_is_not_sent_the_held_back_events_again() -> None:
    hub = Hub(CFG, Metrics())
    early = RecordingTransport()
    hub.open("bom", OPEN, None, early)
    hub.ingest(ev(1), "redis")
    await settle()
    hub.begin_resync("bom")
    hub.ingest(ev(3), "redis")
    await settle()
    late = RecordingTransport()
    opened = hub.open("bom", OPEN, "bom-e1", late)
    late.write(opened.initial)
    assert ids_written(late) == ["bom-e3"]
    hub.merge_history("bom", [ev(1), ev(2), ev(3)])
    assert ids_written(early) == ["bom-e1", "bom-e2", "bom-e3"]
    assert ids_written(late) == ["bom-e3"]


async def test_history_that_cannot_be_read_releases_the_held_back_events() -> None:
    metrics = Metrics()
    hub = Hub(CFG, metrics)
    t = RecordingTransport()
    hub.open("bom", OPEN, None, t)
    hub.begin_resync("bom")
    hub.ingest(ev(1), "redis")
    await settle()
    assert ids_written(t) == []
    hub.end_resync("bom")
    assert ids_written(t) == ["bom-e1"]
    assert hub.needs_history("bom")  # read again on the next request
    assert metrics.redis_resyncs.labels("unfilled")._value.get() == 1


async def test_a_terminal_event_in_the_gap_ends_the_waiting_streams_there() -> None:
    hub = Hub(CFG, Metrics())
    t = RecordingTransport()
    opened = hub.open("bom", OPEN, None, t)
    assert opened.sub is not None
    hub.ingest(ev(1), "redis")
    await settle()
    hub.begin_resync("bom")
    hub.merge_history("bom", [ev(1), done(), ev(100)])
    assert ids_written(t) == ["bom-e1", "bom-e99"]
    assert ends_written(t) == ["enrichment.completed"]
    assert opened.sub.reason == "enrichment.completed"


async def test_a_lapse_without_streams_only_marks_the_buffer_stale() -> None:
    hub = Hub(CFG, Metrics())
    hub.ingest(ev(1), "redis")
    hub.merge_history("bom", [ev(1)])
    assert not hub.needs_history("bom")
    hub.begin_resync("bom")
    assert hub.needs_history("bom") and not hub.resyncing("bom")
    # An interest-mode read that found nothing leaves a known, empty, complete BOM...
    hub.merge_history("other", [], complete=True)
    assert hub.knows("other") and not hub.needs_history("other")
    # ...which a lapse forgets altogether.
    hub.begin_resync("other")
    assert not hub.knows("other")


async def test_the_last_stream_leaving_during_the_wait_ends_it() -> None:
    hub = Hub(CFG, Metrics())
    t = RecordingTransport()
    opened = hub.open("bom", OPEN, None, t)
    assert opened.sub is not None
    hub.ingest(ev(1), "redis")
    await settle()
    hub.begin_resync("bom")
    hub.ingest(ev(2), "redis")
    hub.detach(opened.sub)
    assert not hub.resyncing("bom")
    # A stream opened afterwards gets live events at once.
    t2 = RecordingTransport()
    hub.open("bom", OPEN, None, t2)
    hub.ingest(ev(3), "redis")
    await settle()
    assert ids_written(t2)[-1] == "bom-e3"
