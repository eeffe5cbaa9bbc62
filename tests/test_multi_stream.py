"""Several BOMs on one connection (spec section 9), on a real listening gateway."""

from __future__ import annotations

import asyncio
import json
import random

import aiohttp

from tests.authkit import ADMIN, SECRET, org_token
from tests.conftest import StartGateway, publish
from tests.multi_kit import by_bom, connected, nothing_more, open_multi, read_events

COMPLETED = "enrichment.completed"


def event(bom_id: str, n: int, **extra: object) -> dict[str, object]:
    body: dict[str, object] = {
        "event_id": f"{bom_id}-e{n}",
        "event_type": "enrichment.progress",
        "state": {"enriched_items": n, "total_items": 20},
    }
    body.update(extra)
    return body


async def publish_runs(
    http: aiohttp.ClientSession,
    base: str,
    runs: dict[str, list[dict[str, object]]],
    token: str | None = None,
) -> None:
    """Each BOM's events in order, the BOMs interleaved at random."""
    queues = {b: list(evs) for b, evs in runs.items()}
    rng = random.Random(7)
    while queues:
        bom_id = rng.choice(sorted(queues))
        await publish(http, base, bom_id, queues[bom_id].pop(0), token=token)
        if not queues[bom_id]:
            del queues[bom_id]


async def test_thirty_boms_on_one_connection_each_complete_and_in_order(
    gateway_factory: StartGateway, http: aiohttp.ClientSession
) -> None:
    gw = await gateway_factory()
    boms = [f"bom-{i:02d}" for i in range(30)]
    runs = {b: [event(b, n) for n in range(1, 11)] for b in boms}
    # bom-00 finishes half-way; its terminal event must not end the stream.
    runs["bom-00"] = [*runs["bom-00"][:5], event("bom-00", 6, event_type=COMPLETED)]
    async with open_multi(http, gw.url, boms) as s:
        hello = await connected(s)
        assert hello["bom_ids"] == boms
        assert hello["resumed"] is False and hello["gaps"] == []
        total = sum(len(v) for v in runs.values())
        reading = asyncio.create_task(read_events(s, total))
        await publish_runs(http, gw.url, runs)
        frames = await reading
        got = by_bom(frames)
        assert got == {b: [e["event_id"] for e in runs[b]] for b in boms}
        # Every id is a cursor, and every frame names its BOM.
        assert all(f.id and len(f.id.encode()) <= 512 for f in frames)
        # Still open after bom-00's terminal event: a later run of it arrives too.
        await publish(http, gw.url, "bom-00", event("bom-00", 7))
        (late,) = await read_events(s, 1)
        assert json.loads(late.data)["event_id"] == "bom-00-e7"
    metrics = await (await http.get(gw.url + "/metrics")).text()
    assert 'bomstream_streams_by_kind{kind="multi"}' in metrics


async def test_resume_with_the_last_id_gets_every_missed_event_of_every_bom_once(
    gateway_factory: StartGateway, http: aiohttp.ClientSession
) -> None:
    gw = await gateway_factory()
    boms = ["a", "b", "c"]
    first = {b: [event(b, n) for n in range(1, 4)] for b in boms}
    later = {b: [event(b, n) for n in range(4, 9)] for b in boms}
    async with open_multi(http, gw.url, boms) as s:
        await connected(s)
        reading = asyncio.create_task(read_events(s, 9))
        await publish_runs(http, gw.url, first)
        frames = await reading
        last_id = frames[-1].id
    await publish_runs(http, gw.url, later)
    async with open_multi(http, gw.url, boms, last_event_id=last_id) as s:
        hello = await connected(s)
        assert hello["resumed"] is True and hello["gaps"] == []
        missed = await read_events(s, 15)
        assert by_bom(missed) == {b: [e["event_id"] for e in later[b]] for b in boms}
        # Nothing more: no event was sent twice.
        await nothing_more(s)
    # The catch-up ended on the newest event, so resuming from it is exact too.
    async with open_multi(http, gw.url, boms, last_event_id=missed[-1].id) as s:
        hello = await connected(s)
        assert hello["resumed"] is True
        await publish(http, gw.url, "b", event("b", 9))
        (only,) = await read_events(s, 1)
        assert json.loads(only.data)["event_id"] == "b-e9"


async def test_an_unplaceable_cursor_gives_snapshots_and_names_the_gaps(
    gateway_factory: StartGateway, http: aiohttp.ClientSession
) -> None:
    gw = await gateway_factory(buffer__events_per_bom=3)
    for n in range(1, 3):
        await publish(http, gw.url, "a", event("a", n))
        await publish(http, gw.url, "b", event("b", n))
    async with open_multi(http, gw.url, ["a", "b"]) as s:
        await connected(s)
        frames = await read_events(s, 2)
        old = frames[-1].id
    # "a" moves on past its buffer: its position is gone; "b" is untouched.
    for n in range(3, 8):
        await publish(http, gw.url, "a", event("a", n))
    async with open_multi(http, gw.url, ["a", "b"], last_event_id=old) as s:
        hello = await connected(s)
        assert hello["resumed"] is False
        assert hello["gaps"] == ["a"]
        (snap,) = await read_events(s, 1)
        assert json.loads(snap.data)["event_id"] == "a-e7"
    for junk in ("not-a-cursor", "1/a/never-published", "1/zz/zz-e1"):
        async with open_multi(http, gw.url, ["a", "b"], last_event_id=junk) as s:
            hello = await connected(s)
            assert hello["resumed"] is False and sorted(hello["gaps"]) == ["a", "b"], junk
            assert by_bom(await read_events(s, 2)) == {"a": ["a-e7"], "b": ["b-e2"]}


async def test_a_finished_list_is_never_answered_204_and_stays_open(
    gateway_factory: StartGateway, http: aiohttp.ClientSession
) -> None:
    gw = await gateway_factory()
    await publish(http, gw.url, "done", event("done", 1, event_type=COMPLETED))
    async with open_multi(http, gw.url, ["done"]) as s:
        await connected(s)
        (terminal,) = await read_events(s, 1)
    async with open_multi(http, gw.url, ["done"], last_event_id=terminal.id) as s:
        hello = await connected(s)
        assert hello["resumed"] is True
        await publish(http, gw.url, "done", event("done", 2))
        (again,) = await read_events(s, 1)
        assert json.loads(again.data)["event_id"] == "done-e2"


async def test_org_scope_sees_only_its_org_including_boms_that_start_later(
    gateway_factory: StartGateway, http: aiohttp.ClientSession
) -> None:
    gw = await gateway_factory(auth__jwt_secret=SECRET, auth__admin_token=ADMIN)
    await publish(http, gw.url, "a-old", event("a-old", 1, organization_id="org-a"), token=ADMIN)
    await publish(http, gw.url, "b-old", event("b-old", 1, organization_id="org-b"), token=ADMIN)
    runs = {
        **{
            f"a-{i}": [event(f"a-{i}", n, organization_id="org-a") for n in range(5)]
            for i in range(4)
        },
        **{
            f"b-{i}": [event(f"b-{i}", n, organization_id="org-b") for n in range(5)]
            for i in range(4)
        },
    }
    async with (
        open_multi(http, gw.url, None, token=org_token("org-a")) as sa,
        open_multi(http, gw.url, None, token=org_token("org-b")) as sb,
        open_multi(http, gw.url, None, token=ADMIN) as sall,
    ):
        for s in (sa, sb, sall):
            hello = await connected(s)
            assert hello["scope"] == "org" and "bom_ids" not in hello
        # Catch-up: each org's snapshot of what it had before.
        assert by_bom(await read_events(sa, 1)) == {"a-old": ["a-old-e1"]}
        assert by_bom(await read_events(sb, 1)) == {"b-old": ["b-old-e1"]}
        assert set(by_bom(await read_events(sall, 2))) == {"a-old", "b-old"}
        # Both orgs publish at once, to BOMs that did not exist when the streams opened.
        await asyncio.gather(
            publish_runs(http, gw.url, {k: v for k, v in runs.items() if k[0] == "a"}, ADMIN),
            publish_runs(http, gw.url, {k: v for k, v in runs.items() if k[0] == "b"}, ADMIN),
        )
        got_a = by_bom(await read_events(sa, 20))
        got_b = by_bom(await read_events(sb, 20))
        got_all = by_bom(await read_events(sall, 40))
        assert got_a == {k: [e["event_id"] for e in v] for k, v in runs.items() if k[0] == "a"}
        assert got_b == {k: [e["event_id"] for e in v] for k, v in runs.items() if k[0] == "b"}
        assert got_all == {k: [e["event_id"] for e in v] for k, v in runs.items()}
        # And nothing foreign after them.
        await nothing_more(sa, 0.3)
