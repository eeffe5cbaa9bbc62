"""One worker process as the supervisor sees it: started, listening, ended."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import time
from collections.abc import Mapping

from bomstream.metrics import MULTIPROC_ENV
from bomstream.supervisors.handoff import LISTENING, WorkerSpec

# ``serve`` with this flag reads its spec from stdin instead of a config.
SUPERVISED_FLAG = "--supervised"


def worker_command() -> list[str]:
    """The same interpreter, so a console script, a venv and ``python -m`` all work."""
    return [sys.executable, "-m", "bomstream", "serve", SUPERVISED_FLAG]


def worker_env(base: Mapping[str, str], metrics_dir: str) -> dict[str, str]:
    """The supervisor's environment, minus the BOMSTREAM_* settings (the spec
    carries the resolved config), plus prometheus-client's multiprocess
    directory, which must be there before the worker imports it."""
    env = {k: v for k, v in base.items() if not k.startswith("BOMSTREAM_")}
    env[MULTIPROC_ENV] = metrics_dir
    return env


def describe_exit(returncode: int) -> dict[str, object]:
    """``exit_code`` for a worker that exited, ``signal`` for one that was killed."""
    if returncode < 0:
        try:
            return {"signal": signal.Signals(-returncode).name}
        except ValueError:
            return {"signal": -returncode}
    return {"exit_code": returncode}


class WorkerProcess:
    def __init__(self, index: int, proc: asyncio.subprocess.Process) -> None:
        self.index = index
        self.pid = proc.pid
        self._proc = proc
        self._started = time.monotonic()

    @classmethod
    async def spawn(cls, spec: WorkerSpec, env: Mapping[str, str]) -> WorkerProcess:
        proc = await asyncio.create_subprocess_exec(
            *worker_command(),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env=dict(env),
            # Its own session: a terminal's Ctrl-C reaches the supervisor
            # alone, which forwards it, instead of every process at once.
            start_new_session=True,
        )
        worker = cls(spec.index, proc)
        assert proc.stdin is not None
        proc.stdin.write(spec.encode())
        with contextlib.suppress(ConnectionError):
            # A worker that died at once; wait() tells how.
            await proc.stdin.drain()
        return worker

    @property
    def uptime_s(self) -> float:
        return time.monotonic() - self._started

    @property
    def running(self) -> bool:
        return self._proc.returncode is None

    async def listening(self) -> bool:
        """Wait for the worker's ``listening`` line: False if it exited first."""
        assert self._proc.stdout is not None
        while True:
            try:
                line = await self._proc.stdout.readline()
            except ValueError:  # a line longer than the reader's limit: not ours
                continue
            if not line:
                return False
            if line == LISTENING:
                return True
            _pass_on(line)

    async def wait(self) -> int:
        """Wait for the worker to exit; its return code (negative: killed by that signal)."""
        assert self._proc.stdout is not None and self._proc.stdin is not None
        while data := await self._proc.stdout.read(65536):
            _pass_on(data)
        code = await self._proc.wait()
        self._proc.stdin.close()
        return code

    def signal(self, sig: signal.Signals) -> None:
        if self.running:
            with contextlib.suppress(ProcessLookupError):
                self._proc.send_signal(sig)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)


def _pass_on(data: bytes) -> None:
    # The pipe replaced the worker's stdout; whatever else it prints goes where
    # it would have gone.
    out = sys.stdout.buffer
    out.write(data)
    out.flush()
