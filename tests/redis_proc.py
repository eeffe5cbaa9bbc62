"""A real redis-server on a free port, owned by the test that started it."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def require_binary(name: str) -> str:
    """The path of a binary the test needs: skip without it, but fail under CI,
    where a skipped test would prove nothing."""
    path = shutil.which(name) or (
        f"/usr/sbin/{name}" if os.path.exists(f"/usr/sbin/{name}") else None
    )
    if path is None:
        message = f"{name} is not installed"
        if os.environ.get("CI") == "true":
            pytest.fail(message + " (CI=true: .ci/run must install it)")
        pytest.skip(message)
    return path


class RedisProcess:
    def __init__(self) -> None:
        self.binary = require_binary("redis-server")
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="bomstream-redis-")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                self.binary,
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--save", "",
                "--appendonly", "no",
                "--dir", self.dir,
                "--loglevel", "warning",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.02)
        raise RuntimeError("redis-server did not start")

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def close(self) -> None:
        """Kill it for good and remove its working directory."""
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)

    def restart(self) -> None:
        self.kill()
        self.start()

    def publish(self, channel: str, data: bytes | str) -> int:
        """PUBLISH through a plain socket, exactly as any worker's client would."""
        payload = data.encode() if isinstance(data, str) else data
        args = [b"PUBLISH", channel.encode(), payload]
        cmd = b"*3\r\n" + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
            s.sendall(cmd)
            reply = s.recv(64)
        assert reply.startswith(b":"), reply
        return int(reply[1:].split(b"\r\n")[0])
