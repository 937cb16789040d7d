"""A lean HTTP/1.1 client for the one hop that is hot: the gateway to a runtime on loopback.

aiohttp's ClientSession is general (cookies, redirects, proxies, tracing, decompression) and that generality costs
a few hundred microseconds of CPU per request, which on a small machine comes straight out of the runtime's share.
This hop needs far less: keep-alive connections per port, a request written in one call, the response parsed by
llhttp (``httptools``) and its body handed over chunk by chunk, with reading paused while the client lags.

Failures are typed by what the caller may do about them: ``UpstreamUnreachable`` means nothing reached the runtime
(safe to retry); ``UpstreamClosed`` means the connection ended before the response did, ``UpstreamDropped`` before
any of it; ``UpstreamTimeout`` means the runtime sent nothing for the idle limit.

A connection that closes before any answer looks the same whether the runtime dropped it while idle or read the
request and died of it, and running a request twice (a prompt that crashed one runtime crashes the next) is worse
than failing it once. So idle drops are caught before the request is written where they can be: a kept-alive
connection is reused only if the runtime has sent nothing on it since (no end of stream waiting in the socket) and
only within ``REUSE_IDLE_S`` of its last answer, before the runtime's own keep-alive limit can close it under the
request. A drop that still happens is ``UpstreamDropped``: the ingress sends the request again only when the
connection was a reused one and the runtime is found alive after it (so the request did not kill it).

The pool opens at most ``limit`` connections to one runtime (its incarnation: a restarted runtime on the same port
starts a fresh pool). Requests beyond the limit wait here, in order, for a connection to come back: a runtime
serves each kept-alive connection on a thread of its own, so connections it has no thread for would wait inside
its accept queue, where nobody can see or cancel them (see ``runtimes/launch.py``).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import select
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Final

import httptools

from athanor.addresses import authority
from athanor.ingress.heads import HeadMemo, KnownHeads, only_length
from athanor.runtimes.launch import LOOPBACK

_monotonic: Final = time.monotonic  # compiled, a C static: ``time.monotonic`` is a module lookup per call

log = logging.getLogger("athanor.ingress")

BUFFER_HIGH: Final = 256 * 1024  # pause reading from the runtime above this many unread bytes, until they are taken
DEFAULT_LIMIT: Final = 32
# bodies up to this size go out with the head in one write (copying beats a system call)
ONE_WRITE_BODY: Final = 16 * 1024
REUSE_IDLE_S: Final = 4.0  # llama-server (cpp-httplib) and uvicorn close a connection idle for 5 s
# Header names (lower-case) that belong to one hop, framing among them: never passed on as they came.
HOP_BY_HOP: Final = frozenset({b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"te",
                               b"trailer", b"transfer-encoding", b"upgrade", b"host", b"content-length"})
# A runtime's header lines its caller never passes on (``Response.passed_on``): hop-by-hop ones and the date (the
# gateway frames and dates its own answers), and CORS (the gateway decides that for itself).
NOT_PASSED_ON: Final = HOP_BY_HOP | {b"date"}
NOT_PASSED_ON_PREFIX: Final = b"access-control-"
_FRAMING: Final = (b"content-length", b"transfer-encoding")
# What ``on_headers_complete`` makes of a head, remembered per runtime (``heads.py``): status, the raw headers,
# where Content-Length is among them, the lines passed on, the content type, whether the connection stays open.
KnownHead = tuple[int, list[tuple[bytes, bytes]], int, bytes, str, bool]
_NOT_REMEMBERED: Final = frozenset({b"transfer-encoding"})  # a head with these is parsed every time


class UpstreamError(Exception):
    """The runtime could not be reached or broke off its answer."""


class UpstreamUnreachable(UpstreamError):
    """No connection could be made: the request never reached the runtime."""


class UpstreamClosed(UpstreamError):
    """The runtime closed the connection (or sent garbage) before its response was complete."""


class UpstreamDropped(UpstreamClosed):
    """The runtime closed the connection before any byte of its answer. ``reused``: the connection had carried
    earlier exchanges (a kept-alive one), so the runtime may have dropped it as idle as the request went out."""

    def __init__(self, message: str, *, reused: bool):
        super().__init__(message)
        self.reused = reused


class UpstreamTimeout(UpstreamError):
    """The runtime sent nothing for longer than the idle limit."""


class Response:
    """One response being read off a connection. Headers are available when ``send`` returns, as the runtime sent
    them (bytes: the ingress passes them on as they are)."""

    def __init__(self, connection: _Connection):
        self._connection = connection
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.passed_on = b""  # the header lines a client may see, as the runtime sent them (``NOT_PASSED_ON``)
        self.content_type = ""

    async def read(self) -> bytes:
        connection = self._connection
        parts: list[bytes] = []
        while True:
            parts += connection.take_all()  # also while incomplete: a paused connection resumes only when drained
            if connection.complete:
                return b"".join(parts)
            if connection.error is not None:
                raise connection.error
            await connection.wait()

    async def relay(self, sink: Callable[[bytes], bool], drain: Callable[[], Awaitable[None]]) -> None:
        """The body handed to ``sink`` as it arrives, from the connection's callbacks: no task step, future or
        coroutine per chunk, which a stream of tokens would pay for each event. ``sink`` returns False when its
        reader cannot take more now: reading from the runtime then pauses until ``drain`` returns. Raises
        UpstreamClosed if the connection ends before the body does, UpstreamTimeout past the idle limit, which
        counts from the runtime's last bytes."""
        connection = self._connection
        connection.sink = sink
        try:
            for chunk in connection.take_all():  # what came with the head
                connection.to_sink(chunk)
            while True:
                if connection.complete:
                    return
                if connection.error is not None:
                    raise connection.error
                if connection.held:
                    await drain()
                    connection.go_on()
                else:
                    await connection.wait()
        finally:
            connection.sink = None
            connection.go_on()  # the body ended while its reader lagged: nothing more to read of it

    @property
    def close_delimited(self) -> bool:
        """The body ends where the connection ends (HTTP/1.0 style): a dying runtime looks like a clean end."""
        return self._connection.close_delimited


class _Connection(KnownHeads, asyncio.Protocol):
    """One keep-alive connection and the response currently being read on it."""

    def __init__(self, runtime: _RuntimeConnections):
        self.runtime = runtime
        self.idle_timeout: float | None = None
        self.deadline = 0.0  # (monotonic) while waiting: when the runtime has been silent too long
        self.exchanges = 0  # requests sent on it
        self.idle_since = 0.0
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self._poll: select.poll | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._done: Callable[[_Connection], None] | None = None  # an exchange answered in callbacks (``send_now``)
        self.sink: Callable[[bytes], bool] | None = None  # where the body goes as it comes (``Response.relay``)
        self._chunks: collections.deque[bytes] = collections.deque()
        self._reset()

    def _reset(self) -> None:
        """Fresh per-exchange state: a kept-alive connection reads one response after another."""
        self.error: UpstreamError | None = None
        self.response: Response | None = None
        self._raw_headers: list[tuple[bytes, bytes]] = []
        self.headers_done = False
        self.complete = False
        self.keep_alive = False
        self.close_delimited = False
        self._fresh = True  # nothing of this answer read yet: its head may be one parsed before (``heads.py``)
        self._learning = None  # the key of a head llhttp parses (``heads.KnownHeads``)
        self._left = 0  # body bytes still to come of an answer whose head was known
        self._chunks.clear()  # taken whole by ``take_all``, or left by an exchange that failed
        self._buffered = 0
        self._paused = False
        self.held = False  # reading paused for the sink's reader (``Response.relay``)

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports do not subclass asyncio's
        self._loop = asyncio.get_running_loop()  # kept: in Python 3.11 each lookup is a getpid() system call
        sock = transport.get_extra_info("socket")
        if sock is not None:
            self._poll = select.poll()
            self._poll.register(sock.fileno(), select.POLLIN)

    def data_received(self, data: bytes) -> None:
        if self._left:
            data = self.body_rest(data)
        elif self._fresh and self.response is not None:  # the first read of an answer
            self._fresh = False
            data = self.head_looked_up(self.runtime.heads, data)
        if data:
            try:
                self.parser.feed_data(data)
            except httptools.HttpParserError as exc:
                self._fail(UpstreamClosed(f"invalid HTTP from the runtime: {exc}"))
                self.close()
                return
        if (self._done is not None or self.sink is not None) and self.idle_timeout:  # answered in callbacks, not
            self.deadline = _monotonic() + self.idle_timeout  # complete yet: the idle limit counts from now

    def eof_received(self) -> bool:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.response is None or self.complete:
            self._wake()
            return
        if self.close_delimited and self.error is None:
            self.complete = True  # the body ran to the end of the connection, as announced
        elif not self.headers_done:  # never sent again: the runtime may have read the request and died of it
            detail = f" ({exc})" if exc else ""
            self._fail(UpstreamDropped(f"the runtime closed the connection without answering{detail}",
                                       reused=self.exchanges > 1))
        else:
            detail = f": {exc}" if exc else ""
            self._fail(UpstreamClosed(f"the runtime closed the connection before the response was complete{detail}"))
        self._wake()

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self._raw_headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        headers = self._raw_headers
        framed = False
        content_type = ""
        passed_on = []
        for name, value in headers:
            lower = name.lower()
            if lower in NOT_PASSED_ON:
                if lower in _FRAMING:
                    framed = True
                continue
            if lower == b"content-type":
                content_type = value.decode("latin-1")
            elif lower.startswith(NOT_PASSED_ON_PREFIX):
                continue
            passed_on.append(b"%b: %b\r\n" % (name, value))
        # llama-server closes the connection right after an event stream, while its headers say Keep-Alive: a
        # request handed the connection before that close arrives is written into it and lost. Not reused.
        keep_alive = self.parser.should_keep_alive()
        if keep_alive:
            self.runtime.keeps_alive = True
        keep_alive = keep_alive and "text/event-stream" not in content_type
        head = (status, headers, -1, b"".join(passed_on), content_type, keep_alive)
        learning, self._learning = self._learning, None
        if learning is not None and status >= 200 and status not in (204, 304):
            at = only_length(headers, learning[1], _NOT_REMEMBERED)
            if at is not None:
                head = (status, headers, at, head[3], content_type, keep_alive)
                self.runtime.heads.remember(learning[0], head)
        self._headed(head, close_delimited=not framed and status >= 200 and status not in (204, 304))

    def _headed(self, head: KnownHead, *, close_delimited: bool = False) -> None:
        response = self.response
        assert response is not None
        response.status, response.headers, _, response.passed_on, response.content_type, self.keep_alive = head
        self.close_delimited = close_delimited
        self.headers_done = True
        if self._done is None:  # answered in callbacks: only its end is waited for
            self._wake()

    def known_head(self, known: KnownHead, found: tuple[bytes, bytes, int], data: bytes, start: int) -> bytes:
        """An answer whose head was parsed before: what llhttp's callbacks would do, without it."""
        _, value, length = found
        headers, at = known[1].copy(), known[2]
        headers[at] = (headers[at][0], value)  # the one part of the head that differs
        self._headed((known[0], headers, at, *known[3:]))
        return self.body_from(data, start, length)

    def on_body(self, body: bytes) -> None:
        if self.sink is not None:
            self.to_sink(body)
            return
        self._chunks.append(bytes(body))
        self._buffered += len(body)
        if self._buffered > BUFFER_HIGH and not self._paused and self.transport is not None and self._done is None:
            self._paused = True
            self.transport.pause_reading()
        if self._done is None:
            self._wake()

    def on_message_complete(self) -> None:
        self.complete = True
        self._wake()

    # the reading side
    def take_all(self) -> list[bytes]:
        chunks = list(self._chunks)
        self._chunks.clear()
        self._buffered = 0
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        return chunks

    def to_sink(self, body: bytes) -> None:
        assert self.sink is not None
        if not self.sink(body) and not self.held and self.transport is not None:
            self.held = True
            self.transport.pause_reading()
            self._wake()  # ``Response.relay`` waits for the sink's reader

    def go_on(self) -> None:
        """The sink's reader took what it had (``relay``): reading from the runtime resumes."""
        if self.held:
            self.held = False
            if self.transport is not None:
                self.transport.resume_reading()

    async def wait(self) -> None:
        """Until the runtime sends something (or the connection ends); at most ``idle_timeout`` seconds, which
        the pool's sweep enforces (``UpstreamPool._sweep``)."""
        if self.idle_timeout:
            self.deadline = _monotonic() + self.idle_timeout
        self._waiter = self._loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def late(self, now: float) -> bool:
        """Whether it waits for the runtime past its idle limit."""
        waiting = self._waiter is not None or self._done is not None
        return waiting and self.idle_timeout is not None and now > self.deadline

    def expire(self) -> None:
        self._fail(UpstreamTimeout(f"the runtime sent nothing for {self.idle_timeout:g} s (limits.upstreamIdleTimeout)"))
        self.close()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)
        elif self._done is not None and (self.complete or self.error is not None):
            done, self._done = self._done, None
            done(self)

    def _fail(self, error: UpstreamError) -> None:
        if self.error is None:
            self.error = error
        self._wake()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def dropped(self) -> bool:
        """Closed, or the runtime sent something since its last answer: its end of stream (or anything else)
        waiting in the socket means it dropped the connection, even when the event loop has not read that yet.
        One poll(2) of the socket, no read."""
        return self.closed or (self._poll is not None and bool(self._poll.poll(0)))

    # one exchange
    async def send(self, head: bytes, body: bytes, idle_timeout: float | None) -> Response:
        response = self._write(head, body, idle_timeout)
        while not self.headers_done:
            if self.error is not None:
                raise self.error
            if self.closed:
                raise UpstreamDropped("the runtime closed the connection without answering", reused=self.exchanges > 1)
            await self.wait()
        return response

    def send_now(self, head: bytes, body: bytes, idle_timeout: float | None,
                 done: Callable[[_Connection], None]) -> None:
        """Send a request whose whole answer is wanted at once: ``done(self)`` is called, from the protocol's
        callbacks, when the response is complete or has failed (``error``); nothing waits in between."""
        self._write(head, body, idle_timeout)
        if idle_timeout:
            self.deadline = _monotonic() + idle_timeout
        self._done = done

    def _write(self, head: bytes, body: bytes, idle_timeout: float | None) -> Response:
        self._reset()
        self.idle_timeout = idle_timeout
        self.response = response = Response(self)
        self.exchanges += 1
        assert self.transport is not None
        if len(body) <= ONE_WRITE_BODY:
            self.transport.write(head + body)
        else:
            self.transport.write(head)
            self.transport.write(body)
        return response

    @property
    def reusable(self) -> bool:
        return self.complete and self.keep_alive and not self.closed and self.error is None

    @property
    def ended_by_runtime(self) -> bool:
        """The runtime ended this connection after a whole answer, and it is one that keeps connections alive, so
        a connection waiting idle for the next request is what it expects. (One that ends every connection after
        an answer, as an HTTP/1.0 server does, may serve one connection at a time: an idle one opened ahead would
        hold it.)"""
        return self.complete and not self.keep_alive and self.error is None and self.runtime.keeps_alive


class _RuntimeConnections:
    """The connections to one runtime incarnation: idle ones, how many are open, and who waits for one."""

    __slots__ = ("address", "heads", "host_line", "idle", "incarnation", "keeps_alive", "limit", "open", "socket",
                 "waiters")

    def __init__(self, address: tuple[str, int], incarnation: int, limit: int, socket: str | None):
        self.address, self.incarnation, self.limit = address, incarnation, limit
        self.socket = socket  # connect here rather than to ``address``
        self.host_line = f"Host: {authority(*address)}\r\n".encode()  # every request's, made once per runtime
        self.idle: list[_Connection] = []
        self.heads: HeadMemo[KnownHead] = HeadMemo()  # the answers' heads parsed so far (``heads.py``)
        self.open = 0
        self.keeps_alive = False  # an answer said so (HTTP/1.1 without Connection: close)
        self.waiters: collections.deque[asyncio.Future[_Connection | None]] = collections.deque()

    def pass_on(self, connection: _Connection | None) -> bool:
        """Hand a kept-alive connection (or, with None, the right to open one) to the oldest waiter."""
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(connection)
                return True
        return False


class UpstreamPool:
    """Keep-alive connections to runtimes: one request at a time per connection, at most ``limit`` connections
    per runtime. ``idle_timeout`` (the Gateway's ``limits.upstreamIdleTimeout``) may be changed at any time: each
    request takes the value of the moment it is sent."""

    def __init__(self, idle_timeout: float | None = None, *, reuse_idle_s: float = REUSE_IDLE_S) -> None:
        self._runtimes: dict[tuple[str, int], _RuntimeConnections] = {}  # by (host, port)
        self.idle_timeout = idle_timeout
        self.reuse_idle_s = reuse_idle_s
        self._busy: set[_Connection] = set()  # in an exchange: the sweep looks at these
        self._sweeping: asyncio.TimerHandle | None = None
        self._refills: set[asyncio.Task[None]] = set()  # connections opened ahead (``_refill``)

    def _watch(self, connection: _Connection) -> None:
        self._busy.add(connection)
        if self._sweeping is None and self.idle_timeout:
            self._sweeping = asyncio.get_running_loop().call_later(self._sweep_every(), self._sweep)

    def _sweep_every(self) -> float:
        return min(1.0, (self.idle_timeout or 1.0) / 4)

    def _sweep(self) -> None:
        """End the exchanges whose runtime has sent nothing for the idle limit. One timer for the pool rather than
        one per wait: a streamed answer waits once per chunk."""
        now = _monotonic()
        for connection in [c for c in self._busy if c.late(now)]:
            connection.expire()
        self._sweeping = (asyncio.get_running_loop().call_later(self._sweep_every(), self._sweep)
                          if self._busy and self.idle_timeout else None)

    def request(
        self, port: int, method: str, target: str, headers: Iterable[tuple[str, str]], body: bytes, *,
        limit: int = DEFAULT_LIMIT, incarnation: int = 0, raw: bytes = b"", host: str = LOOPBACK,
        socket: str | None = None,
    ) -> _Exchange:
        """Send one request: ``async with pool.request(...) as response``. The body must be read inside the block;
        leaving it early (an error, a cancelled handler) closes the connection, so the runtime stops working for
        nobody. ``incarnation`` names the runtime process behind ``host:port`` (loopback, or a pod's address): a new
        one gets fresh connections. ``socket``: a Unix socket the runtime also listens on, connected to instead.
        ``raw``: header lines sent as they are, after ``headers`` (a client's, as the gateway received them)."""
        runtime = self._runtime((host, port), incarnation, limit, socket)
        return _Exchange(self, runtime, _head(runtime, method, target, headers, body, raw), body)

    def take_idle(self, port: int, method: str, target: str, headers: Iterable[tuple[str, str]], body: bytes, *,
                  limit: int = DEFAULT_LIMIT, incarnation: int = 0, raw: bytes = b"", host: str = LOOPBACK,
                  socket: str | None = None) -> tuple[_Connection, bytes] | None:
        """A kept-alive connection to the runtime fit for reuse now and the head to send on it (``send_now``), or
        None when a request would have to wait or connect (``request`` does that). Give it back with
        ``finish_now``."""
        runtime = self._runtimes.get((host, port))
        if runtime is None or runtime.incarnation != incarnation:
            runtime = self._runtime((host, port), incarnation, limit, socket)
        if not runtime.idle or runtime.waiters:
            return None
        connection = self._reusable(runtime)
        if connection is None:
            return None
        self._watch(connection)
        return connection, _head(runtime, method, target, headers, body, raw)

    def finish_now(self, connection: _Connection) -> None:
        """The exchange of ``take_idle`` is over: the connection goes back if it can carry another, else it closes
        (an answer cut short: the runtime stops working on it)."""
        connection._done = None
        self._busy.discard(connection)
        self._release(connection)

    def _runtime(self, address: tuple[str, int], incarnation: int, limit: int,
                 socket: str | None) -> _RuntimeConnections:
        runtime = self._runtimes.get(address)
        if runtime is None or runtime.incarnation != incarnation:
            if runtime is not None:
                self._retire(runtime)
            runtime = self._runtimes[address] = _RuntimeConnections(address, incarnation, limit, socket)
        return runtime

    def _retire(self, runtime: _RuntimeConnections) -> None:
        """The runtime is gone: close its idle connections and send its waiters to a new one."""
        for connection in runtime.idle:
            connection.close()
        runtime.open -= len(runtime.idle)
        runtime.idle.clear()
        while runtime.pass_on(None):
            runtime.open += 1

    async def _acquire(self, runtime: _RuntimeConnections) -> _Connection:
        """A connection to ``runtime``: an idle one fit for reuse, a new one while under the limit and nobody
        waits, else the next one released, in order. A waiter handed None holds a reservation: a connection
        counted in ``open`` that it opens itself."""
        connection = self._reusable(runtime)
        if connection is not None:
            return connection
        if runtime is not self._runtimes.get(runtime.address) or (runtime.open < runtime.limit and not runtime.waiters):
            runtime.open += 1
            return await self._connect(runtime)
        waiter: asyncio.Future[_Connection | None] = asyncio.get_running_loop().create_future()
        runtime.waiters.append(waiter)
        try:
            handed = await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():  # handed something, then cancelled: pass it on
                handed = waiter.result()
                if handed is None:
                    self._free(runtime)
                else:
                    self._release(handed)
            raise
        if handed is None:
            return await self._connect(runtime)
        if handed.dropped():  # answered just now, and dropped since
            handed.close()
            return await self._connect(runtime)  # in its place: this request already waited its turn
        return handed

    def _reusable(self, runtime: _RuntimeConnections) -> _Connection | None:
        """An idle connection fit for reuse, if there is one; those unfit are closed on the way."""
        if runtime.idle:
            now = _monotonic()
            while runtime.idle:
                connection = runtime.idle.pop()  # the most recently used first: the least likely to be dropped
                if now - connection.idle_since < self.reuse_idle_s and not connection.dropped():
                    return connection
                self._discard(connection)  # dropped by the runtime, or about to be: never written to
        return None

    async def _connect(self, runtime: _RuntimeConnections) -> _Connection:
        """Open the connection ``runtime.open`` already counts (or give the count back)."""
        loop = asyncio.get_running_loop()
        try:
            if runtime.socket:
                try:
                    _, connection = await loop.create_unix_connection(lambda: _Connection(runtime), runtime.socket)
                    return connection
                except OSError as unreachable:  # its file removed, say: the runtime's port serves the same
                    log.warning("cannot connect to %s (%s): %s from now on", runtime.socket,
                                unreachable.strerror or unreachable, authority(*runtime.address))
                    runtime.socket = None
            _, connection = await loop.create_connection(lambda: _Connection(runtime), *runtime.address)
        except BaseException as exc:
            self._free(runtime)
            if isinstance(exc, OSError):
                where = authority(*runtime.address)
                raise UpstreamUnreachable(f"cannot connect to {where}: {exc.strerror or exc}") from exc
            raise
        return connection

    def _free(self, runtime: _RuntimeConnections) -> None:
        """One connection to ``runtime`` is gone: its place goes to the oldest waiter, or is free again."""
        if not runtime.pass_on(None):
            runtime.open -= 1

    def _release(self, connection: _Connection) -> None:
        runtime = connection.runtime
        current = runtime is self._runtimes.get(runtime.address)
        if connection.reusable and current:
            self._give(runtime, connection)
            return
        self._discard(connection)
        if current and connection.ended_by_runtime and runtime.open < runtime.limit and not runtime.waiters:
            self._refill(runtime)

    def _give(self, runtime: _RuntimeConnections, connection: _Connection) -> None:
        """A connection free for the next request: to the oldest waiter, else idle."""
        connection.idle_since = _monotonic()
        if not runtime.waiters or not runtime.pass_on(connection):
            runtime.idle.append(connection)

    def _refill(self, runtime: _RuntimeConnections) -> None:
        """Open a connection in place of one the runtime ended after an answer, before a request needs it.

        llama-server (cpp-httplib) ends a kept-alive connection after 100 requests, and every connection after an
        event stream: without this, the next request would wait for a connection to be made, and would leave the
        callbacks' fast lane for it (``Proxy.fast``)."""
        runtime.open += 1
        task = asyncio.ensure_future(self._refilled(runtime))
        self._refills.add(task)
        task.add_done_callback(self._refills.discard)

    async def settled(self) -> None:
        """Until the connections being opened ahead are open, or have failed."""
        if self._refills:
            await asyncio.wait(list(self._refills))

    async def _refilled(self, runtime: _RuntimeConnections) -> None:
        try:
            connection = await self._connect(runtime)
        except UpstreamUnreachable as exc:  # stopping, or dead: the next request finds out for itself
            log.debug("no connection opened ahead to %s: %s", authority(*runtime.address), exc)
            return
        if runtime is self._runtimes.get(runtime.address):
            self._give(runtime, connection)
        else:  # stopped, or replaced by a new incarnation, meanwhile
            self._discard(connection)

    def _discard(self, connection: _Connection) -> None:
        connection.close()
        self._free(connection.runtime)

    def drop_idle(self, port: int, host: str = LOOPBACK) -> None:
        """Close the idle connections to the runtime on ``host:port`` (it dropped one that looked fit for reuse)."""
        runtime = self._runtimes.get((host, port))
        if runtime is None:
            return
        idle, runtime.idle = runtime.idle, []
        for connection in idle:
            self._discard(connection)

    def forget(self, address: tuple[str, int]) -> None:
        """Close idle connections to a runtime that stopped (its address may be served by another one later)."""
        runtime = self._runtimes.pop(address, None)
        if runtime is not None:
            self._retire(runtime)

    def close(self) -> None:
        for task in self._refills:
            task.cancel()
        if self._sweeping is not None:
            self._sweeping.cancel()
            self._sweeping = None
        for address in list(self._runtimes):
            self.forget(address)


def _head(runtime: _RuntimeConnections, method: str, target: str, headers: Iterable[tuple[str, str]], body: bytes,
          raw: bytes) -> bytes:
    # A client's header bytes were decoded as UTF-8 with surrogateescape: this gives back the same bytes. (The
    # proxy passes none this way: its lines come raw.)
    extra = ("".join([f"{name}: {value}\r\n" for name, value in headers]).encode("utf-8", "surrogateescape")
             if headers else b"")
    return b"%b %b HTTP/1.1\r\n%b%bContent-Length: %d\r\n%b\r\n" % (
        method.encode(), target.encode("utf-8", "surrogateescape"), runtime.host_line, extra, len(body), raw)


class _Exchange:
    """One request on a pooled connection (a class rather than a generator: it runs on every request)."""

    __slots__ = ("_body", "_connection", "_head", "_pool", "_runtime")

    def __init__(self, pool: UpstreamPool, runtime: _RuntimeConnections, head: bytes, body: bytes):
        self._pool, self._runtime, self._head, self._body = pool, runtime, head, body
        self._connection: _Connection | None = None

    async def __aenter__(self) -> Response:
        pool = self._pool
        self._connection = connection = await pool._acquire(self._runtime)
        pool._watch(connection)
        try:
            return await connection.send(self._head, self._body, pool.idle_timeout)
        except BaseException:  # also when cancelled: the runtime must not work for nobody
            self._connection = None
            pool._busy.discard(connection)
            pool._discard(connection)
            raise

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        connection = self._connection
        assert connection is not None
        self._connection = None
        self._pool._busy.discard(connection)
        if exc_type is None:
            self._pool._release(connection)
        else:
            self._pool._discard(connection)
