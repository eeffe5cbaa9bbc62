"""The postgres history backend against a real PostgreSQL of each test's own."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
import traceback
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import asyncpg
import orjson
import pytest

from bomstream.config import load_config
from bomstream.events import parse_event
from bomstream.history.backend import HistoryBackend, HistoryError
from bomstream.history.postgres import APPLICATION_NAME, PostgresHistory, row_to_event
from tests.pg_proc import PostgresProcess, create_seed_table, insert_rows
from tests.waiting import eventually

if TYPE_CHECKING:
    Conn = asyncpg.Connection[asyncpg.Record]
T0 = datetime(2025, 12, 18, 1, 23, 45, 678901, tzinfo=UTC)
TERMINAL = ("enrichment.completed", "enrichment.failed", "enrichment.error")
ORG = "6f1c2a54-9d0e-4c4b-8a4e-0c8f3b6f2d11"


def backend(url: str, **history: Any) -> PostgresHistory:
    overrides: dict[str, Any] = {"history.backend": "postgres", "history.url": url}
    overrides.update({f"history.{k}": v for k, v in history.items()})
    return PostgresHistory(load_config(path=None, env={}, overrides=overrides, default_file=False))


def row(bom: str, n: int, at: datetime, **extra: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "event_id": str(uuid.uuid4()),
        "event_type": "enrichment.progress",
        "bom_id": bom,
        "tenant_id": ORG,
        "source": "customer",
        "state": {"status": "enriching", "enriched_items": n},
        "created_at": at,
    }
    values.update(extra)
    return values


@pytest.fixture
async def db(postgres_server: PostgresProcess) -> AsyncIterator[Conn]:
    conn = await postgres_server.connect()
    await create_seed_table(conn)
    try:
        yield conn
    finally:
        await conn.close()


@pytest.fixture
async def history(postgres_server: PostgresProcess) -> AsyncIterator[PostgresHistory]:
    h = backend(postgres_server.url())
    try:
        yield h
    finally:
        await h.close()


def decoded(events: list[bytes]) -> list[dict[str, Any]]:
    return [orjson.loads(e) for e in events]


async def history_connections(conn: Conn) -> int:
    count = await conn.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1", APPLICATION_NAME
    )
    assert isinstance(count, int)
    return count


async def history_pids(conn: Conn) -> list[int]:
    rows = await conn.fetch(
        "SELECT pid FROM pg_stat_activity WHERE application_name = $1", APPLICATION_NAME
    )
    return sorted(r["pid"] for r in rows)


def test_it_is_a_history_backend() -> None:
    h = backend("postgresql://u@127.0.0.1:1/db")
    members = [m for m in vars(HistoryBackend) if not m.startswith("_")]
    assert sorted(members) == [
        "close",
        "name",
        "ping",
        "read",
        "read_rows",
        "recent_boms",
        "record",
        "run",
    ]
    assert all(callable(getattr(h, m)) for m in members if m != "name")
    assert h.name == "postgres"


async def test_rows_are_rebuilt_into_the_event_json(db: Conn, history: PostgresHistory) -> None:
    await db.execute("ALTER TABLE enrichment_events ADD COLUMN component TEXT")
    bom, project, user, event_id = (str(uuid.uuid4()) for _ in range(4))
    await insert_rows(
        db,
        [
            {
                "event_id": event_id,
                "event_type": "enrichment.completed",
                "routing_key": "bom.enrichment.completed",
                "bom_id": bom,
                "tenant_id": ORG,
                "project_id": project,
                "user_id": user,
                "source": "staff",
                "workflow_id": "wf-1",
                "workflow_run_id": "run-1",
                "state": {"status": "completed", "percent_complete": 100.0, "nested": None},
                "payload": {"big": 123456789012345678901234567890, "items": [1, "two"]},
                "created_at": T0,
                "component": "MPN-42",
            }
        ],
    )
    # A server whose sessions default to another time zone still gives UTC.
    await db.execute("ALTER DATABASE postgres SET TimeZone = 'Asia/Kolkata'")
    [raw] = await history.read(bom, 10)
    # json, not orjson: it reads the 30-digit integer exactly.
    assert json.loads(raw) == {
        "event_id": event_id,
        "event_type": "enrichment.completed",
        "routing_key": "bom.enrichment.completed",
        "bom_id": bom,
        "organization_id": ORG,
        "project_id": project,
        "user_id": user,
        "source": "staff",
        "workflow_id": "wf-1",
        "workflow_run_id": "run-1",
        # JSON null inside state is kept: only NULL columns are left out.
        "state": {"status": "completed", "percent_complete": 100.0, "nested": None},
        "payload": {"big": 123456789012345678901234567890, "items": [1, "two"]},
        "created_at": "2025-12-18T01:23:45.678Z",
        "component": "MPN-42",
    }
    # What the gateway does with it: the same checks as a live event.
    event = parse_event(raw, bom, max_bytes=65536, terminal_types=TERMINAL)
    assert (event.event_id, event.org, event.terminal) == (event_id, ORG, True)
    assert event.created_at == datetime(2025, 12, 18, 1, 23, 45, 678000, tzinfo=UTC).timestamp()


async def test_null_columns_are_left_out(db: Conn, history: PostgresHistory) -> None:
    bom = str(uuid.uuid4())
    await insert_rows(db, [row(bom, 1, T0)])
    [event] = decoded(await history.read(bom, 10))
    assert set(event) == {
        "event_id",
        "event_type",
        "bom_id",
        "organization_id",
        "source",
        "state",
        "created_at",
    }


async def test_history_order_is_created_at_then_event_id(
    db: Conn, history: PostgresHistory
) -> None:
    bom = str(uuid.uuid4())
    tied = sorted(str(uuid.uuid4()) for _ in range(4))
    rows = [
        row(bom, 9, T0 + timedelta(seconds=2)),
        # Four events in the same microsecond, inserted out of id order.
        *(row(bom, i, T0 + timedelta(seconds=1), event_id=tied[i]) for i in (2, 0, 3, 1)),
        row(bom, 0, T0),
    ]
    await insert_rows(db, rows)
    await insert_rows(db, [row(str(uuid.uuid4()), 5, T0 + timedelta(seconds=1))])
    got = decoded(await history.read(bom, 100))
    expected = sorted(rows, key=lambda r: (r["created_at"], r["event_id"]))
    assert [e["event_id"] for e in got] == [r["event_id"] for r in expected]
    assert [e["event_id"] for e in got][1:5] == tied


async def test_limit_gives_the_latest_events_oldest_first(
    db: Conn, history: PostgresHistory
) -> None:
    bom = str(uuid.uuid4())
    rows = [row(bom, n, T0 + timedelta(milliseconds=n)) for n in range(10)]
    # A tie at the cut: the one with the larger id is the later event.
    low, high = sorted(str(uuid.uuid4()) for _ in range(2))
    rows[6]["event_id"], rows[7]["event_id"] = low, high
    rows[7]["created_at"] = rows[6]["created_at"]
    await insert_rows(db, rows)
    got = decoded(await history.read(bom, 4))
    assert [e["state"]["enriched_items"] for e in got] == [6, 7, 8, 9]
    assert [e["event_id"] for e in got] == [r["event_id"] for r in rows[6:]]
    got = decoded(await history.read(bom, 3))
    assert [e["event_id"] for e in got] == [r["event_id"] for r in rows[7:]]
    assert await history.read(bom, 0) == []
    assert len(await history.read(bom, 1000)) == 10


async def plan_nodes(conn: Conn, query: str, *args: Any) -> list[dict[str, Any]]:
    """Every node of the executed plan (EXPLAIN ANALYZE), depth first."""
    text = await conn.fetchval("EXPLAIN (ANALYZE, FORMAT JSON) " + query, *args)
    assert isinstance(text, str)
    nodes, todo = [], [json.loads(text)[0]["Plan"]]
    while todo:
        node = todo.pop()
        nodes.append(node)
        todo.extend(node.get("Plans", []))
    return nodes


def index_walk(nodes: list[dict[str, Any]]) -> dict[str, Any] | None:
    for node in nodes:
        if node["Node Type"] == "Index Scan" and node["Index Name"] == "idx_enrichment_events_bom":
            return node
    return None


async def test_the_read_uses_the_bom_index(db: Conn, history: PostgresHistory) -> None:
    # Enough rows that a scan would be far costlier than the index: 200 BOMs
    # of 200 events each.
    await db.execute(
        """
        INSERT INTO enrichment_events (event_type, bom_id, tenant_id, source, state, created_at)
        SELECT 'enrichment.progress',
               ('00000000-0000-4000-8000-' || lpad((g % 200)::text, 12, '0'))::uuid,
               $1::uuid, 'customer', jsonb_build_object('n', g),
               timestamptz '2025-12-18' + g * interval '1 second'
        FROM generate_series(1, 40000) AS g
        """,
        ORG,
    )
    await db.execute("ANALYZE enrichment_events")
    bom = "00000000-0000-4000-8000-000000000007"
    assert len(await history.read(bom, 50)) == 50

    # A prepared statement may switch to a generic plan: both must walk the
    # index from the newest row and stop near the limit, not read the BOM's
    # 200 rows and sort them.
    for mode in ("force_custom_plan", "force_generic_plan"):
        await db.execute(f"SET plan_cache_mode = {mode}")
        nodes = await plan_nodes(db, history.query, bom, 50)
        walk = index_walk(nodes)
        assert walk is not None, (mode, nodes)
        assert walk["Scan Direction"] == "Forward" and walk["Actual Rows"] <= 60, (mode, walk)
        assert all(n["Node Type"] != "Seq Scan" for n in nodes)
    await db.execute("RESET plan_cache_mode")

    # The check can fail: without the index, the same query scans the table.
    tx = db.transaction()
    await tx.start()
    await db.execute("DROP INDEX idx_enrichment_events_bom")
    nodes = await plan_nodes(db, history.query, bom, 50)
    await tx.rollback()
    assert index_walk(nodes) is None
    assert any(n["Node Type"] == "Seq Scan" for n in nodes)


async def test_a_bom_id_that_is_not_a_uuid_has_no_rows(db: Conn, history: PostgresHistory) -> None:
    bom = str(uuid.uuid4())
    await insert_rows(db, [row(bom, 1, T0)])
    assert await history.read("bom-1", 10) == []
    assert await history.read("x" * 128, 10) == []
    # Another spelling of the same uuid is not the channel the workers use.
    assert await history.read(bom.upper(), 10) == []
    assert await history.read(bom.replace("-", ""), 10) == []
    assert len(await history.read(bom, 10)) == 1


async def test_a_text_bom_id_column_takes_any_id(postgres_server: PostgresProcess) -> None:
    conn = await postgres_server.connect()
    try:
        await conn.execute(
            "CREATE SCHEMA jobs; CREATE TABLE jobs.events (event_id TEXT PRIMARY KEY,"
            " event_type TEXT NOT NULL, bom_id TEXT NOT NULL, tenant_id TEXT,"
            " state JSONB NOT NULL, created_at TIMESTAMPTZ NOT NULL)"
        )
        await insert_rows(
            conn,
            [
                {"event_id": "e1", "event_type": "enrichment.progress", "bom_id": "bom-1",
                 "state": {"n": 1}, "created_at": T0},
            ],
            table="jobs.events",
        )  # fmt: skip
    finally:
        await conn.close()
    h = backend(postgres_server.url(), table="jobs.events")
    try:
        [event] = decoded(await h.read("bom-1", 10))
        assert event == {
            "event_id": "e1",
            "event_type": "enrichment.progress",
            "bom_id": "bom-1",
            "state": {"n": 1},
            "created_at": "2025-12-18T01:23:45.678Z",
        }
        assert await h.read("bom-2", 10) == []
    finally:
        await h.close()


async def test_a_missing_table_is_a_history_error(postgres_server: PostgresProcess) -> None:
    h = backend(postgres_server.url(), table="no_such_table")
    try:
        with pytest.raises(HistoryError, match=r'relation "no_such_table" does not exist'):
            await h.read(str(uuid.uuid4()), 10)
    finally:
        await h.close()


async def test_a_read_past_the_statement_timeout_is_a_history_error(
    postgres_server: PostgresProcess, db: Conn
) -> None:
    bom = str(uuid.uuid4())
    await insert_rows(db, [row(bom, 1, T0)])
    # statement_timeout 2 s, the client's deadline 2.5 s: the server cancels first.
    h = backend(postgres_server.url(), timeout_s=2.5)
    try:
        assert len(await h.read(bom, 10)) == 1
        before = await history_pids(db)
        # Another session holds the table: the read waits on the lock until the
        # server's statement_timeout cancels it.
        async with db.transaction():
            await db.execute("LOCK TABLE enrichment_events IN ACCESS EXCLUSIVE MODE")
            with pytest.raises(HistoryError, match="statement timeout") as caught:
                await h.read(bom, 10)
            assert "SQLSTATE 57014" in str(caught.value)
        # The server cancelled cleanly: the same connection answers again.
        assert len(await h.read(bom, 10)) == 1
        assert await history_pids(db) == before and len(before) == 1
    finally:
        await h.close()


async def test_a_slow_view_past_the_statement_timeout_is_a_history_error(
    postgres_server: PostgresProcess, db: Conn
) -> None:
    await db.execute(
        "CREATE VIEW sleepy AS SELECT e.* FROM enrichment_events e, (SELECT pg_sleep(30)) AS s"
    )
    bom = str(uuid.uuid4())
    await insert_rows(db, [row(bom, 1, T0)])
    h = backend(postgres_server.url(), table="sleepy", timeout_s=2.5)
    try:
        with pytest.raises(HistoryError, match="statement timeout"):
            await h.read(bom, 10)
    finally:
        await h.close()


@pytest.fixture
def thaw() -> Iterator[list[int]]:
    """Pids a test froze with SIGSTOP; always continued afterwards."""
    frozen: list[int] = []
    try:
        yield frozen
    finally:
        for pid in frozen:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


async def test_a_backend_that_does_not_answer_is_bounded_client_side(
    postgres_server: PostgresProcess, db: Conn, thaw: list[int]
) -> None:
    bom = str(uuid.uuid4())
    await insert_rows(db, [row(bom, 1, T0)])
    h = backend(postgres_server.url(), timeout_s=1)
    try:
        assert len(await h.read(bom, 10)) == 1
        [pid] = await history_pids(db)
        # A frozen backend cannot even run its statement_timeout.
        os.kill(pid, signal.SIGSTOP)
        thaw.append(pid)
        with pytest.raises(HistoryError, match=r"no answer from 127\.0\.0\.1"):
            await h.read(bom, 10)
        os.kill(pid, signal.SIGCONT)
        # That connection was given up; a new one answers.
        assert len(await h.read(bom, 10)) == 1

        pids = await eventually(lambda: history_pids(db), lambda pids: pid not in pids)
        assert len(pids) == 1
    finally:
        await h.close()


async def test_a_server_that_does_not_accept_is_bounded_at_connect(
    postgres_server: PostgresProcess, thaw: list[int]
) -> None:
    h = backend(postgres_server.url(), timeout_s=1)
    try:
        # The kernel still completes the TCP handshake; nobody answers after it.
        os.kill(postgres_server.pid, signal.SIGSTOP)
        thaw.append(postgres_server.pid)
        with pytest.raises(HistoryError, match=r"no answer from 127\.0\.0\.1"):
            await h.read(str(uuid.uuid4()), 10)
        with pytest.raises(HistoryError, match="no answer"):
            await h.ping()
        os.kill(postgres_server.pid, signal.SIGCONT)
        await h.ping()
    finally:
        await h.close()


async def test_a_stopped_server_fails_fast_and_the_pool_recovers(
    postgres_server: PostgresProcess, db: Conn
) -> None:
    bom = str(uuid.uuid4())
    await insert_rows(db, [row(bom, 1, T0)])
    await db.close()
    # A long timeout: a refused connection must not wait it out.
    h = backend(postgres_server.url(), timeout_s=60)
    try:
        assert len(await h.read(bom, 10)) == 1
        postgres_server.stop()
        started = time.monotonic()
        with pytest.raises(HistoryError, match=r"cannot connect to 127\.0\.0\.1:\d+"):
            await h.read(bom, 10)
        assert time.monotonic() - started < 30
        postgres_server.start()
        assert len(await h.read(bom, 10)) == 1

        # Restarted between two reads: the pooled connection is dead, and the
        # read retries once on a new one instead of failing.
        postgres_server.restart()
        assert len(await h.read(bom, 10)) == 1

        # A crash (every process killed at once) is the same.
        postgres_server.kill()
        with pytest.raises(HistoryError, match="cannot connect"):
            await h.read(bom, 10)
        postgres_server.start()
        assert len(await h.read(bom, 10)) == 1
    finally:
        await h.close()


async def test_ping(postgres_server: PostgresProcess, history: PostgresHistory) -> None:
    await history.ping()
    postgres_server.stop()
    with pytest.raises(HistoryError, match="cannot connect"):
        await history.ping()
    postgres_server.start()
    await history.ping()


PASSWORD = "s3cret/Pa:ss@word"


async def test_the_password_never_appears_in_a_history_error(
    postgres_server: PostgresProcess, db: Conn
) -> None:
    await db.execute(f"CREATE ROLE reader LOGIN PASSWORD '{PASSWORD}'")
    await db.execute("GRANT SELECT ON enrichment_events TO reader")
    bom = str(uuid.uuid4())
    await insert_rows(db, [row(bom, 1, T0)])
    postgres_server.set_hba(
        [
            "host all reader 127.0.0.1/32 scram-sha-256",
            "host all all 127.0.0.1/32 trust",
            "local all all trust",
        ]
    )
    good = postgres_server.url(user="reader", password=quote(PASSWORD, safe=""))
    wrong = postgres_server.url(user="reader", password=quote(PASSWORD + "x", safe=""))

    def leak_free(exc: HistoryError, *secrets: str) -> None:
        text = "".join(traceback.format_exception(exc)) + repr(exc)
        for s in secrets:
            assert s not in text and quote(s, safe="") not in text, text

    # The server reads pg_hba.conf on SIGHUP; wait until the password is required.
    async def attempt() -> str:
        h = backend(wrong)
        try:
            await h.read(bom, 10)
            return "read"
        except HistoryError as exc:
            leak_free(exc, PASSWORD, PASSWORD + "x")
            return str(exc)
        finally:
            await h.close()

    failure = await eventually(attempt, lambda r: r != "read", timeout=10)
    assert 'password authentication failed for user "reader"' in failure

    h = backend(good, timeout_s=1)
    try:
        assert len(await h.read(bom, 10)) == 1
        async with db.transaction():
            await db.execute("LOCK TABLE enrichment_events IN ACCESS EXCLUSIVE MODE")
            with pytest.raises(HistoryError) as caught:
                await h.read(bom, 10)
            leak_free(caught.value, PASSWORD)
        await db.close()
        postgres_server.stop()
        with pytest.raises(HistoryError) as caught:
            await h.read(bom, 10)
        leak_free(caught.value, PASSWORD)
    finally:
        await h.close()

    # A password in the query string is masked too.
    in_query = f"postgresql://reader@127.0.0.1:1/postgres?password={quote(PASSWORD, safe='')}"
    h = backend(in_query)
    try:
        with pytest.raises(HistoryError) as caught:
            await h.read(bom, 10)
        leak_free(caught.value, PASSWORD)
    finally:
        await h.close()


async def test_the_pool_never_exceeds_pool_size(postgres_server: PostgresProcess, db: Conn) -> None:
    await db.execute(
        "CREATE VIEW slow AS SELECT e.* FROM enrichment_events e, (SELECT pg_sleep(0.1)) AS s"
    )
    bom = str(uuid.uuid4())
    await insert_rows(db, [row(bom, 1, T0)])
    h = backend(postgres_server.url(), table="slow", pool_size=3, timeout_s=30)
    seen: list[int] = []
    done = asyncio.Event()

    async def sample() -> None:
        while not done.is_set():
            seen.append(await history_connections(db))
            await asyncio.sleep(0.01)

    try:
        sampler = asyncio.create_task(sample())
        results = await asyncio.gather(*(h.read(bom, 10) for _ in range(20)))
        done.set()
        await sampler
        assert [len(r) for r in results] == [1] * 20
        assert max(seen) <= 3
        # The reads did overlap: all three connections were opened, and stay.
        assert await history_connections(db) == 3
    finally:
        await h.close()


async def test_run_owns_the_pool_and_close_is_idempotent(
    postgres_server: PostgresProcess, db: Conn
) -> None:
    bom = str(uuid.uuid4())
    await insert_rows(db, [row(bom, 1, T0)])
    h = backend(postgres_server.url())
    owner = asyncio.create_task(h.run())
    await h.read(bom, 10)
    assert await history_connections(db) == 1
    owner.cancel()
    with pytest.raises(asyncio.CancelledError):
        await owner
    await eventually(lambda: history_connections(db), lambda n: n == 0)
    with pytest.raises(HistoryError, match="closed"):
        await h.read(bom, 10)
    await h.close()
    await h.close()


async def test_record_writes_nothing(db: Conn, history: PostgresHistory) -> None:
    bom = str(uuid.uuid4())
    raw = orjson.dumps({"event_id": "e1", "event_type": "enrichment.progress", "bom_id": bom})
    history.record(parse_event(raw, bom, max_bytes=65536, terminal_types=TERMINAL))
    assert await history.read(bom, 10) == []
    assert await db.fetchval("SELECT count(*) FROM enrichment_events") == 0


def test_row_to_event_maps_created_at_to_utc_milliseconds() -> None:
    event = row_to_event('{"tenant_id": "o", "created_at": "2025-12-18T03:23:45.6789+02:00"}')
    assert event == {"organization_id": "o", "created_at": "2025-12-18T01:23:45.678Z"}
    assert row_to_event('{"created_at": "2025-12-18T01:23:45"}') == {
        "created_at": "2025-12-18T01:23:45.000Z"
    }
    assert row_to_event('{"created_at": "infinity"}') == {"created_at": "infinity"}


def test_a_message_that_would_carry_the_password_is_masked() -> None:
    h = backend(f"postgresql://reader:{quote(PASSWORD, safe='')}@db.internal:6432/app")
    message = h._describe(OSError(f"odd driver text with {PASSWORD} and {quote(PASSWORD)}"))
    assert PASSWORD not in message and quote(PASSWORD) not in message
    assert message.startswith("postgres history: cannot connect to db.internal:6432 (")


def test_the_readme_shows_the_query_that_runs() -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme[readme.index("### History in PostgreSQL") :]
    block = section[section.index("```sql") + 6 : section.index("```", section.index("```sql") + 6)]
    shown = " ".join(block.split()).replace("( ", "(").replace(" )", ")")
    assert shown == backend("postgresql://u@127.0.0.1:1/db").query


async def test_sessions_are_read_only_with_the_statement_timeout(
    postgres_server: PostgresProcess, db: Conn
) -> None:
    # A view that reports the reading session's own settings as columns.
    await db.execute(
        "CREATE VIEW probe AS SELECT e.*,"
        " current_setting('statement_timeout') AS statement_timeout,"
        " current_setting('transaction_read_only') AS read_only,"
        " current_setting('TimeZone') AS time_zone FROM enrichment_events e"
    )
    bom = str(uuid.uuid4())
    await insert_rows(db, [row(bom, 1, T0)])
    h = backend(postgres_server.url(), table="probe", timeout_s=2.5)
    try:
        [event] = decoded(await h.read(bom, 10))
    finally:
        await h.close()
    assert (event["statement_timeout"], event["read_only"], event["time_zone"]) == (
        "2s",
        "on",
        "UTC",
    )
