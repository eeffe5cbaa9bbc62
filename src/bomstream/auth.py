"""Who may stream and publish: the admin token, a JWT, a stream ticket, or
(open mode, loopback only) everyone.

Every refusal is an :class:`ApiError` whose message is fixed text: nothing a
client sent, least of all its credential, is echoed back or logged.
"""

from __future__ import annotations

import hmac

from aiohttp import web

from bomstream.config import Config
from bomstream.errors import ApiError
from bomstream.jwt_auth import SERVICE_ROLE, JwtVerifier, TokenRejected
from bomstream.metrics import Metrics
from bomstream.principal import ADMIN, OPEN, Principal
from bomstream.tickets import Grant, TicketRejected, TicketStore, TicketStoreUnavailable

TICKET_PARAM = "ticket"


def header_token(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return None


def bearer_token(request: web.Request) -> str | None:
    """The credential of a request: ``Authorization: Bearer`` wins over ``?token=``."""
    return header_token(request) or request.query.get("token") or None


class Authenticator:
    def __init__(self, cfg: Config, metrics: Metrics, tickets: TicketStore) -> None:
        self._cfg = cfg
        self._metrics = metrics
        self._admin = cfg.auth.admin_token.encode()
        self._jwt = JwtVerifier(cfg.auth)
        self.tickets = tickets

    def authenticate(
        self, request: web.Request, *, publish: bool = False, header_only: bool = False
    ) -> Principal:
        """The caller behind a token. A reader's JWT must name an org; a
        publisher's JWT must carry ``role: service_role``."""
        if self._cfg.open_mode:
            return OPEN
        token = header_token(request) if header_only else bearer_token(request)
        if token is None:
            where = "Authorization: Bearer" if header_only else "Authorization: Bearer or ?token="
            raise self._fail("missing", f"a token is required ({where})")
        if self._admin and hmac.compare_digest(token.encode(), self._admin):
            return ADMIN
        if not self._jwt.enabled:
            raise self._fail("invalid", "the token is not valid")
        try:
            claims = self._jwt.verify(token)
        except TokenRejected as exc:
            raise self._fail(exc.reason, exc.message) from None
        if publish:
            if claims.role != SERVICE_ROLE:
                raise self._forbid("role", "this token may not publish events")
        elif claims.org is None:
            raise self._forbid(
                "no_org", f"the token has no organization claim ({self._cfg.auth.org_claim})"
            )
        return Principal(
            kind="jwt",
            org=claims.org,
            can_publish=claims.role == SERVICE_ROLE,
            expires_at=claims.expires_at,
            subject=claims.subject,
        )

    async def authenticate_reader(self, request: web.Request, want: Grant) -> Principal:
        """Stream and poll: a single-use ``?ticket=`` for these BOMs, or a token."""
        if self._cfg.open_mode:
            return OPEN
        ticket = request.query.get(TICKET_PARAM)
        if ticket is None or header_token(request) is not None:
            return self.authenticate(request)
        try:
            return await self.tickets.redeem(ticket, want)
        except TicketRejected:
            raise self._fail(
                "ticket", "the ticket is unknown, used, expired or for another BOM"
            ) from None
        except TicketStoreUnavailable:
            raise ApiError(
                503,
                "ticket_store_unavailable",
                "tickets cannot be checked right now",
                {"Retry-After": "2"},
            ) from None

    def _fail(self, reason: str, message: str) -> ApiError:
        self._metrics.auth_failures.labels(reason).inc()
        return ApiError(401, "unauthorized", message, {"WWW-Authenticate": "Bearer"})

    def _forbid(self, reason: str, message: str) -> ApiError:
        self._metrics.auth_failures.labels(reason).inc()
        return ApiError(403, "forbidden", message)
