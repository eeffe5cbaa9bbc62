"""The supervisor: N workers on one port, kept running, stopped together.

One task per worker slot owns that slot's process: it starts the worker,
waits for it to exit, and restarts it after a backoff unless the supervisor
is stopping. SIGTERM and SIGINT are forwarded to every worker, each of which
ends its streams with ``server_shutdown`` as a lone gateway would; workers
still running ``server.shutdown_grace_s`` plus a margin later are killed.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import shutil
import signal
import tempfile

from prometheus_client.multiprocess import mark_process_dead

from bomstream.config import Config
from bomstream.eventloop import run
from bomstream.jwt_auth import JwtVerifier
from bomstream.logs import FIELDS
from bomstream.server import http_url, listening_fields
from bomstream.supervisors.backoff import RestartBackoff
from bomstream.supervisors.handoff import WorkerSpec
from bomstream.supervisors.listen import Reservation, reserve_port
from bomstream.supervisors.worker_process import WorkerProcess, describe_exit, worker_env

log = logging.getLogger("bomstream.supervisor")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# Beyond the grace period each worker gives its own streams: time to close
# Redis and exit before the supervisor stops waiting and kills it.
KILL_MARGIN_S = 3.0
# After SIGKILL a process is gone within milliseconds; this only bounds a bug.
REAP_S = 5.0


def supervise(cfg: Config, count: int) -> int:
    """Run ``count`` workers until SIGTERM/SIGINT; the exit status.

    Raises what a lone gateway would, once, before any worker starts:
    ConfigError for unusable key files, OSError for a port that is taken.
    """
    JwtVerifier(cfg.auth)  # each worker reads the key files again; a bad one is reported here
    reservation = reserve_port(cfg.server.host, cfg.server.port)
    metrics_dir = tempfile.mkdtemp(prefix="bomstream-metrics-")
    try:
        return run(Supervisor(cfg, count, reservation, metrics_dir).run())
    finally:
        reservation.close()
        shutil.rmtree(metrics_dir, ignore_errors=True)
        log.info("bomstream stopped")


class Supervisor:
    def __init__(self, cfg: Config, count: int, reservation: Reservation, metrics_dir: str) -> None:
        self.cfg = cfg
        self.metrics_dir = metrics_dir
        self.env = worker_env(os.environ, metrics_dir)
        self.reservation = reservation
        worker_cfg = _with_port(cfg, reservation.port)
        self.slots = [_Slot(self, WorkerSpec(i, metrics_dir, worker_cfg)) for i in range(count)]
        self.stopping = asyncio.Event()
        self.announced = False
        self.status = 0

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in STOP_SIGNALS:
            loop.add_signal_handler(sig, self._on_signal, sig)
        tasks = [asyncio.create_task(s.run(), name=f"worker-{s.index}") for s in self.slots]
        announce = asyncio.create_task(self._announce(), name="announce")
        stopping = asyncio.create_task(self.stopping.wait(), name="stopping")
        try:
            done, _ = await asyncio.wait([stopping, *tasks], return_when=asyncio.FIRST_COMPLETED)
            for task in done - {stopping}:
                exc = task.exception()
                if exc is not None:
                    # A bug, not a worker's death: stop the rest rather than limp on.
                    log.error("worker slot failed", exc_info=exc)
                    self._stop(signal.SIGTERM, status=1)
            await self._drain(tasks)
        finally:
            for task in (announce, stopping, *tasks):
                task.cancel()
            for task in (announce, stopping, *tasks):
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            for sig in STOP_SIGNALS:
                loop.remove_signal_handler(sig)
        return self.status

    def _on_signal(self, sig: signal.Signals) -> None:
        self._stop(sig, status=0)

    def _stop(self, sig: signal.Signals, status: int) -> None:
        if not self.stopping.is_set():
            live = [s.worker.pid for s in self.slots if s.worker is not None and s.worker.running]
            log.info("stopping workers", extra={FIELDS: {"signal": sig.name, "workers": len(live)}})
            self.status = status
            self.stopping.set()
        for slot in self.slots:
            slot.stop(sig)

    async def _drain(self, tasks: list[asyncio.Task[None]]) -> None:
        """Wait for every worker to exit: the grace period plus a margin, then kill."""
        timeout = self.cfg.server.shutdown_grace_s + KILL_MARGIN_S
        _, pending = await asyncio.wait(tasks, timeout=timeout)
        if not pending:
            return
        self.status = 1
        for slot in self.slots:
            if slot.worker is not None and slot.worker.running:
                log.warning(
                    "worker killed: still running after the grace period",
                    extra={FIELDS: {"worker": slot.index, "pid": slot.worker.pid}},
                )
                slot.worker.kill()
        await asyncio.wait(pending, timeout=REAP_S)

    async def _announce(self) -> None:
        for slot in self.slots:
            await slot.listened.wait()
        self.announced = True
        url = http_url(self.reservation.host, self.reservation.port)
        fields = {"url": url, "workers": len(self.slots), **listening_fields(self.cfg)}
        log.info("bomstream listening", extra={FIELDS: fields})

    def fail_start(self, slot: _Slot, returncode: int | None) -> None:
        """A worker that could not start at all before the supervisor was up:
        a restart would fail the same way, so stop, with the worker's status."""
        log.error(
            "worker exited before listening; stopping",
            extra={FIELDS: {"worker": slot.index, **_exit_fields(returncode)}},
        )
        self._stop(signal.SIGTERM, status=2 if returncode == 2 else 1)

    def worker_gone(self, worker: WorkerProcess) -> None:
        # Its counters stay (totals must not drop); its live gauges must go.
        mark_process_dead(worker.pid, self.metrics_dir)  # type: ignore[no-untyped-call]


class _Slot:
    """Owns worker ``index``: one process at a time, restarted until stopping."""

    def __init__(self, sup: Supervisor, spec: WorkerSpec) -> None:
        self.sup = sup
        self.spec = spec
        self.index = spec.index
        self.worker: WorkerProcess | None = None
        self.listened = asyncio.Event()
        self.backoff = RestartBackoff()
        self._forwarded: signal.Signals | None = None

    def stop(self, sig: signal.Signals) -> None:
        self._forwarded = sig
        if self.worker is not None:
            self.worker.signal(sig)

    async def run(self) -> None:
        sup = self.sup
        while not sup.stopping.is_set():
            returncode, uptime = await self._one_run()
            if sup.stopping.is_set():
                if returncode is not None and not self._clean(returncode):
                    sup.status = 1
                return
            if not sup.announced and not self.listened.is_set():
                sup.fail_start(self, returncode)
                return
            delay = self.backoff.next_delay(uptime)
            pid = self.worker.pid if self.worker is not None else None
            log.warning(
                "worker exited; restarting",
                extra={
                    FIELDS: {
                        "worker": self.index,
                        "pid": pid,
                        **_exit_fields(returncode),
                        "uptime_s": round(uptime, 1),
                        "restart_in_s": delay,
                    }
                },
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(sup.stopping.wait(), delay)

    async def _one_run(self) -> tuple[int | None, float]:
        """Start the worker and wait for it to end: (return code, uptime).
        The return code is None when it could not even be started."""
        try:
            worker = await WorkerProcess.spawn(self.spec, self.sup.env)
        except OSError as exc:
            log.error(
                "cannot start worker",
                extra={FIELDS: {"worker": self.index, "error": os.strerror(exc.errno or 0)}},
            )
            return None, 0.0
        self.worker = worker
        log.info("worker started", extra={FIELDS: {"worker": self.index, "pid": worker.pid}})
        if self._forwarded is not None:
            # The stop came while it was being started.
            worker.signal(self._forwarded)
        if await worker.listening():
            if self.sup.announced:
                log.info(
                    "worker listening", extra={FIELDS: {"worker": self.index, "pid": worker.pid}}
                )
            self.listened.set()
        returncode = await worker.wait()
        self.sup.worker_gone(worker)
        if self.sup.stopping.is_set():
            fields = {"worker": self.index, "pid": worker.pid, **_exit_fields(returncode)}
            log.info("worker exited", extra={FIELDS: fields})
        return returncode, worker.uptime_s

    def _clean(self, returncode: int) -> bool:
        # Killed by the very signal forwarded: it had not yet installed its
        # handlers, so it had not begun to serve either.
        forwarded = self._forwarded
        return returncode == 0 or (forwarded is not None and returncode == -forwarded)


def _exit_fields(returncode: int | None) -> dict[str, object]:
    return {"exit": "not started"} if returncode is None else describe_exit(returncode)


def _with_port(cfg: Config, port: int) -> Config:
    return dataclasses.replace(cfg, server=dataclasses.replace(cfg.server, port=port))
