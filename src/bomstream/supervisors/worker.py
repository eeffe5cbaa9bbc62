"""The worker's side: ``bomstream serve --supervised``, started by a supervisor.

It reads its spec from stdin (see ``handoff``), serves as any gateway does,
tells the supervisor once it listens, and shuts down gracefully, exactly as
on SIGTERM, when the supervisor goes away: a supervisor killed outright
leaves no worker behind holding the port.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from types import FrameType

from bomstream.config import ConfigError
from bomstream.eventloop import run
from bomstream.logs import setup_logging
from bomstream.server import RunningGateway, WorkerRole, serve
from bomstream.supervisors.handoff import LISTENING, HandoffError, WorkerSpec, read_spec

log = logging.getLogger("bomstream.worker")

SPEC_FD = 0
REPLY_FD = 1


def worker_main() -> int:
    # Until serve() installs the loop's handlers, a stop request has no streams
    # to end: leave at once, quietly, and with status 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _leave)
    try:
        spec = read_spec(SPEC_FD)
    except HandoffError as exc:
        print(f"bomstream: worker: {exc}", file=sys.stderr)
        return 1
    cfg = spec.config
    a = cfg.auth
    setup_logging(
        cfg.server.log_format,
        cfg.server.log_level,
        secrets=(a.admin_token, a.jwt_secret, cfg.metrics.token),
        process_fields={"worker": spec.index},
    )
    try:
        run(_serve(spec))
    except OSError as exc:
        where = f"{cfg.server.host}:{cfg.server.port}"
        print(f"bomstream: worker {spec.index} cannot listen on {where}: {exc}", file=sys.stderr)
        return 1
    except ConfigError as exc:
        print(f"bomstream: config error: {exc}", file=sys.stderr)
        return 2
    return 0


def _leave(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


async def _serve(spec: WorkerSpec) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def supervisor_gone() -> None:
        loop.remove_reader(SPEC_FD)
        if not stop.is_set():
            log.warning("supervisor gone; shutting down")
            stop.set()

    def on_spec_fd() -> None:
        # The supervisor never writes after the spec: readable means end of file.
        if not os.read(SPEC_FD, 4096):
            supervisor_gone()

    def listening(_running: RunningGateway) -> None:
        try:
            os.write(REPLY_FD, LISTENING)
        except BrokenPipeError:
            supervisor_gone()

    loop.add_reader(SPEC_FD, on_spec_fd)
    try:
        await serve(
            spec.config, WorkerRole(spec.index, spec.metrics_dir), stop=stop, on_listening=listening
        )
    finally:
        loop.remove_reader(SPEC_FD)
