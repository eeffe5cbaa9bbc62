"""The access log, with credentials in query strings redacted."""

from __future__ import annotations

import logging
from urllib.parse import parse_qsl, urlencode

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from bomstream.logs import FIELDS

SECRET_PARAMS = frozenset({"token", "ticket"})
REDACTED = "[redacted]"


def redact_query(query_string: str) -> str:
    if not query_string:
        return ""
    pairs = parse_qsl(query_string, keep_blank_values=True)
    return urlencode([(k, REDACTED if k.lower() in SECRET_PARAMS else v) for k, v in pairs])


class AccessLogger(AbstractAccessLogger):
    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        # An accepted publish is one event: kept below info, like every other
        # per-event line. Refused publishes stay visible.
        accepted_publish = request.method == "POST" and response.status == 202
        level = logging.DEBUG if accepted_publish else logging.INFO
        if not self.logger.isEnabledFor(level):
            return
        query = redact_query(request.query_string)
        path = request.path + ("?" + query if query else "")
        self.logger.log(
            level,
            "request",
            extra={
                FIELDS: {
                    "remote": request.remote,
                    "method": request.method,
                    "path": path,
                    "status": response.status,
                    "duration_s": round(time, 4),
                }
            },
        )
