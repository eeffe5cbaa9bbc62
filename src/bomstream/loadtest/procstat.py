"""Another process's resident memory, CPU time and write calls, read from /proc (Linux)."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


@dataclass(frozen=True, slots=True)
class ProcSample:
    rss_kb: int
    cpu_s: float
    # write-family system calls so far (/proc/PID/io syscw); None where
    # that file cannot be read (another user's process, no task accounting).
    write_calls: int | None = None


def sample(pid: int) -> ProcSample | None:
    """RSS and user+system CPU seconds of ``pid``, or None if it cannot be read."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
        with open(f"/proc/{pid}/status", "rb") as fh:
            status = fh.read()
    except OSError:
        return None
    # The command name may hold spaces; fields are counted after its ')'.
    fields = stat[stat.rindex(b")") + 2 :].split()
    cpu = (int(fields[11]) + int(fields[12])) / _TICKS
    rss = 0
    for line in status.splitlines():
        if line.startswith(b"VmRSS:"):
            rss = int(line.split()[1])
            break
    return ProcSample(rss, cpu, _write_calls(pid))


def _write_calls(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/io", "rb") as fh:
            io = fh.read()
    except OSError:
        return None
    for line in io.splitlines():
        if line.startswith(b"syscw:"):
            return int(line.split()[1])
    return None


def sample_sum(pids: Iterable[int]) -> ProcSample | None:
    """RSS, CPU seconds and write calls added up over ``pids`` (the workers of
    one gateway); None if there are none or any cannot be read, since a
    partial sum would pass for the whole."""
    samples = [sample(pid) for pid in pids]
    if not samples or any(s is None for s in samples):
        return None
    present = [s for s in samples if s is not None]
    writes = [s.write_calls for s in present]
    return ProcSample(
        sum(s.rss_kb for s in present),
        sum(s.cpu_s for s in present),
        None if any(w is None for w in writes) else sum(w for w in writes if w is not None),
    )
