"""A real nginx started from deploy/nginx.conf, in front of test gateways.

The shipped file is used as it is, except for what must differ on a test
machine: the listen address, the upstream servers, worker count and file
paths. Each of those swaps must match exactly where expected, so a change to
the shipped file's shape fails the tests instead of silently testing
something else.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from tests.redis_proc import free_port, require_binary

DEPLOY_CONF = Path(__file__).resolve().parent.parent / "deploy" / "nginx.conf"

_UPSTREAM_SERVER = re.compile(r"^(\s*)server\s+127\.0\.0\.1:\d+( [^;]*)?;\n", re.M)


def _sub_once(pattern: str, repl: str, text: str, flags: int = re.M) -> str:
    new, n = re.subn(pattern, lambda _m: repl, text, count=0, flags=flags)
    if n != 1:
        raise AssertionError(f"deploy/nginx.conf: expected one match of {pattern!r}, found {n}")
    return new


def derive_config(template: str, prefix: Path, listen_port: int, upstreams: list[int]) -> str:
    """deploy/nginx.conf with this machine's ports and paths swapped in."""
    conf = _sub_once(r"^worker_processes \S+;$", "worker_processes 1;", template)
    conf = _sub_once(r"^(\s*)listen \S+;$", f"        listen 127.0.0.1:{listen_port};", conf)
    # The log path changes; the log format named after it stays.
    log_line = f"    access_log {prefix}/access.log bomstream;"
    conf = _sub_once(r"^    access_log \S+ bomstream;$", log_line, conf)
    servers = list(_UPSTREAM_SERVER.finditer(conf))
    if len(servers) < 2:
        raise AssertionError("deploy/nginx.conf: the upstream should list several servers")
    indent, params = servers[0].group(1), servers[0].group(2) or ""
    generated = "".join(f"{indent}server 127.0.0.1:{p}{params};\n" for p in upstreams)
    conf = conf[: servers[0].start()] + generated + conf[servers[-1].end() :]
    temp_paths = "".join(
        f"    {name}_temp_path {prefix}/{name}_temp;\n"
        for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    conf = _sub_once(r"^http \{\n", "http {\n" + temp_paths, conf)
    head = f"daemon off;\npid {prefix}/nginx.pid;\nerror_log {prefix}/error.log info;\n"
    return head + conf


class NginxProcess:
    def __init__(self, upstreams: list[int]) -> None:
        self.binary = require_binary("nginx")
        self.port = free_port()
        self.prefix = Path(tempfile.mkdtemp(prefix="bomstream-nginx-"))
        # Workers drop root privileges; they must still reach their temp dirs.
        os.chmod(self.prefix, 0o755)
        self.conf_path = self.prefix / "nginx.conf"
        self.conf_path.write_text(
            derive_config(DEPLOY_CONF.read_text(), self.prefix, self.port, upstreams)
        )
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.binary, "-p", str(self.prefix), "-c", str(self.conf_path), "-e",
             str(self.prefix / "error.log")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                raise RuntimeError(f"nginx exited {self.proc.returncode}: {err}{self.error_log()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.02)
        raise RuntimeError("nginx did not start: " + self.error_log())

    def access_log(self) -> str:
        path = self.prefix / "access.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def error_log(self) -> str:
        path = self.prefix / "error.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # fast shutdown
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stderr is not None:
            self.proc.stderr.close()
        self.proc = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.prefix, ignore_errors=True)
