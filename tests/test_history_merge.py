"""Unit tests of Hub.merge_history: history and live events merged by event_id,
so that catch-up and live never overlap or leave a gap, whichever arrives first."""

from __future__ import annotations

import orjson

from bomstream.events import Event
from bomstream.hub import Hub
from bomstream.metrics import Metrics
from bomstream.principal import OPEN, Principal
from tests.conftest import gateway_config
from tests.test_hub import RecordingTransport, make_event, settle

CFG = gateway_config()


def ev(n: int, **extra: object) -> Event:
    return make_event(CFG, "bom", n, **extra)


def done(**extra: object) -> Event:
    return make_event(CFG, "bom", 99, event_type="enrichment.completed", **extra)


def ids_written(t: RecordingTransport) -> list[str]:
    out = []
    for blob in t.writes:
        for line in bytes(blob).split(b"\n"):
            if line.startswith(b"id: "):
                out.append(line[4:].decode())
    return out


def ends_written(t: RecordingTransport) -> list[str]:
    out = []
    for blob in t.writes:
        for line in bytes(blob).split(b"\n"):
            if line.startswith(b"data: ") and b'"stream_end"' in line:
                out.append(orjson.loads(line[6:])["reason"])
    return out


async def test_a_fresh_instance_resumes_from_history_and_a_late_live_copy_is_not_sent_again() -> (
    None
):
    hub = Hub(CFG, Metrics())
    assert hub.needs_history("bom")
    hub.merge_history("bom", [ev(1), ev(2), ev(3), ev(4), ev(5)])
    assert not hub.needs_history("bom")
    t = RecordingTransport()
    opened = hub.open("bom", OPEN, "bom-e2", t)
    assert opened.resumed
    t.write(opened.initial)
    # Event 5 was stored before its PUBLISH reached this instance.
    assert hub.ingest(ev(5), "redis") is False
    hub.ingest(ev(6), "redis")
    await settle()
    assert ids_written(t) == ["bom-e3", "bom-e4", "bom-e5", "bom-e6"]


async def test_streams_open_before_the_merge_get_events_stored_ahead_of_their_live_copy() -> None:
    hub = Hub(CFG, Metrics())
    early = RecordingTransport()
    hub.open("bom", OPEN, None, early)  # history was unreachable at the time
    hub.ingest(ev(3), "redis")
    hub.ingest(ev(4), "redis")
    await settle()
    # History: 1 and 2 from before this instance started, 5 committed ahead of its PUBLISH.
    hub.merge_history("bom", [ev(1), ev(2), ev(3), ev(4), ev(5)])
    assert [e.event_id for e in hub.held("bom")] == [f"bom-e{n}" for n in range(1, 6)]
    late = RecordingTransport()
    opened = hub.open("bom", OPEN, "bom-e4", late)
    late.write(opened.initial)
    hub.ingest(ev(5), "redis")  # the live copy arrives
    hub.ingest(ev(6), "redis")
    await settle()
    assert ids_written(early) == ["bom-e3", "bom-e4", "bom-e5", "bom-e6"]
    assert ids_written(late) == ["bom-e5", "bom-e6"]
    # A second copy of 5 is an ordinary duplicate now.
    hub.ingest(ev(5), "redis")
    await settle()
    assert ids_written(early).count("bom-e5") == 1


async def test_a_row_committed_after_its_live_event_changes_nothing() -> None:
    hub = Hub(CFG, Metrics())
    for n in (1, 2, 3):
        hub.ingest(ev(n), "redis")
    await settle()
    hub.merge_history("bom", [ev(1), ev(2)])
    assert [e.event_id for e in hub.held("bom")] == ["bom-e1", "bom-e2", "bom-e3"]
    t = RecordingTransport()
    opened = hub.open("bom", OPEN, "bom-e1", t)
    t.write(opened.initial)
    assert ids_written(t) == ["bom-e2", "bom-e3"]


async def test_history_older_than_everything_received_live_goes_first() -> None:
    hub = Hub(CFG, Metrics())
    hub.ingest(ev(7), "redis")
    await settle()
    hub.merge_history("bom", [ev(1), ev(2)])
    assert [e.event_id for e in hub.held("bom")] == ["bom-e1", "bom-e2", "bom-e7"]
    t = RecordingTransport()
    opened = hub.open("bom", OPEN, None, t)
    t.write(opened.initial)
    assert ids_written(t) == ["bom-e7"]  # the snapshot is still the latest


async def test_a_job_that_finished_before_the_instance_started() -> None:
    hub = Hub(CFG, Metrics())
    hub.merge_history("bom", [ev(1), ev(2), done()])
    assert hub.check_access("bom", OPEN, "bom-e99") == "finished"
    assert hub.check_access("bom", OPEN, "bom-e1") == "ok"
    t = RecordingTransport()
    opened = hub.open("bom", OPEN, None, t)
    assert opened.sub is None and opened.end_reason == "enrichment.completed"
    t.write(opened.initial)
    assert ids_written(t) == ["bom-e99"]
    assert ends_written(t) == ["enrichment.completed"]


async def test_history_decides_the_owning_org() -> None:
    hub = Hub(CFG, Metrics())
    hub.merge_history("bom", [ev(1, organization_id="org-a"), ev(2, organization_id="org-a")])
    other = Principal(kind="jwt", org="org-b")
    mine = Principal(kind="jwt", org="org-a")
    assert hub.owner("bom") == "org-a"
    assert hub.check_access("bom", other, None) == "forbidden"
    assert hub.check_access("bom", mine, None) == "ok"


async def test_an_empty_history_for_an_unknown_bom_creates_nothing() -> None:
    hub = Hub(CFG, Metrics())
    hub.merge_history("bom", [])
    assert not hub.knows("bom")
    assert hub.needs_history("bom")


async def test_a_late_terminal_copy_ends_the_streams_that_were_open_before_the_merge() -> None:
    hub = Hub(CFG, Metrics())
    early = RecordingTransport()
    opened = hub.open("bom", OPEN, None, early)
    assert opened.sub is not None
    hub.ingest(ev(1), "redis")
    await settle()
    hub.merge_history("bom", [ev(1), done()])
    hub.ingest(done(), "redis")
    await settle()
    assert ids_written(early) == ["bom-e1", "bom-e99"]
    assert ends_written(early) == ["enrichment.completed"]
    assert opened.sub.reason == "enrichment.completed"
