"""Who may stream and publish: the admin token, or (open mode) everyone on loopback."""

from __future__ import annotations

import hmac

from aiohttp import web

from bomstream.config import Config
from bomstream.errors import ApiError
from bomstream.metrics import Metrics
from bomstream.principal import ADMIN, OPEN, Principal


def bearer_token(request: web.Request) -> str | None:
    """The credential of a request: ``Authorization: Bearer`` wins over ``?token=``."""
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    token = request.query.get("token")
    return token or None


class Authenticator:
    def __init__(self, cfg: Config, metrics: Metrics) -> None:
        self._cfg = cfg
        self._metrics = metrics
        self._admin = cfg.auth.admin_token.encode()

    def authenticate(self, request: web.Request) -> Principal:
        if self._cfg.open_mode:
            return OPEN
        token = bearer_token(request)
        if token is None:
            raise self._fail("missing", "a token is required (Authorization: Bearer or ?token=)")
        if self._admin and hmac.compare_digest(token.encode(), self._admin):
            return ADMIN
        raise self._fail("invalid", "the token is not valid")

    def _fail(self, reason: str, message: str) -> ApiError:
        self._metrics.auth_failures.labels(reason).inc()
        return ApiError(401, "unauthorized", message, {"WWW-Authenticate": "Bearer"})
