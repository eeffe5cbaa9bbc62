"""Event validation and SSE encoding.

Every event that enters the gateway, from Redis or over HTTP, passes through
:func:`parse_event`; what comes out is an :class:`Event` holding the exact
bytes every subscriber will receive. Encoding happens here, once per event.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import time
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson

EVENT_TYPE_RE = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
BOM_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_UNSAFE_ID_CHARS = re.compile(r"[\r\n\x00]")
MAX_EVENT_ID_LEN = 128
# orjson reads an integer beyond 64 bits as a float, silently losing digits.
# A run of 19+ digits is the only way to write one, so only then is the body
# parsed again by the standard library, which keeps integers exact.
_LONG_DIGITS = re.compile(rb"[0-9]{19}")


class EventRejected(ValueError):
    """An event that must not reach any client; ``code`` names the reason."""

    def __init__(self, code: str, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status


@dataclass(slots=True, eq=False)
class Event:
    """One accepted event. ``chunk`` is what goes on the wire, shared by all streams."""

    bom_id: str
    event_id: str
    event_type: str
    org: str | None
    terminal: bool
    # The SSE frame wrapped as one HTTP/1.1 chunk: ``<hex len>\r\n<frame>\r\n``.
    chunk: bytes
    # Slice of ``chunk`` holding the JSON object, for polling responses.
    data_start: int
    data_end: int
    received_at: float
    # Seconds since the epoch from the event's ``created_at``, when it had a parsable one.
    created_at: float | None
    seq: int = 0
    # The process-wide order in which live events arrived here (0: held from
    # history only); multi-BOM streams resume by it (see bomstream.multi).
    arrival: int = 0
    # Its place in shared history's order across BOMs, once known (0: not yet,
    # or a history that keeps none); see bomstream.history.redis_scripts.
    hseq: int = 0
    # The frame for multi-BOM streams (its ``id:`` is a cursor), built on first use.
    mchunk: bytes = b""
    # Whether the JSON names its ``bom_id`` (multi-BOM frames must).
    names_bom: bool = True
    # Nonzero while the event is held only from history (merge generation that
    # added it) and its live copy has not arrived yet; see Hub.merge_history.
    hist_gen: int = 0

    @property
    def data(self) -> bytes:
        return self.chunk[self.data_start : self.data_end]

    @property
    def frame(self) -> bytes:
        """The bare SSE frame (no chunk framing)."""
        return self.chunk[self.chunk.index(b"\r\n") + 2 : -2]


def is_valid_bom_id(bom_id: str) -> bool:
    return BOM_ID_RE.fullmatch(bom_id) is not None


def is_safe_event_id(value: object) -> bool:
    return (
        isinstance(value, str)
        and 0 < len(value) <= MAX_EVENT_ID_LEN
        and _UNSAFE_ID_CHARS.search(value) is None
    )


def derived_event_id(bom_id: str, raw: bytes) -> str:
    """An id for an event published without one, computed from its bytes.

    Every gateway instance subscribed to the same Redis derives the same id,
    so a client that fails over to another instance resumes where it was; and
    a worker that retries the very same message is de-duplicated.
    """
    return "h-" + hashlib.blake2b(bom_id.encode() + b"\0" + raw, digest_size=12).hexdigest()


def parse_event(
    raw: bytes,
    bom_id: str,
    *,
    max_bytes: int,
    terminal_types: Collection[str],
) -> Event:
    """Validate one published event for ``bom_id`` and encode it for the wire.

    Raises :class:`EventRejected` for anything that must not reach a client.
    """
    if len(raw) > max_bytes:
        raise EventRejected(
            "too_large", f"event is {len(raw)} bytes; the limit is {max_bytes}", status=413
        )
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        if "UTF-8" in str(exc) or "utf-8" in str(exc):
            raise EventRejected("invalid_utf8", "event body is not valid UTF-8") from None
        raise EventRejected("invalid_json", "event body is not valid JSON") from None
    if not isinstance(obj, dict):
        raise EventRejected("not_an_object", "event must be a JSON object")
    if _LONG_DIGITS.search(raw) is not None:
        try:
            obj = json.loads(raw)
        except ValueError:
            raise EventRejected("invalid_json", "event body has a number out of range") from None
    event_type = obj.get("event_type")
    if not isinstance(event_type, str) or EVENT_TYPE_RE.fullmatch(event_type) is None:
        raise EventRejected(
            "invalid_event_type", "event_type is required and must match ^[A-Za-z0-9_.:-]{1,64}$"
        )
    body_bom = obj.get("bom_id")
    if body_bom is not None and body_bom != bom_id:
        raise EventRejected("bom_id_mismatch", "bom_id in the event differs from the channel")
    org = obj.get("organization_id")
    if org is not None and not isinstance(org, str):
        raise EventRejected("invalid_organization_id", "organization_id must be a string")
    event_id = obj.get("event_id")
    if not is_safe_event_id(event_id):
        event_id = derived_event_id(bom_id, raw)
        obj["event_id"] = event_id
    assert isinstance(event_id, str)
    event = encode_event(
        obj,
        bom_id=bom_id,
        event_id=event_id,
        event_type=event_type,
        org=org or None,
        terminal=event_type in terminal_types,
    )
    event.names_bom = body_bom is not None
    return event


def encode_event(
    obj: dict[str, Any],
    *,
    bom_id: str,
    event_id: str,
    event_type: str,
    org: str | None,
    terminal: bool,
) -> Event:
    # orjson escapes every control character inside strings, so the JSON is
    # one line and cannot end the ``data:`` field early.
    try:
        data = orjson.dumps(obj)
    except orjson.JSONEncodeError:
        # Integers beyond 64 bits; the standard library escapes control
        # characters too, so this is still one line.
        data = json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()
    head = b"id: " + event_id.encode() + b"\nevent: " + event_type.encode() + b"\ndata: "
    frame = head + data + b"\n\n"
    prefix = b"%x\r\n" % len(frame)
    start = len(prefix) + len(head)
    return Event(
        bom_id=bom_id,
        event_id=event_id,
        event_type=event_type,
        org=org,
        terminal=terminal,
        chunk=prefix + frame + b"\r\n",
        data_start=start,
        data_end=start + len(data),
        received_at=time.time(),
        created_at=_parse_created_at(obj.get("created_at")),
    )


def _parse_created_at(value: object) -> float | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def chunk(frame: bytes) -> bytes:
    """Wrap an SSE frame as one HTTP/1.1 chunk."""
    return b"%x\r\n%s\r\n" % (len(frame), frame)


def control_frame(event: str, payload: dict[str, Any]) -> bytes:
    """A gateway-generated frame (``connected``, ``stream_end``); it carries no ``id``
    so the browser's last event id stays the last real event."""
    return b"event: " + event.encode() + b"\ndata: " + orjson.dumps(payload) + b"\n\n"


KEEPALIVE_FRAME = b": keepalive\n\n"
KEEPALIVE_CHUNK = chunk(KEEPALIVE_FRAME)


def retry_frame(retry_ms: int) -> bytes:
    return b"retry: %d\n\n" % retry_ms


def connected_frame(bom_id: str, resumed: bool) -> bytes:
    return control_frame(
        "connected",
        {"type": "connected", "bom_id": bom_id, "message": "Stream connected", "resumed": resumed},
    )


@functools.lru_cache(maxsize=64)
def stream_end_chunk(reason: str) -> bytes:
    """The ``stream_end`` chunk for a reason; reasons are few, so each is built once."""
    return chunk(control_frame("stream_end", {"type": "stream_end", "reason": reason}))
