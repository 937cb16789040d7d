"""The hot path: a model request (``POST /v1/...``), from the front door (``wire.py``) to a runtime and back.

Top to bottom: the guard (``guard.py``: Host, Origin, keys) -> a route some runtime serves -> the body (read and
bounded by the front door) as JSON -> ``model`` -> resolve it -> ``controller.use`` admits the request or refuses it
(429, 503), before any header is sent -> the lease waits for the runtime (start or swap, shared; a streaming client
gets SSE comments meanwhile) -> rewrite ``model`` to what the runtime answers to -> forward with Content-Length over
the pool of keep-alive connections (``upstream.py``) -> stream the answer back chunk by chunk, rewriting ``model``
back to what the client asked. When the runtime turns out to be unreachable the lease hears of it (the controller
records a death once) and the request is tried once more, on whatever runtime comes next.

Work per request is kept to what the request needs: the desired state is looked at once (one stat of
models.json), the body is re-serialised only when a field must change (the served name, ``include_usage`` for a
stream, reasoning controls), in one ``json.dumps``, and streamed chunks are only scanned when they must be.

The common case takes a shorter way through the same steps (``Proxy.fast``): a model that serves now, a kept-alive
connection to it free and an answer not streamed are answered in the protocols' callbacks, from the front door's
parser to the runtime's and back, with no coroutine, task or future. Whatever else (a refusal, a start or a swap, a
stream, every connection busy) is declined before anything is counted or sent, and the coroutine path answers it;
a runtime that fails a request once sent is dealt with there too.

Errors are OpenAI error objects (Anthropic's on ``/v1/messages``). Before the answer has started they carry the
right status; after (a stream kept alive while its model loaded, or one the runtime had begun) they are sent as a
final SSE event and the stream ends: a second status line in the middle of a body would only corrupt it.

Every request that named a model is counted once, when it is over, by ``Tap.finish``; a client that went away
before the end of its answer is counted as 499, as llama-swap does.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

from athanor.controller.lease import Lease, Upstream
from athanor.errors import ModelUnavailable, QueueFull, ServingError
from athanor.ingress.errors import ANTHROPIC_PREFIX, anthropic_error, error_body, short
from athanor.ingress.requests import json_body, reasoning_changes, shape_problem, task_refusal
from athanor.ingress.tap import CLIENT_GONE, Tap
from athanor.ingress.upstream import (
    HOP_BY_HOP,
    Response,
    UpstreamClosed,
    UpstreamDropped,
    UpstreamError,
    UpstreamPool,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from athanor.ingress.wire import ClientExchange, Request
from athanor.runtimes.launch import RUNTIMES
from athanor.runtimes.routes import ALL_ROUTES, USAGE_ROUTES

if TYPE_CHECKING:
    from athanor.controller.controller import Controller
    from athanor.ingress.guard import Guard
    from athanor.ingress.upstream import _Connection
    from athanor.metrics import Metrics
    from athanor.telemetry.recorder import Recorder

_monotonic: Final = time.monotonic  # compiled, a C static: ``time.monotonic`` is a module lookup per call

log = logging.getLogger("athanor.ingress")

KEEPALIVE_S: Final = 3.0  # an SSE comment this often to a streaming client while its model loads
# Forwarded as they came, except what the gateway sets itself (framing, the runtime's address, the body type),
# Expect (the gateway already answered it; a runtime's 100 Continue would only precede the real answer) and
# Accept-Encoding (a compressed answer could not have its model id rewritten, and loopback needs no compression).
# The client's credentials stop here too (the gateway's key never reaches a runtime), and so does its Origin (the
# gateway has judged it); the runtime gets the gateway's per-start secret instead (runtimes/secret.py).
REQUEST_SKIP_BYTES: Final = HOP_BY_HOP | {b"content-type", b"expect", b"accept-encoding", b"authorization",
                                          b"x-api-key", b"origin"}
JSON_BODY: Final = ("Content-Type", "application/json")
SSE_HEADERS: Final = [("Content-Type", "text/event-stream"), ("Cache-Control", "no-cache"),
                      ("X-Accel-Buffering", "no")]


class Proxy:
    """The front door's handler for ``POST /v1/...`` (``wire.Front``'s ``hot``)."""

    def __init__(self, controller: Controller, pool: UpstreamPool, guard: Guard, metrics: Metrics):
        self.controller, self.pool, self.guard, self.metrics = controller, pool, guard, metrics
        self.telemetry: Recorder | None = None  # the daemon's per-request records (daemon.py)
        self._runtime_lines: tuple[Upstream, bytes] | None = None  # _lines_for's last answer
        self._admitted: tuple[dict[str, Any], str, str, tuple[Any, ...] | None, dict[str, Any]] | None = None

    async def __call__(self, request: ClientExchange) -> None:
        arrived = _monotonic()
        try:
            payload, requested, name = self._named(request)
        except _Refused as refused:
            await request.error(*refused.args, headers=refused.headers)
            return
        route, body = request.path, request.body
        tap = Tap(self.metrics, name, route, arrived, self.telemetry)
        status = 0  # none yet: a handler cancelled because its client left has no answer of its own to count
        try:
            status = await self._for_model(request, name, requested, route, payload, body, tap)
        except Exception:  # noqa: BLE001 - a bug must still answer in the format clients parse
            log.exception("unexpected error serving %s %s", request.method, request.path)
            status = 500  # counted as the gateway's error, whatever reached the client
            with contextlib.suppress(ConnectionError):  # the client may have gone meanwhile
                await _failed(request, 500, "internal error in the gateway (see its log)", "internal_error")
        finally:
            if not status:
                status = request.status or CLIENT_GONE
            tap.finish(status, client_gone=request.client_gone and not tap.stream_ended())

    def _named(self, request: ClientExchange) -> tuple[dict[str, Any], str, str]:
        """The request's JSON body, the model it asks for, and that model's name; raises _Refused with the answer
        to a request refused before any model is known (not counted against a model)."""
        controller = self.controller
        # The desired state as the front door saw it when the headers arrived (its one stat of models.json for
        # this request, for the body limit): not looked at again.
        gateway = controller.gateway(refresh=False)
        refused = self.guard.refusal(request, self.guard.policy(gateway), gateway["auth"])
        if refused is not None:
            status, message = refused
            if status == 401:
                raise _Refused(401, message, "invalid_api_key", headers=[("WWW-Authenticate", "Bearer")])
            raise _Refused(status, message, "forbidden")
        route = request.path
        if route not in ALL_ROUTES:
            raise _Refused(404, f"no route {short(route)}: the gateway serves {', '.join(sorted(ALL_ROUTES))}",
                           "unknown_route")
        body = request.body
        try:
            payload = json_body(body) if body else None  # UTF-8, as OpenAI clients send; skips detection
        except (UnicodeDecodeError, ValueError) as exc:
            raise _Refused(400, f"request body is not valid JSON: {exc}", "invalid_json") from None
        except RecursionError:
            raise _Refused(400, "request body is not valid JSON: nested too deeply", "invalid_json") from None
        requested = payload.get("model") if isinstance(payload, dict) else None
        if not isinstance(requested, str) or not requested:
            raise _Refused(400, "the request needs a 'model' field naming a model", "missing_model", "model")
        name = controller.resolve(requested, refresh=False)
        if name is None:
            raise _Refused(404, f"model {short(requested)} not found; GET /v1/models lists them", "model_not_found",
                           "model")
        assert isinstance(payload, dict)
        return payload, requested, name

    def _refusal(self, name: str, route: str, payload: dict[str, Any], tap: Tap
                 ) -> tuple[tuple[Any, ...] | None, dict[str, Any]]:
        """What the model cannot be asked, as (status, message, code[, param]), and otherwise the changes the
        request needs (reasoning controls); sets the tap's runtime."""
        obj = self.controller.model(name)
        assert obj is not None  # resolved just now
        admitted = self._admitted
        if admitted is None or admitted[0] is not obj or admitted[1] != route:
            admitted = self._admitted = (obj, route, *_route_refusal(name, route, obj))
        _, _, runtime, refusal, metadata = admitted
        tap.runtime = runtime
        if refusal is not None:
            return refusal, {}
        changes, problem = reasoning_changes(name, route, runtime, metadata, payload)
        if problem:
            return (400, problem, "unsupported_reasoning", "reasoning_effort"), {}
        shape = shape_problem(route, payload)
        if shape:
            return (400, shape[0], "invalid_type", shape[1]), {}
        return None, changes or {}

    async def _for_model(self, request: ClientExchange, name: str, requested: str, route: str, payload: dict[str, Any],
                         body: bytes, tap: Tap) -> int:
        """Everything after the model is known (and every answer from here on is counted against it): what it
        cannot be asked is refused, then it is leased and served. Returns the status answered."""
        refusal, changes = self._refusal(name, route, payload, tap)
        if refusal is not None:
            return await _error(request, *refusal)
        try:
            lease = self.controller.use(name)
        except ServingError as exc:
            return await _error(request, *serving_status(exc))
        async with lease:
            return await self._serve(request, lease, name, requested, payload, body, changes, tap)

    def fast(self, request: Request) -> Callable[[], None] | None:
        """The common case answered in the protocols' callbacks, with no coroutine, task or future: a model that
        serves now, a kept-alive connection to it free, an answer not streamed (the front door offers every
        ``POST /v1/...`` that arrives on an idle connection). Anything else, a refusal, a start or a swap, a
        stream, every connection busy, is declined before anything is counted or sent, and the coroutine path
        answers it from the start; a failure once sent continues there (``_Quick._recover``). Returns what to
        call if the client goes away meanwhile. The two paths share every step but the waiting (README: "The hot
        path")."""
        arrived = _monotonic()
        try:
            payload, requested, name = self._named(request)
        except _Refused:
            return None
        if payload.get("stream") is True:
            return None
        route = request.path
        tap = Tap(self.metrics, name, route, arrived, self.telemetry)
        refusal, changes = self._refusal(name, route, payload, tap)
        if refusal is not None:
            return None
        lease = self.controller.use_now(name)
        if lease is None:
            return None
        upstream = lease.upstream
        assert upstream is not None
        body, raw, model_id = self._outgoing(request, upstream, requested, payload, request.body, changes, tap)
        taken = self.pool.take_idle(upstream.port, "POST", request.target, (), body, raw=raw,
                                    limit=upstream.max_connections, incarnation=upstream.incarnation,
                                    host=upstream.host, socket=upstream.socket)
        if taken is None:
            lease.release()
            return None
        connection, head = taken
        quick = _Quick(self, request, lease, upstream, tap, model_id, connection,
                       (name, requested, payload, changes))
        connection.send_now(head, body, self.pool.idle_timeout, quick.answered)
        return quick.client_gone

    async def _serve(self, request: ClientExchange, lease: Lease, name: str, requested: str, payload: dict[str, Any],
                     body: bytes, changes: dict[str, Any], tap: Tap, attempts: tuple[int, ...] = (1, 2)) -> int:
        """Wait for the runtime, forward, and try once more if it turned out to be gone before it got the request."""
        try:
            if payload.get("stream") is True and not lease.ready:
                await _start_sse(request, 200)
            for attempt in attempts:
                upstream = await _acquire(lease, request, name)
                try:
                    return await self._forward(request, lease, upstream, requested, payload, body, changes, tap)
                except UpstreamUnreachable as unreachable:
                    # Nothing reached the runtime: it died since it was last seen. The lease reports it (a death is
                    # recorded once) and the second try gets whatever runtime comes next, a restarted one if need be.
                    await lease.runtime_died()
                    if attempt == 2:
                        return await _failed(request, 502, f"runtime for {name!r} is not reachable: {unreachable}",
                                             "upstream_failed")
                except UpstreamDropped as dropped:  # a kept-alive connection the runtime, alive, dropped: sent again
                    if attempt == 2:
                        return await _failed(request, 502, f"runtime for {name!r} failed mid-request: {dropped}",
                                             "upstream_failed")
        except ServingError as unavailable:
            return await _failed(request, *serving_status(unavailable))
        except ConnectionResetError:
            return request.status  # the client went away while being kept alive
        raise AssertionError("unreachable")

    def _outgoing(self, request: ClientExchange, upstream: Upstream, requested: str, payload: dict[str, Any],
                  body: bytes, changes: dict[str, Any], tap: Tap) -> tuple[bytes, bytes, ModelIdRewrite | None]:
        """What goes to the runtime: (body, its header lines: the runtime's own and the client's passed on, the
        model id's rewrite for the answer, if the runtime answers to another name)."""
        model_id = None
        if upstream.served_model != requested:
            changes = {**changes, "model": upstream.served_model}
            model_id = model_id_rewrite(upstream.served_model, requested)
        if payload.get("stream") is True and request.path in USAGE_ROUTES:
            options = payload.get("stream_options")
            if not (isinstance(options, dict) and options.get("include_usage")):
                changes = {**changes, "stream_options": {**(options if isinstance(options, dict) else {}),
                                                         "include_usage": True}}
                tap.drop_usage = True
        if changes:  # one serialisation, whatever changed (a change to None drops the field)
            merged = {**payload, **changes}
            for key in [k for k, v in changes.items() if v is None]:
                del merged[key]
            body = json.dumps(merged).encode()
        return body, self._lines_for(upstream) + request.forward, model_id

    def _lines_for(self, upstream: Upstream) -> bytes:
        """The header lines every request to ``upstream`` carries, its body's type and the runtime's per-start
        secret, encoded once per runtime incarnation (``lease.upstream_of`` keeps one Upstream for it)."""
        cached = self._runtime_lines
        if cached is None or cached[0] is not upstream:
            lines = "".join([f"{name}: {value}\r\n" for name, value in
                             ([JSON_BODY, ("Authorization", f"Bearer {upstream.secret}")] if upstream.secret
                              else [JSON_BODY])])
            cached = self._runtime_lines = (upstream, lines.encode())
        return cached[1]

    async def _forward(self, request: ClientExchange, lease: Lease, upstream: Upstream, requested: str,
                       payload: dict[str, Any], body: bytes, changes: dict[str, Any], tap: Tap) -> int:
        body, raw, model_id = self._outgoing(request, upstream, requested, payload, body, changes, tap)
        try:
            async with self.pool.request(upstream.port, "POST", request.target, (), body, raw=raw,
                                         limit=upstream.max_connections, incarnation=upstream.incarnation,
                                         host=upstream.host, socket=upstream.socket) as resp:
                lease.answered(resp.status)
                is_sse = "text/event-stream" in resp.content_type
                if not request.started and not is_sse:
                    answer = _whole_answer(resp, await resp.read(), model_id, tap)
                    lease.used(tap.slot_tokens())
                    await request.respond(resp.status, (), answer, resp.passed_on)
                    return resp.status
                if not is_sse:  # headers already sent: an error becomes an SSE event
                    await request.write(b"data: " + await resp.read() + b"\n\n")
                    await request.end()
                    return request.status
                if not request.started:
                    await _start_sse(request, resp.status)
                await _pump(resp, request, model_id, tap)
                if resp.close_delimited and not tap.stream_ended() and await lease.runtime_died():
                    # A body that ends with the connection cannot tell a finished stream from a dead runtime.
                    raise UpstreamClosed("the runtime exited during the stream")
                lease.used(tap.slot_tokens())
                await request.end()
                return request.status
        except UpstreamUnreachable:
            raise  # nothing was sent: the caller may retry
        except UpstreamError as exc:
            return await self._upstream_failed(request, lease, upstream, exc)
        except ConnectionResetError:
            # The client went away: leaving the block above closed the upstream connection, so the runtime stops
            # generating for it and the slot is freed.
            return request.status

    async def _upstream_failed(self, request: ClientExchange, lease: Lease, upstream: Upstream,
                               exc: UpstreamError) -> int:
        """The answer to a request whose runtime failed it once sent; raises UpstreamDropped when it may be sent
        again (a kept-alive connection the runtime, alive, dropped as the request went out)."""
        if isinstance(exc, UpstreamDropped):
            dead = await lease.runtime_died()
            if exc.reused and not dead:
                log.info("runtime for %r dropped a kept-alive connection as a request went out; sending it again",
                         upstream.name)
                self.pool.drop_idle(upstream.port, upstream.host)  # as old as that one: the retry opens a fresh one
                raise exc  # it did not die of the request: the caller sends it again
            status, message = 502, f"runtime for {upstream.name!r} failed mid-request: {exc}"
        elif isinstance(exc, UpstreamTimeout):
            status, message = 504, f"runtime for {upstream.name!r} stopped answering: {exc}"
        else:
            await lease.runtime_died()  # a death is recorded once, however many requests it broke
            status, message = 502, f"runtime for {upstream.name!r} failed mid-request: {exc}"
        log.warning(message)
        return await _failed(request, status, message, "upstream_failed")


def _route_refusal(name: str, route: str, obj: dict[str, Any]) -> tuple[str, tuple[Any, ...] | None, dict[str, Any]]:
    """(runtime, what the model cannot be asked on ``route`` whatever the body says, as (status, message, code[,
    param]) or None, its metadata): the same for every request until its stored object changes, so ``_refusal``
    keeps the last answer with the object it came from."""
    runtime = obj["spec"]["runtime"]
    artifact = obj.get("artifact") or {}
    metadata, capabilities = artifact.get("metadata"), artifact.get("capabilities")
    metadata = metadata if isinstance(metadata, dict) else {}  # discovery writes these; a hand edit may not have
    if route not in RUNTIMES[runtime].routes:
        return runtime, (404, f"model {name!r} runs on {runtime}, which does not serve {route} (it serves "
                         f"{', '.join(sorted(RUNTIMES[runtime].routes))})", "unsupported_route"), metadata
    refusal = task_refusal(name, route, capabilities if isinstance(capabilities, list) else [])
    if refusal:
        return runtime, (400, refusal, "unsupported_model_task", "model"), metadata
    return runtime, None, metadata


class _Refused(Exception):
    """A request refused before its model is known: ``args`` are ``Request.error``'s."""

    def __init__(self, status: int, message: str, code: str, param: str | None = None,
                 headers: list[tuple[str, str]] | None = None):
        super().__init__(status, message, code, param)
        self.headers = headers


class _Quick:
    """One request of the fast path (``Proxy.fast``), from the runtime's complete answer to the client's."""

    __slots__ = ("_connection", "_lease", "_model_id", "_over", "_proxy", "_recovering", "_request", "_tap",
                 "_upstream", "_why")

    def __init__(self, proxy: Proxy, request: Request, lease: Lease, upstream: Upstream, tap: Tap,
                 model_id: ModelIdRewrite | None, connection: _Connection,
                 why: tuple[str, str, dict[str, Any], dict[str, Any]]):
        self._proxy, self._request, self._lease, self._upstream, self._tap = proxy, request, lease, upstream, tap
        self._model_id, self._connection = model_id, connection
        self._why = why  # name, requested, payload, changes: what the coroutine path needs to send it again
        self._over = False
        self._recovering: asyncio.Task[None] | None = None

    def answered(self, connection: _Connection) -> None:
        """The runtime's answer is complete, or failed (the connection's callbacks call this)."""
        if self._over:
            return
        proxy, request = self._proxy, self._request
        error, response = connection.error, connection.response
        if error is not None or response is None:
            proxy.pool.finish_now(connection)  # closed
            self._recovering = asyncio.ensure_future(self._recover(error or UpstreamClosed("no answer")))
            return
        data = b"".join(connection.take_all())
        tap, model_id, status = self._tap, self._model_id, response.status
        if "text/event-stream" in response.content_type:  # a stream nobody asked for: passed on whole
            tap.first_byte()
            request.respond_now(status, SSE_HEADERS[:1], _passed_on(data, model_id, tap))
        else:
            request.respond_now(status, (), model_id.apply(data) if model_id is not None else data,
                                response.passed_on)
            if status == 200:
                tap.read_usage(data)
        # The rest is bookkeeping, done once the client has its answer: the next request it sends comes sooner.
        proxy.pool.finish_now(connection)  # back to the pool (a waiter may be handed it)
        lease = self._lease
        lease.answered(status)
        lease.used(tap.slot_tokens())
        self._end(status, client_gone=False)

    def client_gone(self) -> None:
        """The client went away before its answer: the runtime's connection closes, so it stops working for
        nobody (``Connection.connection_lost`` calls this)."""
        if self._over:
            return
        if self._recovering is not None:
            self._recovering.cancel()  # its own ending counts the request
            return
        self._proxy.pool.finish_now(self._connection)  # not complete: closed
        self._end(self._request.status or CLIENT_GONE, client_gone=True)

    def _end(self, status: int, *, client_gone: bool) -> None:
        self._over = True
        self._lease.release()
        self._tap.finish(status, client_gone=client_gone)
        if not client_gone:
            self._request.connection.fast_done(self._request)

    async def _recover(self, error: UpstreamError) -> None:
        """The runtime failed the request once sent: what the coroutine path does then, in a coroutine."""
        proxy, request, lease, tap = self._proxy, self._request, self._lease, self._tap
        name, requested, payload, changes = self._why
        status = 0
        try:
            try:
                status = await proxy._upstream_failed(request, lease, self._upstream, error)
            except UpstreamDropped:  # the coroutine path's second try
                status = await proxy._serve(request, lease, name, requested, payload, request.body, changes, tap,
                                            attempts=(2,))
        except Exception:  # noqa: BLE001 - as in Proxy.__call__
            log.exception("unexpected error serving %s %s", request.method, request.path)
            status = 500
            with contextlib.suppress(ConnectionError):
                await _failed(request, 500, "internal error in the gateway (see its log)", "internal_error")
        finally:
            if not status:
                status = request.status or CLIENT_GONE
            self._over = True
            lease.release()
            tap.finish(status, client_gone=request.client_gone and not tap.stream_ended())
            if not request.client_gone:
                request.connection.fast_done(request)


def _whole_answer(response: Response, data: bytes, model_id: ModelIdRewrite | None, tap: Tap) -> bytes:
    """A whole (not streamed) answer as the client gets it: its usage counted, the model id rewritten."""
    if response.status == 200:
        tap.read_usage(data)
    return model_id.apply(data) if model_id is not None else data


async def _acquire(lease: Lease, request: ClientExchange, name: str) -> Upstream:
    """``lease.acquire()``; a streaming client whose headers are out gets an SSE comment every few seconds
    meanwhile, so it and any proxy in between do not time out."""
    if not request.started or lease.ready:
        return await lease.acquire()
    started = _monotonic()
    ready = asyncio.ensure_future(lease.acquire())
    try:
        while True:
            done, _ = await asyncio.wait({ready}, timeout=KEEPALIVE_S)
            if done:
                return ready.result()
            await request.write(f": loading {name}, {_monotonic() - started:.0f} s\n\n".encode())
    finally:
        if not ready.done():
            ready.cancel()


def serving_status(exc: ServingError) -> tuple[int, str, str]:
    """(status, message, code) of a request ``controller.use`` refused or a lease could not serve."""
    if isinstance(exc, QueueFull):
        return 429, str(exc), "queue_full"
    assert isinstance(exc, ModelUnavailable)
    return 503, str(exc), "model_unavailable"


async def _error(request: ClientExchange, status: int, message: str, code: str, param: str | None = None) -> int:
    await request.error(status, message, code, param)
    return status


async def _failed(request: ClientExchange, status: int, message: str, code: str) -> int:
    """An error as the answer, or as the last SSE event of a stream whose head is out."""
    if not request.started:
        return await _error(request, status, message, code)
    if request.path.startswith(ANTHROPIC_PREFIX):
        await request.write(b"event: error\ndata: " + json.dumps(anthropic_error(status, message)).encode() + b"\n\n")
    else:
        await request.write(b"data: " + json.dumps(error_body(status, message, code)).encode() + b"\n\n")
    await request.end()
    return request.status


async def _start_sse(request: ClientExchange, status: int) -> None:
    await request.start(status, SSE_HEADERS)


async def _pump(resp: Response, request: ClientExchange, model_id: ModelIdRewrite | None, tap: Tap) -> None:
    """Copy the upstream stream as it arrives (``_Relay``, in the connection's callbacks); the last bytes written
    are left in ``tap.tail``."""
    relay = _Relay(request, model_id, tap)
    await resp.relay(relay, request.drain)
    if relay.carry:
        await _write_lines(request, relay.carry, model_id, tap)


class _Relay:
    """A stream's events from the runtime's connection to the client's, whole lines at a time (so a model id or a
    usage object split across two chunks is still found). Called by the connection for each chunk: returns
    whether the client can take more now."""

    __slots__ = ("carry", "first", "model_id", "request", "tap")

    def __init__(self, request: ClientExchange, model_id: ModelIdRewrite | None, tap: Tap):
        self.request, self.model_id, self.tap = request, model_id, tap
        self.carry = b""  # the start of a line whose end has not come yet
        self.first = True

    def __call__(self, chunk: bytes) -> bool:
        tap = self.tap
        if self.first:
            tap.first_byte()
            self.first = False
        data = self.carry + chunk if self.carry else chunk
        if data.endswith(b"\n"):  # whole events, as a runtime sends them: no search (a compiled primitive)
            self.carry = b""
        else:
            cut = data.rfind(b"\n") + 1
            self.carry = data[cut:]
            if not cut:
                return True
            data = data[:cut]
        lines = _passed_on(data, self.model_id, tap)
        if not lines:
            return True
        tap.tail = lines
        return self.request.write_now(lines)


async def _write_lines(request: ClientExchange, lines: bytes, model_id: ModelIdRewrite | None, tap: Tap) -> None:
    lines = _passed_on(lines, model_id, tap)
    if lines:
        tap.tail = lines
        await request.write(lines)


def _passed_on(lines: bytes, model_id: ModelIdRewrite | None, tap: Tap) -> bytes:
    """SSE lines as the client gets them: usage counted (and the usage-only event it did not ask for cut), the
    model id rewritten."""
    if tap.skip_blank or b'"usage"' in lines:
        lines = tap.usage_lines(lines)
    return model_id.apply(lines) if model_id is not None else lines


class ModelIdRewrite:
    """The model id in an answer, from what the runtime answers to back to what the client asked for.

    Only the value of a ``"model"`` key changes, never text that happens to spell the same name (a model called
    ``yes`` may well answer "yes"). Valid JSON cannot hold an unescaped quote inside a string, so an occurrence of
    the served name as a JSON string right after ``"model":`` is that key's value: a scan of the raw bytes finds
    exactly those, without parsing the body (an embedding answer can be megabytes). It finds them at any depth,
    which the Responses and Anthropic streams need (their model sits in a nested ``response`` or ``message``).
    """

    __slots__ = ("_requested", "_served")

    def __init__(self, served: str, requested: str):
        self._served = json.dumps(served).encode()
        self._requested = json.dumps(requested).encode()

    def apply(self, data: bytes) -> bytes:
        served = self._served
        at = data.find(served)
        if at < 0:
            return data  # a streamed chunk without the id (the usual one): untouched, nothing allocated
        size = len(served)
        parts: list[bytes] = []
        start = 0
        while at >= 0:
            if _after_model_key(data, at):
                parts.append(data[start:at])
                parts.append(self._requested)
                start = at + size
            at = data.find(served, at + size)
        if not start:
            return data
        parts.append(data[start:])
        return b"".join(parts)


def _after_model_key(data: bytes, at: int) -> bool:
    """Whether ``data[at:]`` is the value of a ``"model"`` key: ``"model"``, a colon, whitespace around it. The
    two spellings runtimes send (llama-server's compact JSON, Python's ``": "``) are checked first, cheaply."""
    if data[at - 8:at] == b'"model":' or data[at - 9:at] == b'"model": ':
        return True
    before = data[max(at - 32, 0):at].rstrip()
    return before.endswith(b":") and before[:-1].rstrip().endswith(b'"model"')


@functools.lru_cache(maxsize=256)
def model_id_rewrite(served: str, requested: str) -> ModelIdRewrite:
    """One per (served name, requested name) pair, built once: requests by alias are the common case."""
    return ModelIdRewrite(served, requested)
