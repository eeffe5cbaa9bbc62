"""Property tests (hypothesis), read back with an independent SSE parser (httpx-sse).

1. Any JSON object is either rejected, or comes out of the encoder as bytes that
   the parser reads as exactly one event equal to it (id, type and data).
2. Any string as the path ``bom_id`` or as ``Last-Event-ID`` gives 400 (or no
   route) or a well-formed stream: never a 500, never an injected field.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from httpx_sse._decoders import SSEDecoder, SSELineDecoder
from httpx_sse._models import ServerSentEvent
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from bomstream.config import DEFAULT_TERMINAL_TYPES
from bomstream.events import (
    EVENT_TYPE_RE,
    EventRejected,
    is_safe_event_id,
    is_valid_bom_id,
    parse_event,
)
from tests.gateway_proc import GatewayProcess

BOM = "bom-prop"
FIELD_LINE = re.compile(r"(retry|event|data|id): ?.*|:.*")

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats()
    | st.text()
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)
event_types = (
    st.from_regex(EVENT_TYPE_RE, fullmatch=True)
    | st.sampled_from(["enrichment.progress", "enrichment.completed", "bad type", "x\ny", ""])
    | st.text(max_size=70)
    | json_scalars
)
event_ids = st.text(max_size=140) | st.uuids().map(str) | json_scalars


@st.composite
def event_objects(draw: st.DrawFn) -> dict[str, Any]:
    obj: dict[str, Any] = draw(st.dictionaries(st.text(max_size=12), json_values, max_size=5))
    if draw(st.booleans()):
        obj["event_type"] = draw(event_types)
    if draw(st.booleans()):
        obj["event_id"] = draw(event_ids)
    if draw(st.booleans()):
        obj["bom_id"] = draw(st.sampled_from([BOM, "other"]) | json_scalars)
    if draw(st.booleans()):
        obj["organization_id"] = draw(st.text(max_size=10) | json_scalars)
    return obj


def sse_events(pieces: Iterator[bytes]) -> tuple[list[str], list[ServerSentEvent]]:
    """Lines and events as httpx-sse reads them from a byte stream arriving in pieces."""
    lines_decoder, decoder = SSELineDecoder(), SSEDecoder()
    lines: list[str] = []
    events: list[ServerSentEvent] = []
    for piece in pieces:
        for line in lines_decoder.decode(piece.decode("utf-8")):
            lines.append(line)
            sse = decoder.decode(line)
            if sse is not None:
                events.append(sse)
    for line in lines_decoder.flush():
        lines.append(line)
    return lines, events


def split(data: bytes, cuts: list[int]) -> Iterator[bytes]:
    """``data`` in pieces, cut at UTF-8 character boundaries near ``cuts``."""
    text = data.decode()
    points = sorted({min(c, len(text)) for c in cuts} | {0, len(text)})
    for a, b in itertools.pairwise(points):
        yield text[a:b].encode()


@settings(max_examples=400, deadline=None)
# orjson alone reads integers beyond 64 bits as floats; they must pass through exactly.
@example(obj={"event_type": "x", "n": -(2**63) - 1, "m": 2**64}, ascii_only=False, cuts=[])
@given(
    obj=event_objects(),
    ascii_only=st.booleans(),
    cuts=st.lists(st.integers(min_value=0, max_value=4000), max_size=6),
)
def test_any_json_object_is_rejected_or_read_back_as_exactly_one_equal_event(
    obj: dict[str, Any], ascii_only: bool, cuts: list[int]
) -> None:
    raw = json.dumps(obj, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")
    try:
        event = parse_event(raw, BOM, max_bytes=65536, terminal_types=DEFAULT_TERMINAL_TYPES)
    except EventRejected as exc:
        assert exc.status in (400, 413)
        return
    frame = event.frame
    assert event.chunk == b"%x\r\n" % len(frame) + frame + b"\r\n"
    lines, events = sse_events(split(frame, cuts))
    assert len(events) == 1
    assert all(FIELD_LINE.fullmatch(line) for line in lines if line), lines
    assert sum(1 for line in lines if line.startswith("data:")) == 1
    sse = events[0]
    expected = json.loads(raw)
    if not is_safe_event_id(expected.get("event_id")):
        expected["event_id"] = event.event_id
    assert sse.id == expected["event_id"] == event.event_id
    assert sse.event == expected["event_type"] == event.event_type
    assert json.loads(sse.data) == expected
    assert sse.data.encode() == event.data


@pytest.fixture(scope="module")
def open_gateway() -> Iterator[GatewayProcess]:
    gw = GatewayProcess(env={"BOMSTREAM_SERVER_ACCESS_LOG": "false"})
    gw.start_sync()
    try:
        with httpx.Client(base_url=gw.url, timeout=10) as client:
            for n in (1, 2, 3):
                body = {"event_id": f"e{n}", "event_type": "enrichment.progress", "payload": n}
                assert client.post(f"/api/enrichment/events/{BOM}", json=body).status_code == 202
            done = {"event_id": "done", "event_type": "enrichment.completed"}
            assert client.post(f"/api/enrichment/events/{BOM}", json=done).status_code == 202
        yield gw
    finally:
        gw.stop()


def read_stream(
    client: httpx.Client, path: str, headers: dict[str, str]
) -> tuple[int, list[str], list[ServerSentEvent]]:
    """Status, and for a stream every line and event up to its end (or, for a
    stream with nothing to say, up to ``connected``)."""
    with client.stream("GET", path, headers=headers) as resp:
        if resp.status_code != 200:
            resp.read()
            if resp.status_code != 204:
                assert set(resp.json()) == {"error", "code"}
            return resp.status_code, [], []
        assert resp.headers["content-type"] == "text/event-stream"
        lines_decoder, decoder = SSELineDecoder(), SSEDecoder()
        lines: list[str] = []
        events: list[ServerSentEvent] = []
        for piece in resp.iter_text():
            for line in lines_decoder.decode(piece):
                lines.append(line)
                sse = decoder.decode(line)
                if sse is None:
                    continue
                events.append(sse)
                # Only the BOM with a finished run ends by itself; others stay open.
                if sse.event == "connected" and json.loads(sse.data)["bom_id"] != BOM:
                    return 200, lines, events
        return 200, lines, events


def check_stream(bom_id: str, lines: list[str], events: list[ServerSentEvent]) -> None:
    assert all(FIELD_LINE.fullmatch(line) for line in lines if line), lines
    assert events[0].retry == 3000
    connected = events[1]
    assert connected.event == "connected"
    body = json.loads(connected.data)
    assert body["bom_id"] == bom_id
    assert body["type"] == "connected"
    for sse in events[2:]:
        assert sse.event in ("enrichment.progress", "enrichment.completed", "stream_end")
        json.loads(sse.data)
    if bom_id == BOM:
        assert events[-1].event == "stream_end"


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    bom_id=st.text(max_size=140)
    | st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}", fullmatch=True)
)
def test_any_path_bom_id_gives_400_or_a_well_formed_stream(
    open_gateway: GatewayProcess, bom_id: str
) -> None:
    path = "/api/enrichment/stream/" + quote(bom_id.encode("utf-8", "surrogatepass"), safe="")
    with httpx.Client(base_url=open_gateway.url, timeout=10) as client:
        status, lines, events = read_stream(client, path, {})
    if is_valid_bom_id(bom_id):
        assert status == 200
        check_stream(bom_id, lines, events)
    else:
        assert status in (400, 404), status


header_safe = st.text(
    alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=200
)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    last_id=st.text(max_size=300) | st.sampled_from(["e1", "e2", "e3", "done"]),
    header=header_safe | st.sampled_from(["e1", "e2", "done"]) | st.none(),
)
def test_any_last_event_id_gives_a_well_formed_stream(
    open_gateway: GatewayProcess, last_id: str, header: str | None
) -> None:
    """As a query parameter any string can be sent; as a header, any legal header value."""
    path = f"/api/enrichment/stream/{BOM}?last_event_id=" + quote(
        last_id.encode("utf-8", "surrogatepass"), safe=""
    )
    headers = {"Last-Event-ID": header} if header is not None else {}
    with httpx.Client(base_url=open_gateway.url, timeout=10) as client:
        status, lines, events = read_stream(client, path, headers)
    effective = header if header is not None else last_id
    if effective == "done":
        assert status == 204
        return
    assert status == 200
    check_stream(BOM, lines, events)
    resumed = json.loads(events[1].data)["resumed"]
    assert resumed == (effective in ("e1", "e2", "e3"))
    ids = [e.id for e in events[2:] if e.event != "stream_end"]
    expected = {"e1": ["e2", "e3", "done"], "e2": ["e3", "done"], "e3": ["done"]}
    assert ids == expected.get(effective, ["done"])
