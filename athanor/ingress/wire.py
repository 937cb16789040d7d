"""The gateway's front door: a lean HTTP/1.1 server whose one job is the hot path, model requests under ``/v1``.

Every connection to the gateway's port lands here. Requests are parsed by llhttp (``httptools``, as uvicorn does)
and each is answered in order (pipelined ones too). ``POST /v1/...`` is answered here, by the proxy handler
(``proxy.py``); everything else (the admin API, ``/metrics``, ``/v1/models``, CORS preflights, ``/health``) is passed
as it came to the aiohttp application over a private socket pair (``relay.py``), so those routes keep aiohttp's
routing and middlewares while a proxied request pays for none of them. The reasons and figures are in the README
("The hot path").

What aiohttp's server gave the proxy, this gives it too:
- limits: a request target up to ``MAX_TARGET`` bytes, headers up to ``MAX_HEADER_BYTES`` in all, a body up to the
  Gateway's ``limits.maxRequestBytes`` (413, and the connection closes);
- ``Expect: 100-continue`` answered only once the request is known to be accepted;
- malformed requests (smuggling attempts among them: llhttp is strict by default) answered with a JSON 400, after
  which the connection closes;
- a deadline for a request's headers (``HEADER_TIMEOUT_S``) and for an idle kept-alive connection
  (``KEEPALIVE_S``);
- chunked answers for streams to HTTP/1.1 clients, close-delimited ones to HTTP/1.0 clients;
- back-pressure: a write waits while the client's socket buffer is full;
- a client that goes away cancels its handler, so a request still waiting for a load never reaches the runtime
  and a forwarded one is closed upstream.
"""

from __future__ import annotations

import asyncio
import collections
import email.utils
import functools
import http
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Final, Protocol

import httptools
from multidict import CIMultiDict

from athanor.ingress.heads import HeadMemo, KnownHeads, only_length

_monotonic: Final = time.monotonic  # compiled, a C static: ``time.monotonic`` is a module lookup per call

log = logging.getLogger("athanor.ingress")

MAX_TARGET: Final = 8190  # bytes of a request target (aiohttp's max_line_size)
MAX_HEADER_BYTES: Final = 64 * 1024
MAX_HEADERS: Final = 128
HEADER_TIMEOUT_S: Final = 30.0  # a request's headers must be complete this long after it began
KEEPALIVE_S: Final = 75.0  # an idle kept-alive connection is closed after this long (aiohttp's default)
MAX_QUEUED: Final = 8  # pipelined requests read ahead of the one being answered; reading pauses beyond
_REASONS: Final = {status.value: status.phrase for status in http.HTTPStatus}
# The headers read on every request (``Request.fields``): by the front door (framing, Expect, CORS) and the guard.
FIELDS: Final = frozenset({b"host", b"origin", b"sec-fetch-site", b"authorization", b"x-api-key",
                           b"content-length", b"expect"})
# Their names as code spells them (``headers.get("Host")``), to the key in ``Request.fields``.
_FIELD_KEYS: Final = {spelling: field for field in FIELDS
                      for spelling in {field.decode(), field.decode().title(), field.decode().upper()}}

# Heads with these are parsed every time (``heads.py``): the body is framed otherwise, or the answer or what follows
# it depends on more than the head (``Expect``, an upgrade).
_NOT_REMEMBERED: Final = frozenset({b"transfer-encoding", b"expect", b"upgrade"})
# What ``on_headers_complete`` makes of a head, remembered (``heads.py``): method, target, version, the raw headers,
# where Content-Length is among them, ``Request.fields`` and ``Request.forward``, and keep-alive.
KnownHead = tuple[str, str, str, list[tuple[bytes, bytes]], int, dict[bytes, bytes], bytes, bool]

Handler = Callable[["Request"], Awaitable[None]]
# Takes a request to answer in callbacks, returning what to call if its client goes away meanwhile; None: declined.
FastHandler = Callable[["Request"], "Callable[[], None] | None"]
# (path, status, message, code, param) -> a JSON error body in the format of the API at ``path``.
ErrorBody = Callable[[str, int, str, str, "str | None"], bytes]


class Refused(Exception):
    """A request refused before its handler: (status, message, code), and headers for the answer."""

    def __init__(self, status: int, message: str, code: str, headers: Sequence[tuple[str, str]] = ()):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, list(headers)


class Front:
    """What every connection shares: who answers what, the limits, and the open connections (for shutdown)."""

    def __init__(self, hot: Handler, relay: Handler, *, max_body: Callable[[], int],
                 expect: Callable[[Request], Refused | None], error_body: ErrorBody,
                 cors: Callable[[Request], list[tuple[str, str]]], posts: Mapping[str, Handler] | None = None,
                 header_timeout: float = HEADER_TIMEOUT_S, keepalive: float = KEEPALIVE_S,
                 fast: FastHandler | None = None, forward_skip: frozenset[bytes] = frozenset()):
        """``hot``: answers ``POST /v1/...``; ``posts``: other POSTs answered here, by exact path (Ollama's model
        requests); ``relay``: everything else. ``max_body``: the body limit now; ``expect``: the refusal of a
        request that asks ``Expect: 100-continue`` (None: go on); ``cors``: headers for an answer to a request
        with ``Origin``. ``fast``: offered each ``hot`` request that arrives while its connection is idle, before
        ``hot``: it answers the common case in callbacks, with no coroutine (``proxy.Proxy.fast``).
        ``forward_skip``: lower-cased names of the header lines ``Request.forward`` leaves out."""
        self.hot, self.relay, self.posts, self.fast = hot, relay, dict(posts or {}), fast
        self.forward_skip = forward_skip
        self.max_body, self.expect, self.error_body, self.cors = max_body, expect, error_body, cors
        self.header_timeout, self.keepalive = header_timeout, keepalive
        # The heads parsed so far, when a request's forwarded lines leave its length out (``Request.forward``
        # cannot then differ between two heads with the same key).
        self.heads: HeadMemo[KnownHead] | None = HeadMemo() if b"content-length" in forward_skip else None
        self.connections: set[Connection] = set()
        self._sweeping: asyncio.TimerHandle | None = None

    def __call__(self) -> Connection:
        if self._sweeping is None:
            self._sweeping = asyncio.get_running_loop().call_later(self._sweep_every(), self._sweep)
        return Connection(self)

    def handler(self, request: Request) -> Handler:
        """Who answers ``request``: model requests here (``/v1`` on the hot path first), the rest through aiohttp.
        A target with escapes goes to aiohttp, which decodes it."""
        if request.method == "POST":
            path = request.path
            if path.startswith("/v1/") and "%" not in path:
                return self.hot
            return self.posts.get(path, self.relay)
        return self.relay

    def _sweep_every(self) -> float:
        return min(1.0, self.header_timeout / 3, self.keepalive / 3)

    def _sweep(self) -> None:
        """Close the connections past their deadline. One timer for all, once a second, rather than one per
        request: arming and cancelling timers was a measurable share of a proxied request's CPU."""
        now = _monotonic()
        for connection in [c for c in self.connections if c.deadline and c.deadline < now]:
            connection.late()
        self._sweeping = (asyncio.get_running_loop().call_later(self._sweep_every(), self._sweep)
                          if self.connections else None)

    def close(self) -> None:
        """Close every connection (at shutdown, once the runtimes are stopped)."""
        if self._sweeping is not None:
            self._sweeping.cancel()
            self._sweeping = None
        for connection in list(self.connections):
            connection.close()


def header_text(value: bytes) -> str:
    """Header bytes as text, as aiohttp gives them: UTF-8, any other byte kept as a surrogate (so the same bytes go
    on upstream)."""
    return value.decode("utf-8", "surrogateescape")


class Headers:
    """``Request.headers``: ``get`` and ``in`` for the headers in ``FIELDS`` straight from ``Request.fields``
    (the guard asks for those on every request), anything else from the whole multidict."""

    __slots__ = ("_request",)

    def __init__(self, request: Request):
        self._request = request

    def get(self, name: str, default: Any = None) -> Any:
        key = _FIELD_KEYS.get(name)
        if key is None:
            return self._request.all_headers().get(name, default)
        value = self._request.fields.get(key)
        return default if value is None else header_text(value)

    def __contains__(self, name: object) -> bool:
        key = _FIELD_KEYS.get(name) if isinstance(name, str) else None
        if key is None:
            return name in self._request.all_headers()
        return key in self._request.fields

    def __getitem__(self, name: str) -> str:
        value = self.get(name)
        if value is None:
            raise KeyError(name)
        return value

    def __getattr__(self, name: str) -> Any:  # items, getall, keys...: what a multidict does, from the whole one
        return getattr(self._request.all_headers(), name)

    def __iter__(self) -> Any:
        return iter(self._request.all_headers())

    def __len__(self) -> int:
        return len(self._request.raw_headers)


class ClientExchange(Protocol):
    """What the proxy's coroutine path and the guard read and call of a client's request: the front door's
    ``Request``, or a stand-in that answers in another API's shape (``ollama/exchange.py``). A protocol rather than
    the class because compiled (``athanor/native.py``) a parameter typed as ``Request`` accepts that class only."""

    method: str
    target: str
    path: str
    body: bytes
    status: int
    started: bool

    @property
    def fields(self) -> dict[bytes, bytes]: ...
    @property
    def forward(self) -> bytes: ...
    @property
    def head_key(self) -> bytes | None: ...
    @property
    def headers(self) -> Headers: ...
    @property
    def remote(self) -> str | None: ...
    @property
    def client_gone(self) -> bool: ...
    async def respond(self, status: int, headers: Sequence[tuple[str, str]], body: bytes, raw: bytes = b"") -> None: ...
    async def start(self, status: int, headers: list[tuple[str, str]]) -> None: ...
    async def write(self, data: bytes) -> None: ...
    def write_now(self, data: bytes) -> bool: ...
    async def drain(self) -> None: ...
    async def end(self) -> None: ...
    async def error(self, status: int, message: str, code: str, param: str | None = None, *,
                    headers: list[tuple[str, str]] | None = None) -> None: ...


class Request:
    """One request on a client connection, and the means to answer it (one object per request)."""

    __slots__ = ("_chunked", "_headers", "_view", "body", "connection", "fields", "forward", "head_key", "keep_alive",
                 "method", "path", "raw_headers", "refused", "started", "status", "target", "version")

    def __init__(self, connection: Connection, method: str, target: str, version: str,
                 raw_headers: list[tuple[bytes, bytes]], keep_alive: bool, fields: dict[bytes, bytes],
                 forward: bytes, head_key: bytes | None = None):
        """``fields`` and ``forward``: ``header_pass``'s of ``raw_headers``. ``head_key``: the head's key in the
        front door's memo when it is remembered there (``heads.py``), for what else is the same for every request
        with that head (the guard's admission)."""
        self.connection = connection
        self.method, self.target, self.version = method, target, version
        self.raw_headers = raw_headers  # as they came, to pass on
        self.path = target.partition("?")[0]
        self.keep_alive = keep_alive
        self.body = b""
        self.refused: Refused | None = None  # answered with this error instead of by a handler
        self.started = False  # the status line went out: an error now can only end the answer
        self.status = 0
        self._chunked = False
        self._headers: CIMultiDict[str] | None = None
        self._view: Headers | None = None
        self.fields, self.forward, self.head_key = fields, forward, head_key

    @property
    def headers(self) -> Headers:
        """The request's headers, case-insensitive, values as str (as aiohttp: UTF-8, other bytes kept as
        surrogates, so the same bytes go on upstream). Those in ``FIELDS`` are read without building anything."""
        view = self._view
        if view is None:
            view = self._view = Headers(self)
        return view

    def all_headers(self) -> CIMultiDict[str]:
        """Every header in a multidict, made on first use (the hot path never needs it)."""
        if self._headers is None:
            self._headers = CIMultiDict([
                (header_text(name), header_text(value)) for name, value in self.raw_headers])
        return self._headers

    @property
    def remote(self) -> str | None:
        """The peer's address (the guard admits only loopback peers to some routes)."""
        peer = self.connection.peername
        return peer[0] if isinstance(peer, tuple) else None

    @property
    def client_gone(self) -> bool:
        return self.connection.lost

    def _head(self, status: int, headers: Sequence[tuple[str, str]], framing: str, raw: bytes = b"") -> bytes:
        self.status, self.started = status, True
        if b"origin" in self.fields:
            headers = [*headers, *self.connection.front.cors(self)]
        lines = "".join([*[f"{k}: {v}\r\n" for k, v in headers], framing]) if headers else framing
        return b"".join((_status_line(status), lines.encode("utf-8", "surrogateescape"), _date_line(),
                         b"" if self.keep_alive else b"Connection: close\r\n", raw, b"\r\n"))

    async def respond(self, status: int, headers: Sequence[tuple[str, str]], body: bytes, raw: bytes = b"") -> None:
        """A whole answer, with its length; ``raw``: header lines passed on as they came (a runtime's)."""
        self.respond_now(status, headers, body, raw)
        await self.connection.drain()

    def respond_now(self, status: int, headers: Sequence[tuple[str, str]], body: bytes, raw: bytes = b"") -> None:
        """``respond`` without waiting for a slow reader: the answer is whole, and the transport keeps it."""
        self.connection.write(self._head(status, headers, f"Content-Length: {len(body)}\r\n", raw) + body)

    async def start(self, status: int, headers: list[tuple[str, str]]) -> None:
        """The head of an answer whose body follows in ``write`` calls: chunked to an HTTP/1.1 client, ended by
        closing the connection to an HTTP/1.0 one."""
        if self.version == "1.1":
            self._chunked = True
            head = self._head(status, headers, "Transfer-Encoding: chunked\r\n")
        else:
            self.keep_alive = False
            head = self._head(status, headers, "")
        self.connection.write(head)
        await self.connection.drain()

    async def write(self, data: bytes) -> None:
        """Part of a started answer; waits while the client reads slowly. ConnectionResetError: it went away."""
        if not data:
            return
        if self.connection.lost:
            raise ConnectionResetError("the client went away")
        if not self.write_now(data):
            await self.connection.drain()

    def write_now(self, data: bytes) -> bool:
        """``write`` without waiting, from a callback: whether the client can take more now (False: it reads
        slowly, or went away; ``drain`` then waits, or raises ConnectionResetError)."""
        connection = self.connection
        if data and not connection.lost:
            connection.write(b"%x\r\n%b\r\n" % (len(data), data) if self._chunked else data)
        return not (connection._write_paused or connection.lost)

    async def drain(self) -> None:
        """Until the client took what was written; ConnectionResetError: it went away."""
        await self.connection.drain()

    async def end(self) -> None:
        """The end of a started answer."""
        if self._chunked and not self.connection.lost:
            self._chunked = False
            self.connection.write(b"0\r\n\r\n")
            await self.connection.drain()

    async def error(self, status: int, message: str, code: str, param: str | None = None, *,
                    headers: list[tuple[str, str]] | None = None) -> None:
        """An error object, in the format of the API called (OpenAI's, or Anthropic's on its routes)."""
        body = self.connection.front.error_body(self.path, status, message, code, param)
        await self.respond(status, [("Content-Type", "application/json; charset=utf-8"), *(headers or [])], body)


def header_pass(raw_headers: list[tuple[bytes, bytes]], skip: frozenset[bytes]) -> tuple[dict[bytes, bytes], bytes]:
    """One pass over a request's headers instead of a multidict per request: the values the front door and the hot
    path look at (the first of each, as ``headers.get`` gives), lower-cased names to raw values, and the header
    lines a proxied request passes on as they came (``skip``: the lower-cased names of those it does not)."""
    fields: dict[bytes, bytes] = {}
    forward = []
    for name, value in raw_headers:
        lower = name.lower()
        if lower in FIELDS and lower not in fields:
            fields[lower] = value
        if lower not in skip:
            forward.append(b"%b: %b\r\n" % (name, value))
    return fields, b"".join(forward)


class Connection(KnownHeads, asyncio.Protocol):
    """One client connection: parsing, the queue of requests read ahead, and the one being answered."""

    def __init__(self, front: Front):
        self.front = front
        self.transport: asyncio.Transport | None = None
        self.peername: Any = None
        self.sockname: Any = None
        self.lost = False
        self.relayed: Any = None  # this connection's way to the aiohttp app (relay.py), made on first use
        self._parser = httptools.HttpRequestParser(self)
        self._queue: collections.deque[Request] = collections.deque()
        self._task: asyncio.Task[None] | None = None  # answers this connection's requests, one after another
        self._more: asyncio.Future[None] | None = None  # the task waits on it for the next request
        self._answering = False
        self._fast: Callable[[], None] | None = None  # while a request is answered in callbacks: its cancel
        self.deadline = 0.0  # (monotonic) closed if the next step has not come by then; 0: none
        self._reading = True
        self._write_paused = False
        self._drained: asyncio.Future[None] | None = None
        self._closing_after: Refused | None = None  # a malformed request: answered after those before it
        self._new_message()

    def _new_message(self) -> None:
        self._url = b""
        self._raw_headers: list[tuple[bytes, bytes]] = []
        self._header_bytes = 0
        self._request: Request | None = None
        self._body: list[bytes] = []
        self._body_size = 0
        self._limit = 0
        self._in_message = False
        self._ignoring = False  # the request was answered already (a refused Expect): the rest is not read

    # ------------------------------------------------------------------ asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports do not subclass asyncio's
        # Kept: in Python 3.11 each get_running_loop() is a getpid() system call (its fork check).
        self._loop = asyncio.get_running_loop()
        self.peername = transport.get_extra_info("peername")
        self.sockname = transport.get_extra_info("sockname")
        self.front.connections.add(self)
        self._arm(self.front.header_timeout)

    def data_received(self, data: bytes) -> None:
        self._learning = None
        if self._left:
            data = self.body_rest(data)
        elif not self._in_message and self._closing_after is None and self.front.heads is not None:
            data = self.head_looked_up(self.front.heads, data)
        if not data:
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # An upgrade (h2c, websocket) this server does not do: the request is answered as a plain one, and
            # nothing after it is read (it would be in the other protocol).
            self._stop_reading()
            if self._queue and isinstance(self._queue[-1], Request):
                self._queue[-1].keep_alive = False
        except httptools.HttpParserCallbackError as failed:
            refused = failed.__context__ if isinstance(failed.__context__, Refused) else None
            self._malformed(refused or Refused(400, "malformed HTTP request", "bad_request"))
        except httptools.HttpParserError as malformed:
            reason = str(malformed).strip().splitlines()[0] if str(malformed).strip() else "malformed request"
            self._malformed(Refused(400, f"malformed HTTP request: {reason[:120]}", "bad_request"))

    def eof_received(self) -> bool:
        # As aiohttp: a client that ends its side has gone (its handler is cancelled, as it would be on a reset):
        # clients hang up this way, and a request waiting for a load must not start one for nobody.
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.front.connections.discard(self)
        self._disarm()
        if self._task is not None and not self._task.done():
            self._task.cancel()  # its client is gone: nothing more is done for it
        if self._fast is not None:
            cancel, self._fast = self._fast, None
            cancel()
        self._wake_drain()
        if self.relayed is not None:
            self.relayed.close()

    def pause_writing(self) -> None:
        self._write_paused = True
        if self.relayed is not None:
            self.relayed.pause_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        self._wake_drain()
        if self.relayed is not None:
            self.relayed.resume_reading()

    def _wake_drain(self) -> None:
        """A write waiting for the client's buffer goes on (it drained, or the client is gone)."""
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    # ------------------------------------------------------------------ httptools callbacks

    def on_message_begin(self) -> None:
        self._in_message = True
        self.deadline = _monotonic() + self.front.header_timeout  # ``_arm``, inline: it runs per request

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > MAX_TARGET:
            raise Refused(414, f"request target longer than {MAX_TARGET} bytes", "uri_too_long")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._raw_headers.append((name, value))
        self._header_bytes += len(name) + len(value)
        if self._header_bytes > MAX_HEADER_BYTES or len(self._raw_headers) > MAX_HEADERS:
            raise Refused(431, f"request headers larger than {MAX_HEADER_BYTES} bytes or {MAX_HEADERS} fields",
                          "headers_too_large")

    def on_headers_complete(self) -> None:
        parser, front, headers = self._parser, self.front, self._raw_headers
        try:
            target = self._url.decode()
        except UnicodeDecodeError:
            raise Refused(400, "malformed HTTP request: the request target is not UTF-8", "bad_request") from None
        method, version = parser.get_method().decode("ascii", "replace"), parser.get_http_version()
        keep_alive = parser.should_keep_alive()
        fields, forward = header_pass(headers, front.forward_skip)
        learning, self._learning = self._learning, None
        key = None
        if learning is not None and front.heads is not None:
            at = only_length(headers, learning[1], _NOT_REMEMBERED)
            if at is not None:
                key = learning[0]
                front.heads.remember(key, (method, target, version, headers, at, fields, forward, keep_alive))
        self._headed(Request(self, method, target, version, headers, keep_alive, fields, forward, key))

    def _headed(self, request: Request) -> None:
        """A request's head is complete (parsed, or known): the limits that depend on more than the head."""
        self.deadline = 0.0  # ``_disarm``
        self._request = request
        fields = request.fields
        self._limit = self.front.max_body()
        length = fields.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self._limit:
            request.refused = self._too_large()
        if b"expect" in fields:
            self._expect(request)

    def on_body(self, body: bytes) -> None:
        request = self._request
        if request is None or request.refused is not None:
            return  # read and dropped: the request is refused once complete (a client still sending would
            # otherwise get a reset instead of the answer)
        self._body_size += len(body)
        if self._body_size > self._limit:
            self._body.clear()
            request.refused = self._too_large()
            return
        self._body.append(body)

    def on_message_complete(self) -> None:
        request = self._request
        assert request is not None
        self._in_message = False
        if self._ignoring:
            self._ignoring = False
        elif request.refused is not None:
            request.keep_alive = False  # what else the client sent with it is not read
            self._queue.append(request)
            self._stop_reading()
        else:
            body = self._body
            request.body = body[0] if len(body) == 1 else b"".join(body)
            self._queue.append(request)
            if len(self._queue) >= MAX_QUEUED:
                self._stop_reading()
        self._new_message()
        self._next()

    def known_head(self, known: KnownHead, found: tuple[bytes, bytes, int], data: bytes, start: int) -> bytes:
        """A request whose head was parsed before (``heads.py``): llhttp's callbacks, without llhttp."""
        key, value, length = found
        method, target, version, headers, at, fields, forward, keep_alive = known
        headers = headers.copy()
        headers[at] = (headers[at][0], value)  # the one part of the head that differs
        self.on_message_begin()
        self._headed(Request(self, method, target, version, headers, keep_alive, {**fields, b"content-length": value},
                             forward, key))
        return self.body_from(data, start, length)

    def _too_large(self) -> Refused:
        return Refused(413, f"request body larger than the gateway's limit of {self._limit} bytes",
                       "request_too_large")

    # ------------------------------------------------------------------ answering, in order

    def _next(self) -> None:
        """Offer a request that arrives on an idle connection to the fast path, or wake the connection's task (one
        per connection, made with its first request that needs it: a task per request was a measurable share of
        a proxied request's CPU)."""
        if self._fast is not None:
            return  # the request answered in callbacks comes back here when it is done (``fast_done``)
        if (len(self._queue) == 1 and not self._answering and self._closing_after is None and not self._write_paused
                and self.front.fast is not None and self._taken_fast(self._queue[0])):
            return
        if self._task is None:
            self._task = self._loop.create_task(self._answer())
        elif self._more is not None and not self._more.done():
            self._more.set_result(None)

    def _taken_fast(self, request: Request) -> bool:
        """Whether the fast path took ``request`` (then off the queue: its end calls ``fast_done``)."""
        front = self.front
        if request.refused is not None or front.handler(request) is not front.hot:
            return False
        try:
            cancel = front.fast(request)  # type: ignore[misc]
        except Exception:  # noqa: BLE001 - a bug there must not lose the request: the coroutine path answers it
            log.exception("unexpected error on the fast path for %s %s", request.method, request.path[:200])
            return False
        if cancel is None:
            return False
        self._queue.popleft()
        self._fast = cancel
        return True

    def fast_done(self, request: Request) -> None:
        """The request the fast path took is answered: on to the next one, as the task does after an answer."""
        self._fast = None
        if self.lost:
            return
        if not request.keep_alive:
            self.close()
            return
        if not self._reading and len(self._queue) < MAX_QUEUED // 2 and self._closing_after is None:
            self._resume_reading()
        if self._queue or self._closing_after is not None:
            self._loop.call_soon(self._next)  # not from inside the runtime's protocol callback that ended this one
        elif not self._in_message:
            self.deadline = _monotonic() + self.front.keepalive  # ``_arm``

    async def _answer(self) -> None:
        """Answer the requests read, in order, until the connection ends."""
        while not self.lost:
            if self._queue:
                self._answering = True
                keep_alive = await self._answer_one(self._queue.popleft())
                self._answering = False
                if not keep_alive:
                    self.close()
                    return
            elif self._closing_after is not None:
                refused, self._closing_after = self._closing_after, None
                await self._refuse_raw(refused)
                self.close()
                return
            else:
                if not self._in_message:
                    self._arm(self.front.keepalive)
                self._more = self._loop.create_future()
                try:
                    await self._more
                finally:
                    self._more = None

    async def _answer_one(self, request: Request) -> bool:
        """One request answered; whether the connection stays open."""
        if not self._reading and len(self._queue) < MAX_QUEUED // 2 and self._closing_after is None:
            self._resume_reading()
        front = self.front
        try:
            if request.refused is not None:
                refused = request.refused
                await request.error(refused.status, refused.message, refused.code, headers=refused.headers)
            else:
                await front.handler(request)(request)
        except ConnectionError:
            return False
        except Exception:  # noqa: BLE001 - the handlers answer their own errors; this is a bug
            log.exception("unexpected error serving %s %s", request.method, request.path[:200])
            if request.started:
                return False
            await request.error(500, "internal error in the gateway (see its log)", "internal_error")
        return request.keep_alive

    def _malformed(self, refused: Refused) -> None:
        """A request llhttp cannot parse: nothing more is read; it is answered after the requests before it."""
        self._stop_reading()
        self._disarm()
        self._closing_after = refused
        self._next()

    async def _refuse_raw(self, refused: Refused) -> None:
        path = self._request.path if self._request is not None else "/"
        body = self.front.error_body(path, refused.status, refused.message, refused.code, None)
        self.write(f"HTTP/1.1 {refused.status} {_REASONS.get(refused.status, 'Bad Request')}\r\n"
                   f"Content-Type: application/json; charset=utf-8\r\nContent-Length: {len(body)}\r\n"
                   f"Connection: close\r\nDate: {_date()}\r\n\r\n".encode() + body)
        await self.drain()

    def _expect(self, request: Request) -> None:
        """``Expect: 100-continue``: a request that is refused anyway (a foreign host, a body over the limit) is
        answered before the client sends its body; an accepted one gets ``100 Continue`` at once."""
        refused = request.refused or self.front.expect(request)
        if refused is not None:
            request.refused = refused
            if self._idle():  # answered now, before the body it asks leave to send, and the connection closes
                request.keep_alive = False
                self._queue.append(request)
                self._ignoring = True
                self._stop_reading()
                self._next()
            return
        if request.version == "1.1" and self._idle():
            self.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # pipelined behind others: the client sends on its own

    def _idle(self) -> bool:
        """No request is being answered or waits to be."""
        return not self._queue and not self._answering and self._fast is None

    # ------------------------------------------------------------------ the transport

    def write(self, data: bytes) -> None:
        if not self.lost and self.transport is not None:
            self.transport.write(data)

    async def drain(self) -> None:
        if self._write_paused and not self.lost:
            self._drained = self._loop.create_future()
            await self._drained
        if self.lost:
            raise ConnectionResetError("the client went away")

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def _stop_reading(self) -> None:
        if self._reading and self.transport is not None and not self.lost:
            self._reading = False
            self.transport.pause_reading()

    def _resume_reading(self) -> None:
        if not self._reading and self.transport is not None and not self.lost:
            self._reading = True
            self.transport.resume_reading()

    def _arm(self, seconds: float) -> None:
        """Close the connection unless the next step (a request's headers, or a new request) comes in time."""
        self.deadline = _monotonic() + seconds

    def _disarm(self) -> None:
        self.deadline = 0.0

    def late(self) -> None:
        """The deadline passed (``Front._sweep``)."""
        self.deadline = 0.0
        if self._answering or self._fast is not None:
            return  # an answer is under way; its end arms the keep-alive deadline again
        log.debug("closed a connection that sent no complete request headers in time")
        self.close()


_date_cache: tuple[int, str, bytes] = (0, "", b"")


def _date() -> str:
    """The Date header's value, formatted once a second."""
    global _date_cache
    now = int(time.time())
    if _date_cache[0] != now:
        text = email.utils.formatdate(now, usegmt=True)
        _date_cache = (now, text, f"Date: {text}\r\n".encode())
    return _date_cache[1]


def _date_line() -> bytes:
    """The whole Date header line, as bytes."""
    if _date_cache[0] != int(time.time()):
        _date()
    return _date_cache[2]


@functools.lru_cache(maxsize=64)
def _status_line(status: int) -> bytes:
    return f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}\r\n".encode()
