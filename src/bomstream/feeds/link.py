"""One subscription connection to one Redis node.

The connection is read by an asyncio protocol with the hiredis parser: each
socket read is parsed in one go and every message in it is handed on
synchronously, so a burst of events costs one wake-up, not one per message.

Every command written is remembered until its replies have come back, so a
confirmation or an error can be told apart from what Redis sends unasked:
a ``sunsubscribe`` nobody requested means the node gave up the channel's
slot (a failover or a slot migration). Each command carries a sequence
number, and a confirmation names the one it answers, so the caller can
ignore the answer to a command it has since overtaken with another.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from collections.abc import Iterable
from typing import Protocol, cast

import hiredis
from prometheus_client import Counter
from redis.crc import key_slot

from bomstream.feeds.resp import RedisTarget, encode_command

CONNECT_TIMEOUT_S = 5.0

_MESSAGE = b"message"
_SMESSAGE = b"smessage"
_PMESSAGE = b"pmessage"
_SUBSCRIBED = frozenset((b"subscribe", b"ssubscribe", b"psubscribe"))
_UNSUBSCRIBED = frozenset((b"unsubscribe", b"sunsubscribe", b"punsubscribe"))


class FeedError(Exception):
    """The subscription cannot go on (error reply, silent peer)."""


class LinkSink(Protocol):
    def on_message(self, channel: bytes, data: bytes) -> None: ...

    def on_confirmed(self, link: Link, channel: bytes, subscribed: bool, seq: int) -> None:
        """Redis answered command ``seq`` for ``channel``."""
        ...

    def on_lost(self, link: Link, channel: bytes) -> None:
        """Redis ended a subscription nobody asked it to end."""
        ...

    def on_refused(self, link: Link, channels: tuple[bytes, ...], seq: int, error: str) -> None:
        """Redis answered command ``seq`` with an error (``MOVED``, ``CLUSTERDOWN``...)."""
        ...


class _Sent:
    __slots__ = ("channels", "next", "ping", "reply", "seq")

    def __init__(
        self,
        seq: int,
        reply: bytes,
        channels: tuple[bytes, ...],
        ping: asyncio.Future[BaseException | None] | None = None,
    ) -> None:
        self.seq = seq
        self.reply = reply
        self.channels = channels
        self.next = 0
        self.ping = ping


class Link(asyncio.Protocol):
    """``sharded``: a Redis Cluster node, where SSUBSCRIBE names channels of one slot only."""

    def __init__(self, sink: LinkSink, name: str, bytes_in: Counter, sharded: bool = False) -> None:
        loop = asyncio.get_running_loop()
        self.name = name
        self.sharded = sharded
        self._sink = sink
        self._bytes_in = bytes_in
        self._reader = hiredis.Reader()
        self._sent: deque[_Sent] = deque()
        self._seq = 0
        # Carries an exception as its result rather than raising it, so one that
        # nobody awaits (the link died first) is never reported as lost.
        self.closed: asyncio.Future[BaseException | None] = loop.create_future()
        self.last_seen = time.monotonic()
        self.transport: asyncio.Transport | None = None

    # -- reading -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A cast, not an isinstance check: uvloop's TCP transport does not
        # derive from asyncio.Transport, and `bomstream serve` runs on uvloop.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.last_seen = time.monotonic()
        self._bytes_in.inc(len(data))
        reader = self._reader
        on_message = self._sink.on_message
        try:
            reader.feed(data)
            while (reply := reader.gets()) is not False:
                if type(reply) is list and reply:
                    kind = reply[0]
                    # Plain comparisons: the hot path, and cheaper than a tuple test.
                    if (kind == _MESSAGE or kind == _SMESSAGE) and len(reply) == 3:  # noqa: SIM109
                        on_message(reply[1], reply[2])
                    elif kind == _PMESSAGE and len(reply) == 4:
                        on_message(reply[2], reply[3])
                    else:
                        self._on_push(kind, reply)
                elif isinstance(reply, hiredis.ReplyError):
                    self._on_error(str(reply))
                else:
                    self._on_simple()
        except hiredis.ProtocolError as exc:
            self.fail(FeedError(f"protocol error from Redis: {exc}"))

    def _on_push(self, kind: object, reply: list[object]) -> None:
        if kind == b"pong":
            self._on_simple()
            return
        channel = reply[1] if len(reply) > 1 else None
        if not isinstance(channel, bytes):
            return
        if kind in _SUBSCRIBED:
            self._confirm(kind, channel, True)
        elif kind in _UNSUBSCRIBED:
            self._confirm(kind, channel, False)

    def _confirm(self, kind: object, channel: bytes, subscribed: bool) -> None:
        sent = self._sent
        if sent:
            head = sent[0]
            if head.reply == kind and head.channels[head.next] == channel:
                head.next += 1
                if head.next == len(head.channels):
                    sent.popleft()
                self._sink.on_confirmed(self, channel, subscribed, head.seq)
                return
        if not subscribed:
            self._sink.on_lost(self, channel)

    def _on_simple(self) -> None:
        """+OK (AUTH) or PONG: the answer to the oldest command, if that is one of those."""
        if not self._sent or self._sent[0].channels:
            return
        head = self._sent.popleft()
        if head.ping is not None and not head.ping.done():
            head.ping.set_result(None)

    def _on_error(self, message: str) -> None:
        if not self._sent:
            self.fail(FeedError(f"Redis refused: {message}"))
            return
        head = self._sent.popleft()
        if not head.channels:
            # AUTH or PING: the connection itself is unusable.
            self.fail(FeedError(f"Redis refused: {message}"))
            return
        self._sink.on_refused(self, head.channels[head.next :], head.seq, message)

    # -- writing -------------------------------------------------------------

    def _write(self, parts: list[bytes]) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"".join(parts))

    def auth(self, username: str | None, password: str) -> None:
        args = [b"AUTH"] + ([username.encode()] if username else []) + [password.encode()]
        self._seq += 1
        self._sent.append(_Sent(self._seq, b"", ()))
        self._write([encode_command(*args)])

    def ping(self) -> asyncio.Future[BaseException | None]:
        """A future that completes once every command sent before it is answered."""
        fut: asyncio.Future[BaseException | None] = asyncio.get_running_loop().create_future()
        if self.closed.done():
            fut.set_result(self.closed.result() or ConnectionResetError("closed"))
            return fut
        self._seq += 1
        self._sent.append(_Sent(self._seq, b"pong", (), fut))
        self._write([encode_command(b"PING")])
        return fut

    def psubscribe(self, pattern: bytes) -> None:
        self._seq += 1
        self._sent.append(_Sent(self._seq, b"psubscribe", (pattern,)))
        self._write([encode_command(b"PSUBSCRIBE", pattern)])

    def subscribe(
        self, channels: Iterable[bytes], subscribe: bool
    ) -> list[tuple[int, list[bytes]]]:
        """(UN)SUBSCRIBE, or on a cluster node one S(UN)SUBSCRIBE per hash slot, in
        one write. Returns each command's sequence number and its channels."""
        if self.sharded:
            verb, reply = (
                (b"SSUBSCRIBE", b"ssubscribe") if subscribe else (b"SUNSUBSCRIBE", b"sunsubscribe")
            )
            groups: dict[int, list[bytes]] = {}
            for ch in channels:
                groups.setdefault(key_slot(ch), []).append(ch)
            batches = list(groups.values())
        else:
            verb, reply = (
                (b"SUBSCRIBE", b"subscribe") if subscribe else (b"UNSUBSCRIBE", b"unsubscribe")
            )
            batches = [list(channels)]
        out: list[tuple[int, list[bytes]]] = []
        parts = []
        for batch in batches:
            if not batch:
                continue
            self._seq += 1
            self._sent.append(_Sent(self._seq, reply, tuple(batch)))
            parts.append(encode_command(verb, *batch))
            out.append((self._seq, batch))
        self._write(parts)
        return out

    # -- ending --------------------------------------------------------------

    def fail(self, exc: BaseException) -> None:
        self._settle(exc)
        if self.transport is not None:
            self.transport.abort()

    def _settle(self, exc: BaseException) -> None:
        if not self.closed.done():
            self.closed.set_result(exc)
        while self._sent:
            head = self._sent.popleft()
            if head.ping is not None and not head.ping.done():
                head.ping.set_result(exc)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._settle(exc or ConnectionResetError("Redis closed the connection"))

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


async def connect(target: RedisTarget, link: Link) -> None:
    """Open the link's connection, authenticate, and wait until Redis answers."""
    loop = asyncio.get_running_loop()
    if target.unix_path:
        opening = loop.create_unix_connection(lambda: link, target.unix_path)
    else:
        ctx = ssl.create_default_context() if target.tls else None
        opening = loop.create_connection(lambda: link, target.host, target.port, ssl=ctx)
    # asyncio.timeout rather than wait_for: on 3.11, wait_for can swallow a
    # cancellation that arrives as the inner wait completes, and the owner
    # task must always stop when it is cancelled.
    async with asyncio.timeout(CONNECT_TIMEOUT_S):
        await opening
    if target.password is not None:
        link.auth(target.username, target.password)
    await barrier(link)


async def barrier(link: Link) -> None:
    """Wait until Redis has answered everything sent so far (a PING's PONG)."""
    async with asyncio.timeout(CONNECT_TIMEOUT_S):
        failure = await asyncio.shield(link.ping())
    if failure is not None:
        raise failure


async def keep_alive(link: Link, interval: float) -> None:
    """Wait for the link to end; ping it when idle so a dead peer shows. Raises
    when the link is gone or silent for twice ``interval``."""
    if interval <= 0:
        exc = await link.closed
        raise exc if isinstance(exc, Exception) else ConnectionResetError("closed")
    while True:
        try:
            async with asyncio.timeout(interval):
                exc = await asyncio.shield(link.closed)
        except TimeoutError:
            idle = time.monotonic() - link.last_seen
            if idle > 2 * interval:
                raise FeedError(f"no reply from Redis for {idle:.1f}s") from None
            if idle >= interval:
                link.ping()
            continue
        raise exc if isinstance(exc, Exception) else ConnectionResetError("closed")
