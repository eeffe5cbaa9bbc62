"""The Dockerfile, followed step by step without a Docker engine.

No Docker engine runs here, so the test reads the Dockerfile and does what
it says: copies what it COPYs, runs its ``pip install`` in a fresh virtual
environment, then runs its exact CMD with its ENV and its exact HEALTHCHECK
command. Only steps that change the host system (creating the user) are not
executed; they are checked as text.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.redis_proc import free_port

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "Dockerfile"


@dataclass
class Dockerfile:
    base: str = ""
    env: dict[str, str] = field(default_factory=dict)
    workdir: str = "/"
    copies: list[tuple[list[str], str, str]] = field(default_factory=list)  # srcs, dest, workdir
    runs: list[str] = field(default_factory=list)
    user: str = "root"
    expose: list[str] = field(default_factory=list)
    stopsignal: str = ""
    healthcheck: list[str] = field(default_factory=list)
    cmd: list[str] = field(default_factory=list)


def instructions(text: str) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) with line continuations joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        keyword, _, args = line.partition(" ")
        out.append((keyword.upper(), args.strip()))
    return out


def parse_dockerfile(text: str) -> Dockerfile:
    d = Dockerfile()
    for keyword, args in instructions(text):
        if keyword == "FROM":
            d.base = args
        elif keyword == "ENV":
            for pair in shlex.split(args):
                key, _, val = pair.partition("=")
                d.env[key] = val
        elif keyword == "WORKDIR":
            d.workdir = args
        elif keyword == "COPY":
            *srcs, dest = shlex.split(args)
            d.copies.append((srcs, dest, d.workdir))
        elif keyword == "RUN":
            d.runs.append(args)
        elif keyword == "USER":
            d.user = args
        elif keyword == "EXPOSE":
            d.expose.extend(args.split())
        elif keyword == "STOPSIGNAL":
            d.stopsignal = args
        elif keyword == "HEALTHCHECK":
            _, _, command = args.partition("CMD ")
            d.healthcheck = json.loads(command)
        elif keyword == "CMD":
            d.cmd = json.loads(args)
        else:
            raise AssertionError(f"Dockerfile: instruction {keyword} is not followed by this test")
    return d


def test_dockerfile_runs_slim_non_root_with_healthcheck_and_sigterm() -> None:
    d = parse_dockerfile(DOCKERFILE.read_text())
    assert d.base.startswith("python:3.11-slim")
    assert d.user not in ("", "root", "0")
    assert d.expose == [d.env["BOMSTREAM_SERVER_PORT"]]
    assert d.stopsignal == "SIGTERM"
    assert d.healthcheck[:2] == ["bomstream", "health"]
    assert d.cmd == ["bomstream", "serve"]
    assert any(run.startswith("useradd") and d.user in run for run in d.runs)


def _image_env(d: Dockerfile, venv: Path, **extra: str) -> dict[str, str]:
    """The container's environment: the Dockerfile's ENV, the venv first on PATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BOMSTREAM_", "PYTHON"))}
    env.update(d.env)
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["VIRTUAL_ENV"] = str(venv)
    env.update(extra)
    return env


@pytest.mark.timeout(600)
def test_image_steps_install_the_package_and_run_cmd_and_healthcheck(tmp_path: Path) -> None:
    d = parse_dockerfile(DOCKERFILE.read_text())
    root = tmp_path / "image"

    # COPY, relative to WORKDIR, into a stand-in for the image's file system.
    for srcs, dest, workdir in d.copies:
        target = root / workdir.lstrip("/") / dest
        for src in srcs:
            path = REPO / src
            if path.is_dir():
                shutil.copytree(path, target, dirs_exist_ok=True)
            else:
                target.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, target / path.name)
    app = root / d.workdir.lstrip("/")

    # A fresh virtual environment stands in for the base image's Python.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    env = _image_env(d, venv)
    pip_runs = [run for run in d.runs if run.startswith("pip install")]
    assert pip_runs, "the Dockerfile installs the package with pip"
    for run in pip_runs:
        subprocess.run(["bash", "-c", run + " --quiet"], cwd=app, env=env, check=True, timeout=540)

    # As shipped (listening on every interface, no credential) it must refuse.
    refused = subprocess.run(d.cmd, cwd=app, env=env, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2
    assert "server.host" in refused.stderr

    # With a credential, on loopback and a free port for this machine.
    port = free_port()
    env = _image_env(
        d,
        venv,
        BOMSTREAM_SERVER_HOST="127.0.0.1",
        BOMSTREAM_SERVER_PORT=str(port),
        BOMSTREAM_AUTH_ADMIN_TOKEN="image-test-token",
    )
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(d.cmd, cwd=app, env=env, stdout=out, stderr=out)
    try:
        deadline = time.monotonic() + 30
        while True:
            check = subprocess.run(
                d.healthcheck, cwd=app, env=env, capture_output=True, text=True, timeout=30
            )
            if check.returncode == 0 or time.monotonic() > deadline:
                break
            assert proc.poll() is None, log.read_text()
            time.sleep(0.2)
        assert check.returncode == 0, check.stderr + log.read_text()
        assert '"status":"healthy"' in check.stdout
        # The code that runs is the installed copy, not this checkout.
        where = subprocess.run(
            ["python", "-c", "import bomstream; print(bomstream.__file__)"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        assert where.stdout.startswith(str(venv))

        proc.send_signal(getattr(signal, d.stopsignal))
        assert proc.wait(timeout=15) == 0
        lines = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        assert lines[-1]["msg"] == "bomstream stopped"

        down = subprocess.run(
            d.healthcheck, cwd=app, env=env, capture_output=True, text=True, timeout=30
        )
        assert down.returncode != 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
