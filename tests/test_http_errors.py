"""Requests aiohttp refuses before any handler runs get the contract's JSON
error, without the input echoed and without a version banner; long request
lines (spec section 9) are accepted. Raw sockets against a gateway process."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest

from bomstream.protocol import MAX_HEADER_FIELD, MAX_REQUEST_LINE
from tests.authkit import ADMIN, SECRET
from tests.gateway_proc import GatewayProcess

MARKER = "Zq7marker"  # stands for a credential or anything else a client sent


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes
    raw: bytes

    def json(self) -> Any:
        return json.loads(self.body)


async def raw_exchange(port: int, request: bytes) -> Reply:
    """Send ``request`` as is and read until the gateway closes the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(-1), 10)
    finally:
        writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding") == "chunked":
        size, _, rest = body.partition(b"\r\n")
        body = rest[: int(size, 16)]
    return Reply(int(status_line.split()[1]), headers, body, raw)


def assert_json_error(reply: Reply, status: int, code: str) -> None:
    assert reply.status == status, reply.raw[:300]
    assert reply.headers["content-type"].startswith("application/json"), reply.headers
    body = reply.json()
    assert set(body) == {"error", "code"} and body["code"] == code, body
    assert MARKER.encode() not in reply.raw, reply.raw[:300]
    assert_no_banner(reply)


def assert_no_banner(reply: Reply) -> None:
    server = reply.headers.get("server", "")
    assert "aiohttp" not in server.lower() and "python" not in server.lower(), server
    assert not any(ch.isdigit() for ch in server), server
    assert b"aiohttp" not in reply.raw.lower() and b"python/" not in reply.raw.lower()


@pytest.fixture
async def port() -> AsyncIterator[int]:
    gw = GatewayProcess(auth_jwt_secret=SECRET, auth_admin_token=ADMIN)
    async with aiohttp.ClientSession() as http:
        await gw.start(http)
    try:
        yield gw.port
    finally:
        gw.stop()
        gw.close()


async def test_malformed_request_line_is_a_json_400_that_echoes_nothing(port: int) -> None:
    for request in (
        f"GET /api/enrichment/stream/bom-a?token={MARKER}\x01 HTTP/1.1\r\nHost: x\r\n\r\n",
        f"GET /api/enrichment/health?{MARKER} HTTP/9.9\r\nHost: x\r\n\r\n",
        f"\x16\x03\x01{MARKER} / HTTP/1.1\r\n\r\n",
        f"GE<T /{MARKER} HTTP/1.1\r\nHost: x\r\n\r\n",
        f"GET / HTTP/1.1\r\nHost: x\r\n{MARKER} no colon\r\n\r\n",
    ):
        assert_json_error(await raw_exchange(port, request.encode("latin-1")), 400, "bad_request")


async def test_oversized_header_line_is_a_json_431(port: int) -> None:
    big = f"X-Big: {MARKER}{'a' * (MAX_HEADER_FIELD + 10)}"
    reply = await raw_exchange(port, f"GET / HTTP/1.1\r\nHost: x\r\n{big}\r\n\r\n".encode())
    assert_json_error(reply, 431, "headers_too_large")
    assert b"aaaa" not in reply.raw


async def test_too_many_headers_is_a_json_431(port: int) -> None:
    many = "".join(f"X-H{i}: {MARKER}\r\n" for i in range(200))
    reply = await raw_exchange(port, f"GET / HTTP/1.1\r\nHost: x\r\n{many}\r\n".encode())
    assert_json_error(reply, 431, "headers_too_large")


async def test_request_lines_of_16_kib_and_more_are_accepted(port: int) -> None:
    # About what 100 BOM ids of 128 characters and a token make.
    for size in (16 * 1024, 20_000, MAX_REQUEST_LINE - 100):
        target = "/api/enrichment/health?pad=" + "b" * (size - 27)
        reply = await raw_exchange(
            port, f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
        )
        assert reply.status == 200, reply.raw[:300]
        assert reply.json()["status"] == "healthy"
        assert_no_banner(reply)


async def test_a_request_line_past_the_limit_is_a_json_414(port: int) -> None:
    target = f"/api/enrichment/stream/bom-a?token={MARKER}" + "c" * MAX_REQUEST_LINE
    reply = await raw_exchange(port, f"GET {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert_json_error(reply, 414, "uri_too_long")
    assert b"cccc" not in reply.raw


async def test_no_response_carries_a_version_banner(port: int) -> None:
    requests = {
        "/api/enrichment/health": 200,
        "/no/such/route": 404,
        "/metrics": 200,
        "/monitor": 200,
        "/api/enrichment/stream/bad%20id": 400,
        "/api/enrichment/stream/bom-a": 401,
    }
    for path, status in requests.items():
        reply = await raw_exchange(
            port, f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
        )
        assert reply.status == status, (path, reply.raw[:300])
        assert reply.headers.get("server") == "bomstream", (path, reply.headers)
        assert_no_banner(reply)
    # An open stream's headers too (read the first frame, then hang up).
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(
            f"GET /api/enrichment/stream/bom-a HTTP/1.1\r\nHost: x\r\n"
            f"Authorization: Bearer {ADMIN}\r\n\r\n".encode()
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    finally:
        writer.close()
    assert head.startswith(b"HTTP/1.1 200"), head
    assert b"\r\nServer: bomstream\r\n" in head and b"aiohttp" not in head.lower(), head
