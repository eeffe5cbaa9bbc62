"""A gateway as its own process (``python -m bomstream serve``), configured the way
an operator does it: through ``BOMSTREAM_*`` environment variables."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp

HEALTH = "/api/enrichment/health"
_LISTEN_URL = re.compile(r"http://127\.0\.0\.1:(\d+)")
# A supervisor's "worker started" line, text or JSON.
_WORKER_PID = re.compile(r'pid"?[=:] ?(\d+)')


class GatewayProcess:
    def __init__(
        self, *extra_args: str, env: dict[str, str] | None = None, **settings: Any
    ) -> None:
        """``settings`` are config keys as ``server_heartbeat_s=0.2`` (section_key);
        ``env`` adds raw environment variables on top."""
        # Port 0: the gateway picks a free port itself and logs it. Choosing one
        # here instead could hand two gateways the same port.
        self.port = 0
        self.dir = Path(tempfile.mkdtemp(prefix="bomstream-gw-"))
        self.log_path = self.dir / "gateway.log"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("BOMSTREAM_")}
        self.env.update(
            {
                "BOMSTREAM_SERVER_HOST": "127.0.0.1",
                "BOMSTREAM_SERVER_PORT": "0",
                "BOMSTREAM_SERVER_ACCESS_LOG": "false",
                # A supervisor's metrics directory goes in here, so close()
                # removes it even when the supervisor could not.
                "TMPDIR": str(self.dir),
            }
        )
        for key, value in settings.items():
            self.env[f"BOMSTREAM_{key.upper()}"] = str(value)
        self.env.update(env or {})
        self.args = [sys.executable, "-m", "bomstream", "serve", *extra_args]
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        assert self.port, "the gateway has not said where it listens yet"
        return f"http://127.0.0.1:{self.port}"

    def _listening_port(self) -> int:
        for line in self.log_text().splitlines():
            if "bomstream listening" in line:
                found = _LISTEN_URL.search(line)
                assert found is not None, line
                return int(found.group(1))
        return 0

    def spawn(self) -> subprocess.Popen[bytes]:
        with open(self.log_path, "ab") as log:
            # cwd is an empty directory, so no ./config.toml is picked up.
            self.proc = subprocess.Popen(
                self.args, cwd=self.dir, env=self.env, stdout=log, stderr=log
            )
        return self.proc

    async def start(self, session: aiohttp.ClientSession, timeout: float = 15.0) -> None:
        """Start and wait until the health check answers 200 (Redis subscribed)."""
        self.spawn()
        assert self.proc is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited {self.proc.returncode}: {self.log_text()}")
            self.port = self.port or self._listening_port()
            if not self.port:
                await asyncio.sleep(0.05)
                continue
            try:
                async with session.get(self.url + HEALTH) as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientConnectionError:
                pass
            await asyncio.sleep(0.05)
        raise RuntimeError(f"gateway not healthy after {timeout}s: {self.log_text()}")

    def start_sync(self, timeout: float = 15.0) -> None:
        """``start`` for code that has no event loop at hand."""
        self.spawn()
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited {self.proc.returncode}: {self.log_text()}")
            self.port = self.port or self._listening_port()
            if self.port:
                try:
                    with urllib.request.urlopen(self.url + HEALTH, timeout=1):
                        return
                except OSError:
                    pass
            time.sleep(0.05)
        raise RuntimeError(f"gateway not healthy after {timeout}s: {self.log_text()}")

    def rss_bytes(self) -> int:
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS line")

    def stop(self) -> None:
        """SIGTERM, as an operator would; killed if it has not exited in 15 s.
        The log stays readable until ``close``."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    async def health(self, session: aiohttp.ClientSession) -> dict[str, Any]:
        async with session.get(self.url + HEALTH) as resp:
            body: dict[str, Any] = await resp.json()
            return body

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    async def wait(self, timeout: float) -> int:
        """Wait for the process to exit without blocking the event loop."""
        assert self.proc is not None
        proc = self.proc
        return await asyncio.wait_for(asyncio.to_thread(proc.wait), timeout)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def close(self) -> None:
        self.kill()
        for pid in self.started_worker_pids():
            # Workers end on their own once their supervisor is gone; a test
            # that failed half way should not wait for that.
            if is_worker(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.dir, ignore_errors=True)

    def started_worker_pids(self) -> list[int]:
        """Every worker pid a supervisor (``--workers N``) has logged, in order."""
        out = []
        for line in self.log_text().splitlines():
            if "worker started" in line:
                found = _WORKER_PID.search(line)
                assert found is not None, line
                out.append(int(found.group(1)))
        return out

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def json_log(self) -> list[dict[str, Any]]:
        """Every log line parsed as JSON (fails on any line that is not)."""
        return [json.loads(line) for line in self.log_text().splitlines() if line.strip()]


def is_worker(pid: int) -> bool:
    """Whether ``pid`` is a live (not zombie) supervised worker process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    state = stat.rsplit(")", 1)[1].split()[0]
    return state != "Z" and b"--supervised" in cmdline
