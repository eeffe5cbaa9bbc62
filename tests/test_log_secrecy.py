"""No token or ticket ever reaches the log: every line the gateway writes is
captured across successful, refused and malformed requests and searched."""

from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import aiohttp
import pytest

from bomstream.logs import make_formatter
from tests.authkit import ADMIN, SECRET, claims, hs256, org_token
from tests.conftest import StartGateway, progress
from tests.gateway_proc import GatewayProcess

AUTH_ENV = {
    "BOMSTREAM_AUTH_ADMIN_TOKEN": ADMIN,
    "BOMSTREAM_AUTH_JWT_SECRET": SECRET,
    "BOMSTREAM_SERVER_ACCESS_LOG": "true",
    "BOMSTREAM_SERVER_LOG_LEVEL": "debug",
}


@dataclass
class Secrets:
    good: str = field(default_factory=lambda: org_token("org-a"))
    service: str = field(default_factory=lambda: org_token("org-a", role="service_role"))
    expired: str = field(default_factory=lambda: hs256(claims("org-a", ttl=-3600)))
    forged: str = field(
        default_factory=lambda: hs256(claims("org-a"), secret="forged-secret-0123456789abcdefghij")
    )
    garbage: str = "garbage-credential-7f3a9c51"
    made_up_ticket: str = "made-up-ticket-91ab22e0c4"
    tickets: list[str] = field(default_factory=list)

    def all(self) -> Iterator[str]:
        yield ADMIN
        yield SECRET
        yield self.garbage
        yield self.made_up_ticket
        yield from self.tickets
        for jwt in (self.good, self.service, self.expired, self.forged):
            yield jwt
            yield jwt.rsplit(".", 1)[1]  # the signature alone is a secret too


async def raw_request(base: str, data: bytes) -> bytes:
    parts = urlsplit(base)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(512), 5)
    finally:
        writer.close()


async def exercise(http: aiohttp.ClientSession, base: str, s: Secrets) -> None:
    """Successful, refused and malformed requests, with credentials in every place."""
    stream = f"{base}/api/enrichment/stream/bom-a"
    events = f"{base}/api/enrichment/events/bom-a"

    async def status(method: str, url: str, expect: int, **kw: object) -> None:
        async with http.request(method, url, **kw) as resp:  # type: ignore[arg-type]
            if resp.content_type == "text/event-stream":
                assert await resp.content.readline() == b"retry: 3000\n"
            else:
                await resp.read()
            assert resp.status == expect, (url, resp.status)

    def bearer(token: str) -> dict[str, dict[str, str]]:
        return {"headers": {"Authorization": f"Bearer {token}"}}

    await status(
        "POST",
        events,
        202,
        params={"token": s.service},
        json=progress("bom-a", 1, organization_id="org-a"),
    )
    await status(
        "POST", events, 202, json=progress("bom-a", 2, organization_id="org-a"), **bearer(s.service)
    )
    await status(
        "POST", events, 403, json=progress("bom-a", 3, organization_id="org-a"), **bearer(s.good)
    )
    await status(
        "POST",
        events,
        401,
        params={"token": s.garbage},
        json=progress("bom-a", 4, organization_id="org-a"),
    )
    for where in ("query", "header"):
        for token, expect in (
            (s.good, 200),
            (ADMIN, 200),
            (s.expired, 401),
            (s.forged, 401),
            (s.garbage, 401),
        ):
            kw: dict[str, object] = (
                {"params": {"token": token}} if where == "query" else bearer(token)
            )
            await status("GET", stream, expect, **kw)
            await status("GET", events, expect, **kw)
    await status("GET", f"{base}/api/enrichment/stream/-bad", 400, params={"token": s.good})
    async with http.post(
        f"{base}/api/enrichment/tickets", json={"bom_id": "bom-a"}, **bearer(s.good)
    ) as resp:
        assert resp.status == 201
        ticket = (await resp.json())["ticket"]
    s.tickets.append(ticket)
    await status("GET", stream, 200, params={"ticket": ticket})
    await status("GET", stream, 401, params={"ticket": ticket})
    await status("GET", events, 401, params={"ticket": s.made_up_ticket})
    await status("POST", f"{base}/api/enrichment/tickets", 401, params={"token": s.good}, json={})
    # Requests aiohttp cannot parse, including a request line past the limit.
    q = b"/api/enrichment/events/bom-a?token=" + s.good.encode()
    for raw in (
        b"GET " + q + b" HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
        b"GET " + q + b"\x01 HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET " + q + b" HTTP/9.9\r\nHost: x\r\n\r\n",
        b"GET " + q + b"A" * 40000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /api/enrichment/events/bom-a?ticket=" + s.made_up_ticket.encode() + b"\x7f HTTP/1.1"
        b"\r\nHost: x\r\n\r\n",
        b"GET /api/enrichment/events/bom-a HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
        + s.good.encode()
        + b"\x01\r\n\r\n",
        b"GET /api/enrichment/events/bom-a?tok%65n=" + s.garbage.encode() + b" HTTP/1.1\r\n"
        b"Host: x\r\nConnection: close\r\n\r\n",
    ):
        reply = await raw_request(base, raw)
        assert reply.startswith((b"HTTP/1.0 4", b"HTTP/1.1 4")), reply
        assert reply[9:12] in (b"400", b"401", b"414"), reply


def assert_clean(output: str, s: Secrets) -> None:
    for secret in s.all():
        assert secret not in output, f"a credential ({secret[:6]}...) reached the log"


def assert_logged_the_battery(output: str) -> None:
    """The capture really holds what happened, so a clean result means something."""
    for needle in ("200", "401", "403", "400", "202", "[redacted]", "refused a malformed request"):
        assert needle in output, needle
    assert output.count("bomstream.access") >= 30 or output.count('"bomstream.access"') >= 30


@pytest.mark.parametrize("fmt", ["text", "json"])
async def test_gateway_process_output_never_contains_a_credential(
    fmt: str, http: aiohttp.ClientSession
) -> None:
    gw = GatewayProcess(
        env={**AUTH_ENV, "BOMSTREAM_SERVER_LOG_FORMAT": fmt, "BOMSTREAM_SERVER_ACCESS_LOG": "true"}
    )
    await asyncio.to_thread(gw.start_sync)
    secrets = Secrets()
    try:
        await exercise(http, gw.url, secrets)
    finally:
        await asyncio.to_thread(gw.stop)
    output = gw.log_text()
    assert_logged_the_battery(output)
    assert_clean(output, secrets)


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.mark.parametrize("fmt", ["text", "json"])
async def test_in_process_log_records_never_contain_a_credential(
    fmt: str, gateway_factory: StartGateway, http: aiohttp.ClientSession
) -> None:
    root = logging.getLogger()
    text = io.StringIO()
    formatted = logging.StreamHandler(text)
    formatted.setFormatter(make_formatter(fmt, secrets=(ADMIN, SECRET)))
    formatted.setLevel(logging.DEBUG)
    raw = Collect()
    old_level = root.level
    root.addHandler(formatted)
    root.addHandler(raw)
    root.setLevel(logging.DEBUG)
    secrets = Secrets()
    try:
        gw = await gateway_factory(
            auth__admin_token=ADMIN, auth__jwt_secret=SECRET, server__access_log=True
        )
        await exercise(http, gw.url, secrets)
        await gw.stop()
    finally:
        root.removeHandler(formatted)
        root.removeHandler(raw)
        root.setLevel(old_level)
    output = text.getvalue()
    assert_logged_the_battery(output)
    assert_clean(output, secrets)
    # The gateway's own records are clean before any formatter redacts them:
    # the formatter is a backstop for other libraries' messages, not a licence.
    own = [r for r in raw.records if r.name.startswith("bomstream")]
    assert len(own) >= 30
    for record in own:
        assert_clean(record.getMessage() + repr(getattr(record, "fields", "")), secrets)
