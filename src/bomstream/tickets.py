"""Single-use stream tickets: a short-lived stand-in for a token in a URL.

A browser's EventSource cannot send an ``Authorization`` header, so the token
would have to ride in the query string, where proxy logs, browser history and
``Referer`` headers keep it. Instead the page trades its token (in a header)
for a ticket bound to one BOM (or a list of them, or its org), valid for
``auth.ticket_ttl_s`` and for one use. Only a hash of the ticket is stored.

With Redis configured the tickets live there, so a ticket issued by one
gateway instance can be redeemed at another behind the same load balancer,
and still only once. Without Redis they live in this process.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Protocol

import orjson
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisClusterException, RedisError

from bomstream.principal import Principal

# Outstanding tickets one process holds at most; beyond it issuing is refused,
# so a flood of ticket requests cannot grow memory without bound.
MAX_TICKETS = 100_000
REDIS_KEY_PREFIX = b"bomstream:ticket:"
CONNECT_TIMEOUT_S = 2.0


@dataclass(frozen=True, slots=True)
class Grant:
    """What a ticket opens, and what a request wants: some BOMs, or the
    caller's whole org (``scope=org``)."""

    boms: frozenset[str] = frozenset()
    org_scope: bool = False

    @classmethod
    def one(cls, bom_id: str) -> Grant:
        return cls(frozenset((bom_id,)))

    def covers(self, want: Grant) -> bool:
        """A list opens any part of it; an org ticket opens only the org stream."""
        if self.org_scope or want.org_scope:
            return self.org_scope and want.org_scope
        return want.boms <= self.boms

    def record(self) -> dict[str, Any]:
        if self.org_scope:
            return {"scope": "org"}
        if len(self.boms) == 1:
            return {"bom_id": next(iter(self.boms))}
        return {"bom_ids": sorted(self.boms)}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Grant:
        if record.get("scope") == "org":
            return cls(org_scope=True)
        if isinstance(record.get("bom_id"), str):
            return cls.one(record["bom_id"])
        ids = record.get("bom_ids")
        if isinstance(ids, list) and all(isinstance(b, str) for b in ids):
            return cls(frozenset(ids))
        return cls()


class TicketRejected(Exception):
    """A ticket that does not let the caller in (unknown, used, expired, other BOM)."""


class TicketStoreFull(Exception):
    """Too many outstanding tickets."""


class TicketStoreUnavailable(Exception):
    """The shared ticket store (Redis) cannot be reached."""


class TicketStore(Protocol):
    ttl_s: float

    async def issue(self, grant: Grant, principal: Principal) -> str: ...

    async def redeem(self, ticket: str, want: Grant) -> Principal:
        """The principal a ticket was issued to; it can never be redeemed again."""
        ...

    async def close(self) -> None: ...


def _digest(ticket: str) -> bytes:
    return hashlib.sha256(ticket.encode("utf-8", "surrogatepass")).digest()


def _new_ticket() -> str:
    return secrets.token_urlsafe(32)


def _as_ticket_principal(p: Principal) -> Principal:
    # What a ticket grants: reading, as the issuing principal, until its token expires.
    return Principal(kind="ticket", org=p.org, expires_at=p.expires_at, subject=p.subject)


class MemoryTicketStore:
    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        # digest -> (bom_id, principal, monotonic expiry); every ticket has the
        # same lifetime, so insertion order is expiry order.
        self._tickets: OrderedDict[bytes, tuple[Grant, Principal, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._tickets)

    def _purge(self, now: float) -> None:
        tickets = self._tickets
        while tickets:
            _, (_, _, expires) = next(iter(tickets.items()))
            if expires > now:
                break
            tickets.popitem(last=False)

    async def issue(self, grant: Grant, principal: Principal) -> str:
        now = time.monotonic()
        self._purge(now)
        if len(self._tickets) >= MAX_TICKETS:
            raise TicketStoreFull
        ticket = _new_ticket()
        self._tickets[_digest(ticket)] = (
            grant,
            _as_ticket_principal(principal),
            now + self.ttl_s,
        )
        return ticket

    async def redeem(self, ticket: str, want: Grant) -> Principal:
        entry = self._tickets.pop(_digest(ticket), None)
        if entry is None:
            raise TicketRejected
        granted, principal, expires = entry
        if expires <= time.monotonic() or not granted.covers(want):
            raise TicketRejected
        return principal

    async def close(self) -> None:
        self._tickets.clear()


class RedisTicketStore:
    def __init__(self, url: str, ttl_s: float, cluster: bool = False) -> None:
        self.ttl_s = ttl_s
        self._url = url
        self._cluster = cluster
        self._client: aioredis.Redis | RedisCluster | None = None

    def _redis(self) -> aioredis.Redis | RedisCluster:
        if self._client is None:
            if self._cluster:
                self._client = RedisCluster.from_url(
                    self._url, socket_connect_timeout=CONNECT_TIMEOUT_S
                )
            else:
                self._client = aioredis.Redis.from_url(
                    self._url, socket_connect_timeout=CONNECT_TIMEOUT_S
                )
        return self._client

    async def issue(self, grant: Grant, principal: Principal) -> str:
        ticket = _new_ticket()
        p = _as_ticket_principal(principal)
        record: dict[str, Any] = {
            **grant.record(),
            "org": p.org,
            "expires_at": p.expires_at,
            "subject": p.subject,
        }
        try:
            await self._redis().set(
                REDIS_KEY_PREFIX + _digest(ticket),
                orjson.dumps(record),
                px=max(1, int(self.ttl_s * 1000)),
            )
        except (RedisError, RedisClusterException, OSError) as exc:
            raise TicketStoreUnavailable from exc
        return ticket

    async def redeem(self, ticket: str, want: Grant) -> Principal:
        try:
            # GETDEL makes redemption atomic across every instance sharing Redis.
            raw = await self._redis().getdel(REDIS_KEY_PREFIX + _digest(ticket))
        except (RedisError, RedisClusterException, OSError) as exc:
            raise TicketStoreUnavailable from exc
        if raw is None:
            raise TicketRejected
        record = orjson.loads(raw)
        if not Grant.from_record(record).covers(want):
            raise TicketRejected
        return Principal(
            kind="ticket",
            org=record.get("org"),
            expires_at=record.get("expires_at"),
            subject=record.get("subject"),
        )

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None


def make_ticket_store(redis_url: str, ttl_s: float, cluster: bool = False) -> TicketStore:
    if redis_url:
        return RedisTicketStore(redis_url, ttl_s, cluster)
    return MemoryTicketStore(ttl_s)
