"""Everything but the hot path goes to the aiohttp application, as it came, over a private socket pair.

The front door (``wire.py``) answers ``POST /v1/...`` itself. The admin API, ``/metrics``, ``/v1/models``, CORS
preflights and ``/health`` stay aiohttp's, with its routing and middlewares: each client connection that asks for
one gets its own connection to the aiohttp server, made from a ``socket.socketpair()`` (no port, no file: nothing
else can reach it). The request is written to it again, framed with a Content-Length; the answer is copied back to
the client byte for byte, so aiohttp decides its framing and whether the connection stays open, and its end is
found with llhttp. Streams (the admin API's event feed) flow as they come, paused while the client reads slowly.

aiohttp sees the client's own address, and the address it reached (``relayed_protocol`` in ``protocol.py``): the
guard admits only loopback peers to the admin API.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import Any

import httptools

from athanor.ingress.wire import Connection, Request

# Not forwarded: the framing (the body goes with a Content-Length of its own) and the interim answer the front
# door already gave (``100 Continue``).
SKIP = frozenset({"content-length", "transfer-encoding", "expect"})

# (peername, sockname) -> a protocol of the aiohttp server that sees them as its transport's
ServerFactory = Callable[[Any, Any], asyncio.Protocol]


class Relay:
    """Passes requests to aiohttp (``__call__``, the front door's handler for everything but the hot path)."""

    def __init__(self, server: ServerFactory):
        self._server = server

    async def __call__(self, request: Request) -> None:
        connection = request.connection
        way = connection.relayed
        if way is None or way.closed:
            way = connection.relayed = await self._open(connection)
        await way.exchange(request)

    async def _open(self, connection: Connection) -> _Way:
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair()
        try:
            await loop.connect_accepted_socket(lambda: self._server(connection.peername, connection.sockname), theirs)
        except BaseException:
            ours.close()
            theirs.close()
            raise
        _, way = await loop.create_connection(lambda: _Way(connection), sock=ours)
        return way


class _Way(asyncio.Protocol):
    """One client connection's connection to aiohttp: a request written, its answer copied back until complete."""

    def __init__(self, client: Connection):
        self.client = client
        self.closed = False
        self.transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._done: asyncio.Future[None] | None = None
        self._head_only = False  # the answer to HEAD: no body, whatever its Content-Length says

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    async def exchange(self, request: Request) -> None:
        lines = [f"{request.method} {request.target} HTTP/{request.version}"]
        lines += [f"{name}: {value}" for name, value in request.headers.items() if name.lower() not in SKIP]
        if request.body or request.method in ("POST", "PUT", "PATCH"):
            lines.append(f"Content-Length: {len(request.body)}")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape")
        self._head_only = request.method == "HEAD"
        self._done = asyncio.get_running_loop().create_future()
        assert self.transport is not None
        self.transport.write(head + request.body)
        request.started = True  # whatever aiohttp answers is the answer: nothing else may follow it
        try:
            await self._done
        finally:
            self._done = None
        if self.closed:  # aiohttp ended the connection with its answer: the client's ends too
            request.keep_alive = False

    # asyncio.Protocol
    def data_received(self, data: bytes) -> None:
        self.client.write(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError:
            self.close()  # aiohttp does not send what llhttp cannot read; if it did, this connection is done

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._finish()
        if self.client.relayed is self and not self.client.lost and self._done is not None:
            self.client.close()

    def pause_reading(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    # httptools callbacks
    def on_headers_complete(self) -> None:
        if self._head_only:
            self._parser = httptools.HttpResponseParser(self)  # a fresh one for the next answer
            self._finish()

    def on_message_complete(self) -> None:
        self._finish()

    def _finish(self) -> None:
        if self._done is not None and not self._done.done():
            self._done.set_result(None)
