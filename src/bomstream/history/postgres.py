"""History read from the workers' PostgreSQL table (``history.table``).

The workers insert one row per event; this backend only reads. One query per
read, on the ``(bom_id, created_at)`` index: the BOM's latest ``limit`` rows,
handed back oldest first, each rebuilt into the JSON the worker PUBLISHes
(``tenant_id`` becomes ``organization_id``, ``created_at`` is ISO-8601 UTC
with milliseconds, NULL columns are left out, every other column passes
through under its own name).

Every read is bounded twice. ``history.timeout_s`` is the client-side
deadline on the whole read (waiting for a pooled connection, connecting, the
query), so a server that does not answer at all costs no more; a connection
given up that way is closed, never reused. The server's ``statement_timeout``
is a share of it: it cancels a slow query first, cleanly, leaving the
connection usable, and it ends a query the client has walked away from.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, TypeAlias, TypeVar
from urllib.parse import parse_qsl, quote, unquote, urlsplit

import asyncpg
import orjson

from bomstream.config import Config
from bomstream.events import Event
from bomstream.history.backend import HistoryError

T = TypeVar("T")
Conn: TypeAlias = "asyncpg.pool.PoolConnectionProxy[asyncpg.Record]"

# statement_timeout as a share of history.timeout_s: the rest is left for the
# pool wait, connecting and the network, so the server's clean cancel comes first.
STATEMENT_SHARE = 0.8
APPLICATION_NAME = "bomstream-history"
MAX_MESSAGE_CHARS = 200
# orjson reads an integer beyond 64 bits as a float; such a row is decoded
# again by the standard library, which keeps it exact (as parse_event does).
_LONG_DIGITS = re.compile(r"[0-9]{19}")

# The connection was already gone when it was used.
_STALE = (asyncpg.PostgresConnectionError, asyncpg.AdminShutdownError, ConnectionError)
_FAILURES = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    OSError,
    TimeoutError,
)


def quote_table(name: str) -> str:
    """``schema.table`` as quoted identifiers. Config allows only letters, digits
    and ``_`` here; the quoting is what makes that safe, not the check alone."""
    return ".".join('"' + part.replace('"', '""') + '"' for part in name.split("."))


def history_query(table: str) -> str:
    """The one statement a read runs: ``$1`` bom_id, ``$2`` limit.

    The inner query walks the ``(bom_id, created_at DESC)`` index from the
    newest row; the outer one puts those few rows in history order. A single
    text column per row means a column added to the table later changes no
    result type the driver has cached.
    """
    return (
        "SELECT row_to_json(h)::text FROM ("
        f"SELECT * FROM {quote_table(table)} WHERE bom_id = $1"
        " ORDER BY created_at DESC, event_id DESC LIMIT $2"
        ") AS h ORDER BY h.created_at, h.event_id"
    )


def row_to_event(row_json: str) -> dict[str, Any]:
    """A row (as ``row_to_json`` text) rebuilt into the event a worker publishes."""
    row: dict[str, Any] = (
        json.loads(row_json) if _LONG_DIGITS.search(row_json) else orjson.loads(row_json)
    )
    event: dict[str, Any] = {}
    for key, value in row.items():
        if value is None:
            continue
        if key == "tenant_id":
            event["organization_id"] = value
        elif key == "created_at" and isinstance(value, str):
            event[key] = iso_utc_millis(value)
        else:
            event[key] = value
    return event


def encode_json(event: dict[str, Any]) -> bytes:
    try:
        return orjson.dumps(event)
    except orjson.JSONEncodeError:
        # Integers beyond 64 bits; the standard library writes them exactly.
        return json.dumps(event, ensure_ascii=False, separators=(",", ":")).encode()


def iso_utc_millis(text: str) -> str:
    """``2025-12-18T03:23:45.678901+02:00`` -> ``2025-12-18T01:23:45.678Z``.

    Milliseconds are truncated, never rounded, so a rebuilt time never moves
    past the next row's. A value Python cannot read (``infinity``) is kept.
    """
    try:
        dt = datetime.fromisoformat(text)
    except ValueError:
        return text
    # A ``timestamp without time zone`` column is taken to hold UTC.
    dt = dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)
    return (
        f"{dt.year:04d}-{dt.month:02d}-{dt.day:02d}T"
        f"{dt.hour:02d}:{dt.minute:02d}:{dt.second:02d}.{dt.microsecond // 1000:03d}Z"
    )


async def _no_reset(conn: asyncpg.Connection[Any]) -> None:
    """A read never changes session state, so a released connection needs no
    ``RESET ALL`` round trip (asyncpg's default on every release), which would
    also undo the settings made when it was opened."""


class PostgresHistory:
    """Read-only history over the workers' events table."""

    def __init__(self, cfg: Config) -> None:
        h = cfg.history
        self._dsn = h.url
        self._timeout = h.timeout_s
        self._statement_ms = max(1, round(h.timeout_s * STATEMENT_SHARE * 1000))
        self._pool_size = h.pool_size
        self._query = history_query(h.table)
        self._secrets = _dsn_secrets(h.url)
        self._where = _dsn_display(h.url)
        self._pool: asyncpg.Pool[asyncpg.Record] | None = None
        self._pool_lock = asyncio.Lock()
        self._closed = False

    @property
    def name(self) -> str:
        return "postgres"

    @property
    def query(self) -> str:
        """The exact statement a read runs (for EXPLAIN)."""
        return self._query

    async def read(self, bom_id: str, limit: int) -> list[bytes]:
        if limit <= 0:
            return []

        async def fetch(conn: Conn) -> list[asyncpg.Record]:
            try:
                return await conn.fetch(self._query, bom_id, limit)
            except asyncpg.DataError:
                # The driver could not encode bom_id as the column's type (a
                # uuid column and an id that is not one): no row can match.
                return []

        events = [row_to_event(r[0]) for r in await self._on_connection(fetch)]
        # A uuid column matches any spelling of the id (upper case, no dashes),
        # but only the canonical one is the channel the workers publish on.
        if events and events[0].get("bom_id", bom_id) != bom_id:
            return []
        return [encode_json(e) for e in events]

    async def read_rows(self, bom_id: str, limit: int) -> list[tuple[bytes, int]]:
        # The workers' table orders a BOM's rows, not events across BOMs.
        return [(raw, 0) for raw in await self.read(bom_id, limit)]

    async def recent_boms(self, org: str | None, limit: int) -> list[str]:
        # The table's index is (bom_id, created_at): finding an org's newest
        # BOMs would scan it, on every org stream's connect.
        return []

    def record(self, event: Event) -> None:
        """The workers write the table; nothing to do."""

    async def ping(self) -> None:
        async def select_one(conn: Conn) -> None:
            await conn.fetchval("SELECT 1")

        await self._on_connection(select_one)

    async def _on_connection(self, work: Callable[[Conn], Awaitable[T]]) -> T:
        """Run ``work`` on a pooled connection within the deadline; every failure
        becomes a :class:`HistoryError`."""
        try:
            async with asyncio.timeout(self._timeout):
                pool = await self._ready_pool()
                for attempt in range(2):
                    conn = await pool.acquire()
                    try:
                        return await work(conn)
                    except _STALE:
                        # An idle connection the server dropped (restart,
                        # failover) fails its next use: a read is safe to try
                        # once more, on a fresh connection.
                        if attempt:
                            raise
                    except asyncio.CancelledError:
                        # Given up mid-query (deadline or caller): the
                        # connection's state is unknown, so it is closed.
                        conn.terminate()
                        raise
                    finally:
                        await pool.release(conn)
                raise AssertionError("unreachable")
        except _FAILURES as exc:
            raise HistoryError(self._describe(exc)) from None

    async def run(self) -> None:
        """Owns the pool and closes it when cancelled. The pool is made by the
        first read; asyncpg opens connections on demand and replaces broken
        ones, so there is no upkeep, and nothing here can fail."""
        try:
            await asyncio.Event().wait()
        finally:
            await self.close()

    async def close(self) -> None:
        self._closed = True
        pool, self._pool = self._pool, None
        if pool is None:
            return
        # A graceful close waits for reads in flight, within one deadline;
        # past it, or on any error, the connections are cut.
        try:
            await asyncio.wait_for(pool.close(), self._timeout)
        except _FAILURES:
            pool.terminate()
        except asyncio.CancelledError:
            pool.terminate()
            raise

    async def _ready_pool(self) -> asyncpg.Pool[asyncpg.Record]:
        if self._pool is not None:
            return self._pool
        async with self._pool_lock:
            if self._closed:
                raise asyncpg.InterfaceError("history backend is closed")
            if self._pool is None:
                # min_size=0: creating the pool opens no connection, so an
                # unreachable server does not fail it; reads connect on demand.
                self._pool = await asyncpg.create_pool(
                    self._dsn,
                    min_size=0,
                    max_size=self._pool_size,
                    timeout=self._timeout,
                    init=self._init_connection,
                    reset=_no_reset,
                    server_settings={"application_name": APPLICATION_NAME},
                )
            return self._pool

    async def _init_connection(self, conn: asyncpg.Connection[Any]) -> None:
        # SET rather than startup parameters, which a pooler such as PgBouncer
        # refuses. They hold for the session: released connections are not reset.
        await conn.execute(
            f"SET statement_timeout = {self._statement_ms};"
            " SET default_transaction_read_only = on;"
            " SET TimeZone = 'UTC'"
        )

    def _describe(self, exc: BaseException) -> str:
        """One short line for a failure, with every credential of the DSN masked."""
        # TimeoutError is an OSError: it goes first.
        if isinstance(exc, TimeoutError):
            text = f"no answer from {self._where} within history.timeout_s ({self._timeout:g} s)"
        elif isinstance(exc, asyncpg.PostgresError):
            text = f"{str(exc) or type(exc).__name__} (SQLSTATE {exc.sqlstate})"
        elif isinstance(exc, OSError):
            text = f"cannot connect to {self._where} ({exc.strerror or exc})"
        else:
            text = str(exc) or type(exc).__name__
        text = " ".join(text.split())
        for secret in self._secrets:
            text = text.replace(secret, "***")
        if len(text) > MAX_MESSAGE_CHARS:
            text = text[: MAX_MESSAGE_CHARS - 3] + "..."
        return f"postgres history: {text}"


def _dsn_secrets(dsn: str) -> tuple[str, ...]:
    """The DSN's password (userinfo or ``?password=``), decoded and as written."""
    parts = urlsplit(dsn)
    written = [parts.password or ""]
    written += [v for k, v in parse_qsl(parts.query, keep_blank_values=True) if k == "password"]
    plain = {unquote(w) for w in written if w} | {w for w in written if w}
    found = plain | {quote(p, safe=safe) for p in plain for safe in ("", "/")}
    # Longest first, so a secret that contains another is masked whole.
    return tuple(sorted(found, key=len, reverse=True))


def _dsn_display(dsn: str) -> str:
    """host:port for messages; never the user, password or query."""
    parts = urlsplit(dsn)
    return f"{parts.hostname or 'localhost'}:{parts.port or 5432}"
