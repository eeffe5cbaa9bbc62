"""The resume cursor of a multi-BOM stream, and the frames that carry it.

A single-BOM stream's ``id:`` is the event's ``event_id``. A stream of many
BOMs needs one ``id:`` from which every BOM's position follows, and the same
bytes must serve every stream the event goes to, so it names the event, not
the stream: ``1/<bom_id>/<event_id>``. Every instance subscribed to the same
Redis receives the feed in the one order Redis sends it, so the instance a
client resumes on finds that event and takes "everything that arrived after
it" from its own arrival order (:mod:`bomstream.multi.catchup`).

A ``bom_id`` has no ``/`` and at most 128 characters; an ``event_id`` longer
than 256 bytes in UTF-8 is named by a digest instead, so a cursor is at most
2 + 128 + 1 + 256 = 387 bytes, under the contract's 512.
"""

from __future__ import annotations

import hashlib

import orjson

from bomstream.events import Event, chunk, control_frame, is_valid_bom_id

VERSION = "1"
MAX_EVENT_ID_BYTES = 256
DIGEST_MARK = "~"


def _event_ref(event_id: str) -> str:
    raw = event_id.encode()
    if len(raw) <= MAX_EVENT_ID_BYTES and not event_id.startswith(DIGEST_MARK):
        return event_id
    return DIGEST_MARK + hashlib.blake2b(raw, digest_size=16).hexdigest()


def cursor_of(event: Event) -> str:
    return f"{VERSION}/{event.bom_id}/{_event_ref(event.event_id)}"


def parse_cursor(text: str) -> tuple[str, str] | None:
    """(bom_id, event reference) of a cursor, or None for anything else."""
    parts = text.split("/", 2)
    if len(parts) != 3 or parts[0] != VERSION or not is_valid_bom_id(parts[1]) or not parts[2]:
        return None
    return parts[1], parts[2]


def matches(event: Event, ref: str) -> bool:
    return _event_ref(event.event_id) == ref


def multi_chunk(event: Event) -> bytes:
    """The event as a multi-BOM stream frame, built once per event: the
    cursor as its ``id:``, and the JSON always naming the BOM."""
    if event.mchunk:
        return event.mchunk
    data = multi_data(event)
    frame = (
        b"id: "
        + cursor_of(event).encode()
        + b"\nevent: "
        + event.event_type.encode()
        + b"\ndata: "
        + data
        + b"\n\n"
    )
    event.mchunk = chunk(frame)
    return event.mchunk


def multi_data(event: Event) -> bytes:
    """The event's JSON as a multi-BOM poll returns it (naming the BOM)."""
    if event.names_bom:
        return event.data
    return b'{"bom_id":' + orjson.dumps(event.bom_id) + b"," + event.data[1:]


def connected_frame(boms: tuple[str, ...] | None, resumed: bool, gaps: list[str]) -> bytes:
    """``bom_ids`` for a list, ``scope`` for an org stream; ``gaps``: the BOMs
    resumed from a snapshot because their position could not be placed."""
    payload: dict[str, object] = {"type": "connected"}
    if boms is None:
        payload["scope"] = "org"
    else:
        payload["bom_ids"] = list(boms)
    payload.update(message="Stream connected", resumed=resumed, gaps=gaps)
    return control_frame("connected", payload)
