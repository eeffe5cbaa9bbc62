"""Every error the gateway returns is JSON: ``{"error": "<sentence>", "code": "<slug>"}``."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection, Mapping

import orjson
from aiohttp import web
from aiohttp.typedefs import Middleware

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# aiohttp's own errors (no route, wrong method, body too large) mapped to codes.
_HTTP_CODES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "too_large",
}


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = dict(headers or {})


def json_response(
    payload: object, status: int = 200, headers: Mapping[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=orjson.dumps(payload),
        status=status,
        content_type="application/json",
        headers=headers,
    )


def error_response(err: ApiError) -> web.Response:
    return json_response({"error": err.message, "code": err.code}, err.status, err.headers)


def error_middleware(streams: Collection[Handler]) -> Middleware:
    """JSON errors for every route. A handler in ``streams`` answers its own
    errors: it may stay open for hours, and a middleware coroutine wrapped
    around it would hold a frame for all that time on every stream."""

    @web.middleware
    def middleware(request: web.Request, handler: Handler) -> Awaitable[web.StreamResponse]:
        if request.match_info.handler in streams:
            return handler(request)
        return _json_errors(request, handler)

    return middleware


async def _json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as err:
        return error_response(err)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = _HTTP_CODES.get(exc.status, "http_error")
        message = exc.reason
        if exc.status == 413:
            message = "request body is too large"
        headers = {k: v for k, v in exc.headers.items() if k.lower() in ("allow", "retry-after")}
        return error_response(ApiError(exc.status, code, message, headers))
