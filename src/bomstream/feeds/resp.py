"""Where a Redis is and how to talk to it: the URL, and commands as RESP bytes."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import unquote, urlsplit


@dataclass(frozen=True, slots=True)
class RedisTarget:
    host: str
    port: int
    unix_path: str | None
    username: str | None
    password: str | None
    tls: bool

    @property
    def display(self) -> str:
        # Never the password.
        return self.unix_path or f"{self.host}:{self.port}"

    def at(self, host: str, port: int) -> RedisTarget:
        """Another node of the same deployment: same credentials and TLS."""
        return RedisTarget(host, port, None, self.username, self.password, self.tls)


def parse_redis_url(url: str) -> RedisTarget:
    parts = urlsplit(url)
    username = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password else None
    if parts.scheme == "unix":
        return RedisTarget("", 0, parts.path, username, password, False)
    return RedisTarget(
        parts.hostname or "127.0.0.1",
        parts.port or 6379,
        None,
        username,
        password,
        parts.scheme == "rediss",
    )


def encode_command(*args: bytes) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        out.append(b"$%d\r\n%s\r\n" % (len(a), a))
    return b"".join(out)
