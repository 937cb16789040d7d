"""The gateway's HTTP connections: aiohttp's, with two changes that no middleware can make.

- A request aiohttp cannot parse (a bad request line, Content-Length with Transfer-Encoding, a negative
  Content-Length, NUL in a header, a path that is not UTF-8) never reaches the app or its middlewares: aiohttp
  answers it itself, in plain text. Here it gets an OpenAI error object like every other error.
- A connection must send a request's complete headers within ``header_timeout`` of being opened, or it is closed.
  aiohttp waits for headers as long as it keeps an idle connection (``keepalive_timeout``, an hour by default; in
  releases before 3.14.5, forever), so a slow client could hold connections with half a header. Between requests
  of a kept-alive connection, aiohttp's keep-alive timeout applies as before.

aiohttp 3 has no hook for either (aio-libs/aiohttp#3287; aiohttp 4 sends parse errors through the middlewares), so
``GatewayRunner`` makes aiohttp's server build a ``RequestHandler`` subclass. ``tests/test_upstream_hardening.py``
checks both on the wire, against the installed aiohttp.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiohttp import web

from athanor.ingress.app import error_body

log = logging.getLogger("athanor.ingress")

HEADER_TIMEOUT_S = 30.0
MAX_REASON = 120  # characters of aiohttp's reason kept in the message (it quotes the client's bytes after it)


class _ClientConnection(web.RequestHandler):
    """aiohttp's connection handler, with errors as JSON and a deadline for the first request's headers."""

    __slots__ = ("_header_timeout", "_seen_as", "header_timer")

    def __init__(self, manager: web.Server, *, header_timeout: float, seen_as: dict[str, Any] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self.header_timer: asyncio.TimerHandle | None = None
        self._header_timeout = header_timeout
        self._seen_as = seen_as

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._seen_as is not None:
            transport = _SeenAs(transport, self._seen_as)
        super().connection_made(transport)
        self.header_timer = asyncio.get_running_loop().call_later(self._header_timeout, self._headers_late)

    def connection_lost(self, exc: BaseException | None) -> None:
        if self.header_timer is not None:
            self.header_timer.cancel()
            self.header_timer = None
        super().connection_lost(exc)

    def _headers_late(self) -> None:
        self.header_timer = None
        log.debug("closed a connection that sent no complete request headers within %g s", self._header_timeout)
        self.force_close()

    def handle_error(self, request: web.BaseRequest, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        """What aiohttp answers on its own: a request it could not parse (400), or an error that escaped the app
        (500; the error middleware answers those first). The connection closes after it, as aiohttp's does."""
        if request.writer.output_size > 0:  # as aiohttp: a response is under way, only closing is left
            raise ConnectionError("a response was already under way; cannot send an error response")
        if status >= 500:
            self.log_exception("error handling a request from %s", request.remote, exc_info=exc)
            text, code = "internal error in the gateway (see its log)", "internal_error"
        else:  # the client's fault, and one per malformed request: no traceback in the log
            reason = (message or str(exc or "") or "malformed request").strip().splitlines()[0].rstrip(":")
            text, code = f"malformed HTTP request: {reason[:MAX_REASON]}", "bad_request"
            log.debug("refused a malformed request from %s: %s", request.remote, reason)
        response = web.json_response(error_body(status, text, code), status=status)
        response.force_close()
        return response


class _Server(web.Server):
    """aiohttp's server, making ``_ClientConnection``s; a request's headers parsed stop its connection's timer."""

    def __init__(self, handler: Any, *, header_timeout: float, request_factory: Any, **kwargs: Any) -> None:
        super().__init__(handler, request_factory=self._headers_parsed, **kwargs)
        self._header_timeout = header_timeout
        self._make = request_factory

    def _headers_parsed(self, message: Any, payload: Any, protocol: Any, *rest: Any) -> web.BaseRequest:
        timer = protocol.header_timer
        if timer is not None:
            timer.cancel()
            protocol.header_timer = None
        return self._make(message, payload, protocol, *rest)

    def __call__(self) -> web.RequestHandler:  # as web.Server.__call__, with the subclass
        return _ClientConnection(self, loop=self._loop, header_timeout=self._header_timeout, **self._kwargs)

    def relayed(self, peername: Any, sockname: Any) -> web.RequestHandler:
        """A connection from the front door (``relay.py``), which sees the client's addresses as its own."""
        return _ClientConnection(self, loop=self._loop, header_timeout=self._header_timeout,
                                 seen_as={"peername": peername, "sockname": sockname}, **self._kwargs)


class _SeenAs:
    """A transport that reports the client's addresses (``peername``, ``sockname``) as its own: a relayed
    connection is a socket pair, but the guard and the admin API must see where the client came from."""

    __slots__ = ("_extra", "_transport")

    def __init__(self, transport: asyncio.BaseTransport, extra: dict[str, Any]):
        self._transport, self._extra = transport, extra

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name in self._extra:
            return self._extra[name]
        return self._transport.get_extra_info(name, default)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class GatewayRunner(web.AppRunner):
    """``web.AppRunner`` whose connections answer unparseable requests with JSON and time out slow headers;
    ``relayed`` makes the connections the front door passes requests on (``relay.py``)."""

    def __init__(self, app: web.Application, *, header_timeout: float = HEADER_TIMEOUT_S, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._header_timeout = header_timeout

    def relayed(self, peername: Any, sockname: Any) -> web.RequestHandler:
        assert isinstance(self.server, _Server), "setup() first"
        return self.server.relayed(peername, sockname)

    async def _make_server(self) -> web.Server:
        made = await super()._make_server()  # the app started and frozen, its handler and request factory
        return _Server(made.request_handler, request_factory=made.request_factory,
                       handler_cancellation=made.handler_cancellation, loop=asyncio.get_running_loop(),
                       header_timeout=self._header_timeout, **made._kwargs)
