"""A small SSE reader for tests, following the WHATWG event-stream parsing rules."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

import aiohttp


@dataclass
class Frame:
    event: str = "message"
    data: str = ""
    id: str | None = None
    retry: int | None = None
    comments: list[str] = field(default_factory=list)

    def json(self) -> Any:
        return json.loads(self.data)


class SSEStream:
    """Reads frames from an open response. A frame with only a comment or only
    ``retry`` is returned too, so tests can see heartbeats."""

    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self.resp = resp
        self.last_event_id: str | None = None

    async def next(self, timeout: float = 5.0) -> Frame | None:
        """The next frame, or None at the end of the stream."""
        frame = Frame()
        data: list[str] = []
        seen = False
        while True:
            raw = await asyncio.wait_for(self.resp.content.readline(), timeout)
            if not raw:
                return None
            line = raw.decode().rstrip("\n").rstrip("\r")
            if line == "":
                if not seen:
                    continue
                frame.data = "\n".join(data)
                if frame.id is not None:
                    self.last_event_id = frame.id
                return frame
            seen = True
            if line.startswith(":"):
                frame.comments.append(line[1:].strip())
                continue
            name, _, value = line.partition(":")
            if value.startswith(" "):
                value = value[1:]
            if name == "data":
                data.append(value)
            elif name == "event":
                frame.event = value
            elif name == "id":
                frame.id = value
            elif name == "retry":
                frame.retry = int(value)

    async def next_event(self, timeout: float = 5.0) -> Frame | None:
        """The next frame that carries data (skipping heartbeats and retry)."""
        while True:
            frame = await self.next(timeout)
            if frame is None or frame.data or frame.event != "message":
                return frame

    async def events_until_end(self, timeout: float = 10.0) -> list[Frame]:
        out: list[Frame] = []
        while True:
            frame = await self.next_event(timeout)
            if frame is None:
                return out
            out.append(frame)
