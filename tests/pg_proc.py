"""A real PostgreSQL on a free port, owned by the test that started it.

``initdb`` takes seconds, so it runs once per test session into a template
data directory; every server starts from its own ``cp -a`` of it (tens of
milliseconds), so each test has a cluster of its own that it may stop, kill
or freeze without touching another test's. Never the machine's own service:
our own data directory, a free port (never 5432), 127.0.0.1 and a socket
directory inside the temporary directory, trust authentication.

PostgreSQL refuses to run as root. As root, every PostgreSQL process here
runs as the unprivileged ``nobody`` account (present on every Debian system),
in directories chowned to it; the test itself stays root.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from tests.redis_proc import free_port

RUN_AS = "nobody"
SUPERUSER = "postgres"
MACHINE_PORT = 5432

SEED_SCHEMA = """
CREATE TABLE {table} (
  event_id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
  event_type VARCHAR(100) NOT NULL,
  routing_key VARCHAR(255),
  bom_id UUID NOT NULL,
  tenant_id UUID NOT NULL,
  project_id UUID,
  user_id UUID,
  source VARCHAR(50) NOT NULL,
  workflow_id VARCHAR(255),
  workflow_run_id VARCHAR(255),
  state JSONB NOT NULL,
  payload JSONB,
  created_at TIMESTAMPTZ DEFAULT NOW()
);
CREATE INDEX idx_{name}_bom ON {table}(bom_id, created_at DESC);
CREATE INDEX idx_{name}_tenant ON {table}(tenant_id, created_at DESC);
"""


def pg_bindir() -> str:
    """The directory holding initdb and postgres. Debian keeps them in
    /usr/lib/postgresql/<version>/bin, off PATH. Skips without them, but fails
    under CI, where a skipped test would prove nothing."""
    on_path = shutil.which("initdb")
    if on_path:
        return os.path.dirname(os.path.realpath(on_path))
    found = glob.glob("/usr/lib/postgresql/*/bin/initdb")
    if found:
        newest = max(found, key=lambda p: [int(n) for n in re.findall(r"\d+", p)])
        return os.path.dirname(newest)
    message = "PostgreSQL (initdb) is not installed"
    if os.environ.get("CI") == "true":
        pytest.fail(message + " (CI=true: .ci/run must install it)")
    pytest.skip(message)


def _scratch() -> str | None:
    """Where clusters live: memory (/dev/shm) when there is room, since copying
    and writing a data directory on a busy disk costs seconds; else the default."""
    try:
        st = os.statvfs("/dev/shm")
    except OSError:
        return None
    room = st.f_bavail * st.f_frsize
    return "/dev/shm" if room >= 1 << 30 and os.access("/dev/shm", os.W_OK) else None


def _as_owner() -> dict[str, Any]:
    """Popen arguments that run a PostgreSQL binary as an unprivileged user when
    we are root (initdb and postgres refuse root), else as ourselves."""
    if os.geteuid() != 0:
        return {}
    user = pwd.getpwnam(RUN_AS)
    return {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}


def _give_to_owner(path: str) -> None:
    if os.geteuid() == 0:
        user = pwd.getpwnam(RUN_AS)
        os.chown(path, user.pw_uid, user.pw_gid)


class PgTemplate:
    """One initdb'd data directory that servers are copied from."""

    def __init__(self) -> None:
        self.bindir = pg_bindir()
        self.root = tempfile.mkdtemp(prefix="bomstream-pgtemplate-", dir=_scratch())
        _give_to_owner(self.root)
        self.data = os.path.join(self.root, "data")
        result = subprocess.run(
            [
                os.path.join(self.bindir, "initdb"),
                "-D", self.data,
                "-U", SUPERUSER,
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
            ],
            cwd=self.root,
            env={**os.environ, "HOME": self.root},
            capture_output=True,
            timeout=120,
            **_as_owner(),
        )  # fmt: skip
        if result.returncode != 0:
            shutil.rmtree(self.root, ignore_errors=True)
            raise RuntimeError(f"initdb failed: {result.stderr.decode(errors='replace')[-2000:]}")

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


class PostgresProcess:
    def __init__(self, template: PgTemplate) -> None:
        self.bindir = template.bindir
        self.dir = tempfile.mkdtemp(prefix="bomstream-pg-", dir=_scratch())
        _give_to_owner(self.dir)
        self.data = os.path.join(self.dir, "data")
        # cp -a keeps the owner and the 0700 mode that postgres insists on.
        subprocess.run(["cp", "-a", template.data, self.data], check=True, timeout=60)
        self.socket_dir = os.path.join(self.dir, "sock")
        os.mkdir(self.socket_dir)
        _give_to_owner(self.socket_dir)
        self.log_path = os.path.join(self.dir, "postgres.log")
        self.port = free_port()
        while self.port == MACHINE_PORT:
            self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def url(
        self, database: str = "postgres", user: str = SUPERUSER, password: str | None = None
    ) -> str:
        auth = user if password is None else f"{user}:{password}"
        return f"postgresql://{auth}@127.0.0.1:{self.port}/{database}"

    @property
    def pid(self) -> int:
        """The postmaster's pid."""
        assert self.proc is not None, "not running"
        return self.proc.pid

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    os.path.join(self.bindir, "postgres"),
                    "-D", self.data,
                    "-p", str(self.port),
                    "-c", "listen_addresses=127.0.0.1",
                    "-c", f"unix_socket_directories={self.socket_dir}",
                    "-c", "max_connections=40",
                    "-c", "shared_buffers=16MB",
                    # Segments in the data directory, not /dev/shm: a killed
                    # server's go when the directory does.
                    "-c", "dynamic_shared_memory_type=mmap",
                    # Durability buys a test nothing and costs the busy machine.
                    "-c", "fsync=off",
                    "-c", "synchronous_commit=off",
                    "-c", "full_page_writes=off",
                ],
                cwd=self.dir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                # Its own process group, so kill() takes the backends along.
                start_new_session=True,
                **_as_owner(),
            )  # fmt: skip
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.proc = None
                raise RuntimeError(f"postgres exited at start-up: {self.log_tail()}")
            ready = subprocess.run(
                [
                    os.path.join(self.bindir, "pg_isready"),
                    "-q", "-h", "127.0.0.1", "-p", str(self.port), "-t", "1",
                ],
                timeout=10,
            )  # fmt: skip
            if ready.returncode == 0:
                return
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"postgres did not start: {self.log_tail()}")

    def stop(self) -> None:
        """A fast shutdown (SIGINT): clients are told, sessions end, the server exits."""
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.kill()
            return
        self._wait_group_gone(self.proc.pid)
        self.proc = None

    def kill(self) -> None:
        """SIGKILL to the postmaster and every backend at once: a crash."""
        if self.proc is None:
            return
        pgid = self.proc.pid
        shmid = self._shmid()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        self._wait_group_gone(pgid)
        self.proc = None
        # A crash leaves the postmaster's System V segment behind (a clean
        # stop removes it); remove it so test runs leave nothing on the machine.
        if shmid is not None:
            subprocess.run(["ipcrm", "-m", shmid], capture_output=True, timeout=10)

    def _shmid(self) -> str | None:
        # postmaster.pid, line 7: "<shm key> <shm id>".
        try:
            lines = Path(self.data, "postmaster.pid").read_text().splitlines()
        except OSError:
            return None
        fields = lines[6].split() if len(lines) > 6 else []
        return fields[1] if len(fields) == 2 and fields[1].isdigit() else None

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        """Stop it for good and remove its directory."""
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def set_hba(self, lines: Iterable[str]) -> None:
        """Replace pg_hba.conf and make the running server read it."""
        Path(self.data, "pg_hba.conf").write_text("".join(line + "\n" for line in lines))
        assert self.proc is not None, "not running"
        self.proc.send_signal(signal.SIGHUP)

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return Path(self.log_path).read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    @staticmethod
    def _wait_group_gone(pgid: int) -> None:
        # A new postmaster on the same data directory refuses to start while
        # an old backend still holds the shared memory.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return
            except PermissionError:
                pass
            time.sleep(0.02)
        raise RuntimeError("postgres processes did not exit")

    async def connect(self, **kwargs: Any) -> asyncpg.Connection[asyncpg.Record]:
        """A superuser connection for setting a test up (not the code under test)."""
        return await asyncpg.connect(self.url(), timeout=10, **kwargs)


async def create_seed_table(
    conn: asyncpg.Connection[asyncpg.Record], table: str = "enrichment_events"
) -> None:
    """The workers' table exactly as the seed schema has it."""
    name = table.replace(".", "_")
    await conn.execute(SEED_SCHEMA.format(table=table, name=name))


async def insert_rows(
    conn: asyncpg.Connection[asyncpg.Record],
    rows: Iterable[Mapping[str, Any]],
    table: str = "enrichment_events",
) -> None:
    """Insert rows as a worker would; dict and list values go in as JSON text."""
    for row in rows:
        cols = list(row)
        values = [json.dumps(v) if isinstance(v, (dict, list)) else v for v in row.values()]
        placeholders = ", ".join(f"${i}" for i in range(1, len(cols) + 1))
        await conn.execute(
            f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({placeholders})", *values
        )
