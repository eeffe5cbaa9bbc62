"""What a supervisor tells a worker, and what the worker answers.

The worker's stdin carries one JSON line, its spec: its index, the shared
metrics directory and the whole config as the supervisor resolved and
validated it, the concrete port included. A worker restarted days later thus
runs exactly what the supervisor started with, whatever became of the config
file or the environment since. The pipe then stays open and silent; end of
file on it means the supervisor is gone. The worker's stdout carries one line
back, ``listening``, once its listener is up.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

import orjson

from bomstream.config import Config, ConfigError
from bomstream.config_load import load_config

LISTENING = b"listening\n"
# A config is a few kilobytes; this only bounds a broken pipe's garbage.
MAX_SPEC_BYTES = 1 << 20


class HandoffError(Exception):
    """The supervisor's message could not be read; one line, no config values."""


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    index: int
    metrics_dir: str
    config: Config

    def encode(self) -> bytes:
        body = {"index": self.index, "metrics_dir": self.metrics_dir, "config": _flat(self.config)}
        return orjson.dumps(body) + b"\n"

    @classmethod
    def decode(cls, line: bytes) -> WorkerSpec:
        try:
            body = orjson.loads(line)
            index, metrics_dir, values = body["index"], body["metrics_dir"], body["config"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            raise HandoffError("the worker spec is not what a supervisor sends") from None
        if not (isinstance(index, int) and isinstance(metrics_dir, str)):
            raise HandoffError("the worker spec has no index or metrics directory")
        if not isinstance(values, dict):
            raise HandoffError("the worker spec has no config")
        try:
            cfg = load_config(None, env={}, overrides=values, default_file=False)
        except ConfigError as exc:
            raise HandoffError(f"the worker spec's config is refused: {exc}") from None
        return cls(index, metrics_dir, cfg)


def _flat(cfg: Config) -> dict[str, Any]:
    """Every key as ``"section.key": value``, the form ``load_config`` takes as overrides."""
    out: dict[str, Any] = {}
    for section in dataclasses.fields(cfg):
        table = getattr(cfg, section.name)
        for key in dataclasses.fields(table):
            value = getattr(table, key.name)
            out[f"{section.name}.{key.name}"] = list(value) if isinstance(value, tuple) else value
    return out


def read_spec(fd: int) -> WorkerSpec:
    """Read the one spec line from ``fd``, and not a byte past it: the pipe is
    watched for end of file afterwards."""
    data = bytearray()
    while not data.endswith(b"\n"):
        chunk = os.read(fd, 1)
        if not chunk:
            raise HandoffError("the supervisor closed the pipe before sending the worker spec")
        data += chunk
        if len(data) > MAX_SPEC_BYTES:
            raise HandoffError(f"the worker spec is longer than {MAX_SPEC_BYTES} bytes")
    return WorkerSpec.decode(bytes(data))
