"""aiohttp's HTTP/1.1 connection handling, as the gateway needs it.

- Requests aiohttp refuses before any handler runs (a malformed request line,
  an oversized request line or header, an unknown method) get the contract's
  JSON error, never aiohttp's plain-text page, which quotes the input back.
- No response names the software's versions (aiohttp adds
  ``Server: Python/3.x aiohttp/3.x`` to every response it is not told otherwise).
- An SSE stream's connection can be handed over to a small protocol of its
  own once its headers are sent, so that an open stream keeps none of
  aiohttp's per-request state (the parsed request holding its credential,
  the parser, the request's tasks) for the hours it may stay open.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, BadHttpMethod, LineTooLong
from aiohttp.web_protocol import RequestHandler

from bomstream.errors import ApiError, error_response
from bomstream.logs import FIELDS

log = logging.getLogger("bomstream.server")

SERVER_NAME = "bomstream"
# Spec section 9: a stream of 100 BOMs of 128-character ids needs a URL of
# about 14 KB, plus a token or a resume point; 32 KiB leaves room for both.
MAX_REQUEST_LINE = 32 * 1024
# One header line (name and value); aiohttp's default, which a bearer token
# or a cookie stays well below.
MAX_HEADER_FIELD = 8190
MAX_HEADERS = 128


def refusal(status: int, exc: BaseException | None) -> ApiError:
    """The JSON error for a request aiohttp could not take. Its wording is fixed:
    the exception's own message quotes the input, which may hold a credential."""
    if isinstance(exc, LineTooLong):
        if exc.args[1:2] == (MAX_REQUEST_LINE,):
            return ApiError(
                414, "uri_too_long", f"the request target is longer than {MAX_REQUEST_LINE} bytes"
            )
        return ApiError(
            431,
            "headers_too_large",
            f"a request header line is longer than {MAX_HEADER_FIELD} bytes",
        )
    if isinstance(exc, BadHttpMessage) and exc.message == "Too many headers received":
        return ApiError(431, "headers_too_large", f"more than {MAX_HEADERS} request headers")
    if isinstance(exc, BadHttpMethod):
        return ApiError(400, "bad_request", "the request method is not valid")
    if isinstance(exc, BadHttpMessage):
        return ApiError(400, "bad_request", "the request is not valid HTTP/1.1")
    if status == 504:
        return ApiError(504, "timeout", "the request took too long")
    return ApiError(500, "internal_error", "the gateway failed to answer this request")


class GatewayProtocol(RequestHandler):
    """One client connection, as aiohttp's, with JSON errors and stream hand-over."""

    __slots__ = ()

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if isinstance(exc, ConnectionError):
            # The client left mid-answer (a stream's headers, say): not an error here.
            self.log_debug("client went away while being answered", exc_info=exc)
        elif status >= 500:
            self.log_exception("error handling a request", exc_info=exc)
        else:
            # Malformed input is the client's problem; the line names the kind of
            # error, never the input (which may carry a token).
            log.info(
                "refused a malformed request",
                extra={FIELDS: {"status": status, "error": type(exc).__name__}},
            )
        if request.writer.output_size > 0:
            # The response has begun; only dropping the connection is left.
            raise ConnectionError("response already started")
        resp = error_response(refusal(status, exc))
        # No route ran, so on_response_prepare will not name the server.
        resp.headers["Server"] = SERVER_NAME
        resp.force_close()
        return resp

    def hand_over(self, protocol: asyncio.Protocol) -> asyncio.Transport:
        """Give this connection to ``protocol`` for good. The running handler
        must return right after: aiohttp then finishes the request as one whose
        client went away (it writes nothing more and closes nothing), forgets
        the connection, and frees the request with everything it holds."""
        transport = self.transport
        if transport is None:
            raise ConnectionResetError("the connection is already closed")
        transport.set_protocol(protocol)
        self.keep_alive(False)
        if self._manager is not None:
            # Drops this handler from the server's connections once the request
            # finishes; aiohttp will never see this connection's end itself.
            self._manager.connection_lost(self, None)
            self._manager = None
        self.transport = None
        self._parser = None
        return transport


class GatewayServer(web.Server):
    """aiohttp's low-level server, making :class:`GatewayProtocol` connections."""

    def __init__(self, handler: Any, *, protocol_args: dict[str, Any], **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self._protocol_args = protocol_args

    def __call__(self) -> RequestHandler:
        return GatewayProtocol(self, loop=asyncio.get_running_loop(), **self._protocol_args)


class GatewayRunner(web.AppRunner):
    """An AppRunner whose connections are :class:`GatewayProtocol` ones, with the
    gateway's parser limits. ``protocol_args`` go to each connection."""

    def __init__(self, app: web.Application, *, shutdown_timeout: float, **protocol_args: Any):
        protocol_args.update(
            max_line_size=MAX_REQUEST_LINE,
            max_field_size=MAX_HEADER_FIELD,
            max_headers=MAX_HEADERS,
        )
        super().__init__(app, shutdown_timeout=shutdown_timeout, **protocol_args)
        self._protocol_args = protocol_args

    async def _make_server(self) -> web.Server:
        # Runs the app's start-up and freezes it, as AppRunner does.
        made = await super()._make_server()
        return GatewayServer(
            made.request_handler,
            request_factory=made.request_factory,
            # A client that goes away cancels its handler, so a request learns
            # of the disconnect at once (an open stream is handed over instead).
            handler_cancellation=True,
            protocol_args=self._protocol_args,
        )


async def name_server(request: web.Request, response: web.StreamResponse) -> None:
    """``on_response_prepare``: every routed response names the server without versions."""
    response.headers["Server"] = SERVER_NAME


class HandedOver:
    """How many handed-over connections are still open; shutdown waits for
    them to flush their last frames and close."""

    __slots__ = ("_idle", "count")

    def __init__(self) -> None:
        self.count = 0
        self._idle: asyncio.Future[None] | None = None

    def opened(self) -> None:
        self.count += 1

    def closed(self) -> None:
        self.count -= 1
        if self.count == 0 and self._idle is not None and not self._idle.done():
            self._idle.set_result(None)

    async def wait_closed(self, within_s: float) -> bool:
        """True once none is open; False if some still are after ``within_s``."""
        if self.count == 0:
            return True
        self._idle = asyncio.get_running_loop().create_future()
        try:
            await asyncio.wait_for(self._idle, within_s)
        except TimeoutError:
            return False
        finally:
            self._idle = None
        return True
