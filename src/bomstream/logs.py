"""Logging set-up (text or JSON lines) and a rate-limited reporter for dropped input."""

from __future__ import annotations

import asyncio
import logging
import re
import sys
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

import orjson

from bomstream.redact import Redactor

# Fields a log call may attach with ``extra={"fields": {...}}``.
FIELDS = "fields"


class JsonFormatter(logging.Formatter):
    def __init__(self, redactor: Redactor | None = None) -> None:
        super().__init__()
        self._redactor = redactor or Redactor()

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, FIELDS, None)
        if isinstance(fields, dict):
            out.update(fields)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return self._redactor.redact(orjson.dumps(out, default=str).decode())


class TextFormatter(logging.Formatter):
    def __init__(self, redactor: Redactor | None = None) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")
        self._redactor = redactor or Redactor()

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = getattr(record, FIELDS, None)
        if isinstance(fields, dict) and fields:
            line += " " + " ".join(f"{k}={_text_value(v)}" for k, v in fields.items())
        return self._redactor.redact(line)


_PLAIN = re.compile(r"[A-Za-z0-9_.:/*+@%=,\[\]{}'-]*")


def _text_value(value: object) -> str:
    """Quote anything that could break the line apart (spaces, CR/LF, control chars)."""
    text = value if isinstance(value, str) else str(value)
    if _PLAIN.fullmatch(text):
        return text
    return orjson.dumps(text).decode()


def make_formatter(fmt: str, secrets: Iterable[str] = ()) -> logging.Formatter:
    """``secrets``: configured credentials, redacted wherever they turn up."""
    redactor = Redactor(secrets)
    return JsonFormatter(redactor) if fmt == "json" else TextFormatter(redactor)


class ProcessFields(logging.Filter):
    """Adds fields to every line of this process (a worker's index), after the
    line's own, so that processes sharing one stderr can be told apart."""

    def __init__(self, fields: Mapping[str, object]) -> None:
        super().__init__()
        self._fields = dict(fields)

    def filter(self, record: logging.LogRecord) -> bool:
        own = getattr(record, FIELDS, None)
        merged = {**own, **self._fields} if isinstance(own, dict) else dict(self._fields)
        setattr(record, FIELDS, merged)
        return True


def setup_logging(
    fmt: str,
    level: str,
    secrets: Iterable[str] = (),
    process_fields: Mapping[str, object] | None = None,
) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(make_formatter(fmt, secrets))
    if process_fields:
        handler.addFilter(ProcessFields(process_fields))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


class DropReporter:
    """Counts rejected input and logs a summary at most once per ``interval`` seconds,
    so a flood of bad messages cannot flood the log."""

    def __init__(self, logger: logging.Logger, source: str, interval: float = 1.0) -> None:
        self._log = logger
        self._source = source
        self._interval = interval
        self._pending: Counter[str] = Counter()
        self._last = -interval
        self._timer: asyncio.TimerHandle | None = None

    def drop(self, reason: str) -> None:
        self._pending[reason] += 1
        now = time.monotonic()
        if now - self._last >= self._interval:
            self._report(now)
        elif self._timer is None:
            # The rest of a burst is reported when the interval is up; waiting
            # for the next bad message could mean never reporting it.
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return
            self._timer = loop.call_later(self._last + self._interval - now, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self._pending:
            self._report(time.monotonic())

    def _report(self, now: float) -> None:
        self._last = now
        counts, self._pending = dict(self._pending), Counter()
        self._log.warning(
            "dropped %d bad events from %s",
            sum(counts.values()),
            self._source,
            extra={FIELDS: {"source": self._source, "reasons": counts}},
        )
