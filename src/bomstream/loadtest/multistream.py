"""One stream of several BOMs (``/api/enrichment/stream?bom_id=A&bom_id=B...``).

The HTTP, chunk and event-stream parsing are :class:`SSEConnection`'s; what
differs is the event frame. Its ``id:`` is the gateway's cursor, opaque to
clients, kept only to resume with; the event's own id (``<run>-<bom>-<seq>-
<sent µs>``, as the publisher numbers events) and the BOM it belongs to are
read from the ``data:`` JSON, by searching for the two keys rather than
parsing the whole object, which would cost several times more per event.
Each listed BOM has its own tally, so order, loss and duplicates are
counted per BOM exactly as a single-BOM stream counts them.
"""

from __future__ import annotations

from bomstream.loadtest.sseclient import Sink, SSEConnection
from bomstream.loadtest.tally import StreamTally

_EVENT_ID_KEY = b'"event_id"'
_BOM_ID_KEY = b'"bom_id"'
# Between a JSON key's closing quote and its value's opening one.
_JSON_GAP = b" \t:"


class Watch:
    """A listed BOM, as the stream's frames name it, and its tally."""

    __slots__ = ("bom_id", "tally")

    def __init__(self, bom_id: bytes, tally: StreamTally) -> None:
        self.bom_id = bom_id
        self.tally = tally


def json_string(buf: bytes, key: bytes, start: int, stop: int) -> bytes | None:
    """The value of the first ``key`` (quoted) in ``buf[start:stop]`` when it is
    a string without escapes, as the load test's ids are; else None."""
    k = buf.find(key, start, stop)
    if k < 0:
        return None
    i = k + len(key)
    while i < stop and buf[i] in _JSON_GAP:
        i += 1
    if i >= stop or buf[i] != 0x22:  # '"'
        return None
    end = buf.find(b'"', i + 1, stop)
    if end < 0 or buf.find(b"\\", i + 1, end) >= 0:
        return None
    return buf[i + 1 : end]


class MultiSSEConnection(SSEConnection):
    """``watches`` maps the BOM index in an event id (its text) to that BOM."""

    __slots__ = ("_run_prefix", "watches")

    def __init__(self, sink: Sink, index: int, request: bytes, watches: dict[bytes, Watch]) -> None:
        first = next(iter(watches.values()))
        super().__init__(sink, index, -1, request, first.tally)
        # No id line starts with a newline: the single-BOM fast path never
        # claims a frame, and every event frame comes to _id_frame below.
        self._prefix = b"\n"
        self._run_prefix = sink.run_id.encode() + b"-"
        self.watches = watches

    def _id_frame(self, buf: bytes, pos: int, stop: int, now_us: int) -> None:
        sink = self.sink
        nl = buf.find(b"\n", pos, stop)
        if nl < 0:
            nl = stop
        self.last_event_id = buf[pos + 4 : nl]
        event_id = json_string(buf, _EVENT_ID_KEY, nl, stop)
        if event_id is None or not event_id.startswith(self._run_prefix):
            sink.foreign += 1
            return
        parts = event_id[len(self._run_prefix) :].split(b"-")
        watch = self.watches.get(parts[0]) if len(parts) == 3 else None
        if watch is None or json_string(buf, _BOM_ID_KEY, nl, stop) != watch.bom_id:
            # This run's event, but of a BOM the stream did not list, or named
            # in its JSON as another BOM than its id says.
            sink.misrouted += 1
            return
        if watch.tally.see(int(parts[1])):
            sink.delivered += 1
            sink.latency.record(now_us - int(parts[2]))
