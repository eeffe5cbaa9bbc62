"""A gateway run as its own process (``python -m bomstream serve``), for tests that
need its memory, its exit status, its signals or its whole log output."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from tests.redis_proc import free_port


class GatewayProcess:
    def __init__(self, env: dict[str, str] | None = None, args: list[str] | None = None) -> None:
        self.port = free_port()
        self.log_path = Path(tempfile.mkstemp(prefix="bomstream-gw-", suffix=".log")[1])
        self.env = {
            **os.environ,
            "BOMSTREAM_SERVER_PORT": str(self.port),
            "BOMSTREAM_SERVER_HOST": "127.0.0.1",
            **(env or {}),
        }
        self.args = args or []
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, wait: bool = True, healthy: bool = True) -> None:
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child owns it from here
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bomstream", "serve", *self.args],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        if wait:
            self.wait_listening(healthy=healthy)

    def wait_listening(self, timeout: float = 15.0, healthy: bool = True) -> None:
        """Wait until the health check answers (with 200, when ``healthy``)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited {self.proc.returncode}: {self.output()}")
            try:
                with urllib.request.urlopen(f"{self.url}/api/enrichment/health", timeout=1):
                    return
            except urllib.error.HTTPError:
                if not healthy:
                    return  # listening; unhealthy is still an answer
                time.sleep(0.05)
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("gateway did not start listening")

    def rss_bytes(self) -> int:
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")
