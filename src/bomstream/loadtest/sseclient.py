"""One SSE stream over a raw asyncio protocol: HTTP/1.1 response, chunked
decoding and event-stream framing, parsed by hand.

The parser works on the received bytes in place. In the common case (whole
chunks, whole frames, every event with an ``id:`` line first) it allocates
only the id slice per event; partial chunks and frames fall back to small
buffers. Lines end in LF, CRLF or CR as the event-stream format allows.
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol, cast

from bomstream.loadtest.histogram import LogHistogram
from bomstream.loadtest.tally import StreamTally

_HEADERS, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_CRLF, _RAW, _DONE = range(6)


class Sink(Protocol):
    """What a stream reports to; one sink is shared by every stream of a client process."""

    run_id: str
    latency: LogHistogram
    delivered: int
    foreign: int
    misrouted: int
    bytes: int
    keepalives: int

    def opened(self, conn: SSEConnection) -> None: ...

    def refused(self, conn: SSEConnection, status: int) -> None: ...

    def ended(self, conn: SSEConnection, reason: str) -> None: ...

    def lost(self, conn: SSEConnection, exc: BaseException | None) -> None: ...


class SSEConnection(asyncio.Protocol):
    __slots__ = (
        "_chunk_left",
        "_prefix",
        "_raw",
        "_request",
        "_sse",
        "_state",
        "bom",
        "closed",
        "end_reason",
        "index",
        "last_event_id",
        "sink",
        "status",
        "tally",
        "transport",
    )

    def __init__(
        self, sink: Sink, index: int, bom: int, request: bytes, tally: StreamTally
    ) -> None:
        self.sink = sink
        self.index = index
        self.bom = bom
        self.tally = tally
        self._request = request
        self._prefix = f"{sink.run_id}-{bom}-".encode()
        self._state = _HEADERS
        self._raw = b""
        self._sse = bytearray()
        self._chunk_left = 0
        self.status = 0
        self.end_reason: str | None = None
        self.last_event_id: bytes | None = None
        self.transport: asyncio.Transport | None = None
        self.closed = False

    # -- asyncio.Protocol ------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = t = cast(asyncio.Transport, transport)
        t.write(self._request)

    def connection_lost(self, exc: BaseException | None) -> None:
        self.closed = True
        self.sink.lost(self, exc)

    def eof_received(self) -> bool | None:
        return None

    def data_received(self, data: bytes) -> None:
        sink = self.sink
        sink.bytes += len(data)
        now_us = time.time_ns() // 1000
        pos = 0
        if self._raw:
            data = self._raw + data
            self._raw = b""
        elif self._state == _CHUNK_SIZE and not self._sse:
            pos = self._whole_chunks(data, now_us)
            if pos == len(data):
                return
        state = self._state
        n = len(data)
        while pos < n:
            if state == _CHUNK_SIZE:
                nl = data.find(b"\r\n", pos)
                if nl < 0:
                    break
                size = int(data[pos:nl].split(b";", 1)[0], 16)
                pos = nl + 2
                if size == 0:
                    state = _DONE
                    self._close()
                    break
                self._chunk_left = size
                state = _CHUNK_DATA
            elif state == _CHUNK_DATA:
                end = pos + self._chunk_left
                if end > n:
                    end = n
                self._segment(data, pos, end, now_us)
                self._chunk_left -= end - pos
                pos = end
                if self._chunk_left == 0:
                    state = _CHUNK_CRLF
            elif state == _CHUNK_CRLF:
                if n - pos < 2:
                    break
                pos += 2
                state = _CHUNK_SIZE
            elif state == _RAW:
                self._segment(data, pos, n, now_us)
                pos = n
            elif state == _HEADERS:
                head_end = data.find(b"\r\n\r\n", pos)
                if head_end < 0:
                    break
                state = self._headers(data[pos:head_end])
                pos = head_end + 4
                if state == _DONE:
                    break
            else:
                pos = n
        self._state = state
        if pos < n and state != _DONE:
            self._raw = data[pos:]

    # -- parsing -------------------------------------------------------------

    def _whole_chunks(self, data: bytes, now_us: int) -> int:
        """The fast path: complete chunks, each ending a frame, each frame an event
        with its id first. Returns how far it got; the general path does the rest."""
        sink = self.sink
        tally = self.tally
        prefix = self._prefix
        plen = len(prefix)
        hist = sink.latency
        counts = hist.counts
        index = LogHistogram.index
        pos = 0
        n = len(data)
        while pos < n:
            nl = data.find(b"\r\n", pos, pos + 10)
            if nl < 0:
                return pos
            try:
                size = int(data[pos:nl], 16)
            except ValueError:
                return pos
            start = nl + 2
            end = start + size
            if (
                size == 0
                or end + 2 > n
                or not data.startswith(b"id: ", start)
                or not data.endswith(b"\n\n", start, end)
                # Exactly id, event and data lines and the blank line: one frame.
                or data.count(b"\n", start, end) != 4
                or data.find(b"\r", start, end) >= 0
            ):
                return pos
            eol = data.find(b"\n", start)
            event_id = data[start + 4 : eol]
            self.last_event_id = event_id
            if event_id.startswith(prefix):
                seq_text, _, sent_text = event_id[plen:].partition(b"-")
                seq = int(seq_text)
                # StreamTally.see and LogHistogram.record, inlined for the common case.
                if seq == tally.last + 1:
                    tally.last = seq
                    tally.received += 1
                    fresh = True
                else:
                    fresh = tally.see(seq)
                if fresh:
                    sink.delivered += 1
                    latency = now_us - int(sent_text)
                    if latency < 0:
                        latency = 0
                    i = index(latency)
                    counts[i] = counts.get(i, 0) + 1
                    hist.count += 1
                    hist.total += latency
                    if latency > hist.max:
                        hist.max = latency
            else:
                self._frames(data, start, end, now_us)
            pos = end + 2
        return pos

    def _headers(self, head: bytes) -> int:
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ", 2)
        try:
            self.status = int(parts[1])
        except (IndexError, ValueError):
            self.status = 0
        if self.status != 200:
            self.sink.refused(self, self.status)
            self._close()
            return _DONE
        chunked = False
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"transfer-encoding" and b"chunked" in value.lower():
                chunked = True
        self.sink.opened(self)
        return _CHUNK_SIZE if chunked else _RAW

    def _segment(self, data: bytes, start: int, end: int, now_us: int) -> None:
        """Event-stream bytes ``data[start:end]``: handle every complete frame."""
        sse = self._sse
        if data.find(b"\r", start, end) >= 0 or (sse and sse[-1] == 13):
            # Rare: CR line endings. Normalise into the side buffer.
            self._sse += data[start:end]
            self._normalise_and_drain(now_us)
            return
        if not self._sse:
            last = data.rfind(b"\n\n", start, end)
            if last < 0:
                self._sse += data[start:end]
                return
            self._frames(data, start, last + 2, now_us)
            if last + 2 < end:
                self._sse += data[last + 2 : end]
            return
        self._sse += data[start:end]
        buf = self._sse
        last = buf.rfind(b"\n\n")
        if last >= 0:
            whole = bytes(buf[: last + 2])
            del buf[: last + 2]
            self._frames(whole, 0, len(whole), now_us)

    def _normalise_and_drain(self, now_us: int) -> None:
        buf = self._sse
        # A trailing CR may be the first half of CRLF: keep it for the next read.
        keep_cr = buf.endswith(b"\r")
        body = bytes(buf[:-1] if keep_cr else buf)
        text = body.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        last = text.rfind(b"\n\n")
        buf.clear()
        if last >= 0:
            self._frames(text, 0, last + 2, now_us)
            buf += text[last + 2 :]
        else:
            buf += text
        if keep_cr:
            buf += b"\r"

    def _frames(self, buf: bytes, pos: int, end: int, now_us: int) -> None:
        """Every frame in ``buf[pos:end]``; ``end`` is just past a blank line."""
        while pos < end:
            stop = buf.find(b"\n\n", pos, end)
            if stop < 0:
                return
            if stop == pos:
                pos += 1
                continue
            if buf.startswith(b"id: ", pos):
                self._id_frame(buf, pos, stop, now_us)
            else:
                self._other_frame(buf[pos:stop])
            pos = stop + 2

    def _id_frame(self, buf: bytes, pos: int, stop: int, now_us: int) -> None:
        """The event frame ``buf[pos:stop]``, its ``id:`` line first: the id
        alone names the run, the BOM, the sequence and the send time."""
        sink = self.sink
        prefix = self._prefix
        nl = buf.find(b"\n", pos, stop)
        event_id = buf[pos + 4 : nl if nl >= 0 else stop]
        self.last_event_id = event_id
        if event_id.startswith(prefix):
            rest = event_id[len(prefix) :].split(b"-")
            if self.tally.see(int(rest[0])):
                sink.delivered += 1
                sink.latency.record(now_us - int(rest[1]))
        elif event_id.startswith(sink.run_id.encode() + b"-"):
            sink.misrouted += 1
        else:
            sink.foreign += 1

    def _other_frame(self, frame: bytes) -> None:
        """Frames without a leading id: comments, retry, control events."""
        event = b""
        event_id: bytes | None = None
        data: list[bytes] = []
        fields: list[bytes] = []
        for line in frame.split(b"\n"):
            if line.startswith(b":"):
                self.sink.keepalives += 1
                continue
            name, _, value = line.partition(b":")
            if value.startswith(b" "):
                value = value[1:]
            if name == b"id":
                event_id = value
                continue
            fields.append(line)
            if name == b"event":
                event = value
            elif name == b"data":
                data.append(value)
        if event_id is not None:
            # An id line later in the frame: rebuild it the usual way round.
            rebuilt = b"id: " + event_id + b"\n" + b"".join(f + b"\n" for f in fields) + b"\n"
            self._frames(rebuilt, 0, len(rebuilt), time.time_ns() // 1000)
        elif event == b"stream_end":
            reason = _json_field(b"\n".join(data), b"reason")
            self.end_reason = reason
            self.sink.ended(self, reason)

    # -- control -------------------------------------------------------------

    def _close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def close(self) -> None:
        self._close()


def _json_field(data: bytes, key: bytes) -> str:
    import orjson

    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        return "?"
    value = obj.get(key.decode()) if isinstance(obj, dict) else None
    return str(value) if value is not None else "?"


def build_request(
    host: str, port: int, path: str, token: str | None, last_event_id: bytes | None
) -> bytes:
    lines = [
        f"GET {path} HTTP/1.1",
        f"Host: {host}:{port}",
        "Accept: text/event-stream",
        "Cache-Control: no-cache",
    ]
    if token:
        lines.append(f"Authorization: Bearer {token}")
    head = ("\r\n".join(lines) + "\r\n").encode()
    if last_event_id is not None:
        head += b"Last-Event-ID: " + last_event_id + b"\r\n"
    return head + b"\r\n"
