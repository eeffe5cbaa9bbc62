"""Runs the ``bomstream`` command line the way an operator would: a real process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def cli_env(**extra: str) -> dict[str, str]:
    """The environment minus any BOMSTREAM_* settings of the machine running the tests."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BOMSTREAM_")}
    env.update(extra)
    return env


def run_cli(
    *args: str, cwd: Path | None = None, env: dict[str, str] | None = None, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bomstream", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env=cli_env() if env is None else env,
        check=False,
    )
