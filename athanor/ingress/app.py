"""The ingress: one OpenAI-compatible port in front of every model.

The request path, top to bottom: the guard (``guard.py``: Host, Origin) -> a route some runtime serves -> read the
body (bounded) -> find ``model`` -> resolve it -> ``controller.use`` admits the request or refuses it (429, 503),
before any header is sent -> the lease waits for the runtime (start or swap, shared; a streaming client gets SSE
comments meanwhile) -> rewrite ``model`` to what the runtime answers to -> forward with Content-Length over the
pool of keep-alive connections (``upstream.py``) -> stream the answer back chunk by chunk, rewriting ``model``
back to what the client asked. When the runtime turns out to be unreachable the lease hears of it (the
controller records a death once) and the request is tried once more, on whatever runtime comes next.
Bodies are re-serialised only when the model name must change, and streamed chunks are only scanned when it must.

Errors are OpenAI error objects. Before the response has started they carry the right status; after (a stream
that was kept alive while its model loaded, or one the runtime had begun) they are sent as a final SSE event and
the stream ends: a second status line in the middle of a body would only corrupt it.

Every request that named a model is counted once, when it is over, by ``Tap.finish``; a client that went away
before the end of its answer is counted as 499, as llama-swap does.
"""

from __future__ import annotations

import asyncio
import calendar
import contextlib
import functools
import json
import logging
import time
from typing import Any

from aiohttp import HttpVersion11, web
from multidict import CIMultiDict

from athanor import views
from athanor.controller.controller import Controller
from athanor.controller.instance import Phase
from athanor.controller.lease import Lease, Upstream
from athanor.errors import ModelUnavailable, QueueFull, ServingError
from athanor.ingress.guard import Guard
from athanor.ingress.limits import Limits
from athanor.ingress.requests import reasoning_changes, task_refusal
from athanor.ingress.tap import CLIENT_GONE, Tap
from athanor.metrics import Metrics
from athanor.ingress.upstream import (
    Response,
    UpstreamClosed,
    UpstreamError,
    UpstreamPool,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from athanor.runtimes.launch import RUNTIMES
from athanor.runtimes.routes import ALL_ROUTES, USAGE_ROUTES
from athanor.telemetry.recorder import Recorder

log = logging.getLogger("athanor.ingress")

KEEPALIVE_S = 3.0
MAX_ECHO = 64  # characters of a client's value repeated in an error message
HOP_BY_HOP = frozenset(
    h.lower() for h in ("Connection", "Keep-Alive", "Proxy-Authenticate", "Proxy-Authorization", "TE", "Trailer",
                        "Transfer-Encoding", "Upgrade", "Host", "Content-Length")
)
# Forwarded as they came, except what the gateway sets itself (framing, the runtime's address, the body type),
# Expect (the gateway already answered it; a runtime's 100 Continue would only precede the real answer) and
# Accept-Encoding (a compressed answer could not have its model id rewritten, and loopback needs no compression).
# The client's credentials stop here too (the gateway's key never reaches a runtime), and so does its Origin (the
# gateway has judged it); the runtime gets the gateway's per-start secret instead (runtimes/secret.py).
REQUEST_SKIP = HOP_BY_HOP | {"content-type", "expect", "accept-encoding", "authorization", "x-api-key", "origin"}
CONTROLLER: web.AppKey[Controller] = web.AppKey("controller", Controller)
POOL: web.AppKey[UpstreamPool] = web.AppKey("pool", UpstreamPool)
LIMITS: web.AppKey[Limits] = web.AppKey("limits", Limits)
GUARD: web.AppKey[Guard] = web.AppKey("guard", Guard)
METRICS: web.AppKey[Metrics] = web.AppKey("metrics", Metrics)
TELEMETRY: web.AppKey[Recorder] = web.AppKey("telemetry", Recorder)  # set by the daemon (daemon.py)


def error_body(status: int, message: str, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    if status == 429:
        kind = "rate_limit_error"
    elif status == 403:
        kind = "permission_error"
    elif status == 401:
        kind = "authentication_error"
    elif status < 500:
        kind = "invalid_request_error"
    else:
        kind = "service_unavailable" if status == 503 else "server_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(status: int, message: str, code: str | None = None, param: str | None = None,
                   headers: dict[str, str] | None = None) -> web.Response:
    body = error_body(status, message, code, param)
    response = web.json_response(body, status=status, headers=headers)
    response[GATEWAY_ERROR] = body["error"]  # the middleware re-shapes it for Anthropic's routes
    return response


ANTHROPIC_PREFIX = "/v1/messages"
GATEWAY_ERROR: web.ResponseKey[dict[str, Any]] = web.ResponseKey("athanor.error", dict)
ANTHROPIC_STREAM: web.ResponseKey[bool] = web.ResponseKey("athanor.anthropic", bool)
STARTED: web.RequestKey[web.StreamResponse] = web.RequestKey("athanor.started", web.StreamResponse)
_ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                    404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
                    503: "overloaded_error"}


def anthropic_error(status: int, message: str) -> dict[str, Any]:
    """An error as Anthropic's Messages API shapes it, for clients of ``/v1/messages``."""
    kind = _ANTHROPIC_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": kind, "message": message}}


def _in_callers_format(request: web.Request, response: web.StreamResponse) -> web.StreamResponse:
    """The gateway's own errors in the format of the API the client called (the runtimes' pass as they are)."""
    error = response.get(GATEWAY_ERROR)
    if error is None or not request.path.startswith(ANTHROPIC_PREFIX):
        return response
    headers = {k: v for k, v in response.headers.items() if k.lower() in ("allow", "www-authenticate")}
    return web.json_response(anthropic_error(response.status, error["message"]), status=response.status,
                             headers=headers)


def short(value: str) -> str:
    """A client's value for an error message: quoted, escaped, and cut to a readable length."""
    return repr(value if len(value) <= MAX_ECHO else value[:MAX_ECHO] + "...")


@web.middleware
async def guard_and_errors(request: web.Request, handler: Any) -> web.StreamResponse:
    """Refuse foreign hosts and cross-site pages first; then every error, aiohttp's own HTTP errors (413, 404,
    405) and unexpected ones alike, leaves as an OpenAI error object."""
    refused = _refusal(request)
    if refused is not None:
        return _in_callers_format(request, refused)
    try:
        return _in_callers_format(request, await handler(request))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        started = request.get(STARTED)
        if started is not None:
            log.error("error %d after the answer to %s %s began: %s", exc.status, request.method, request.path, exc)
            return await _end_started(request, started, exc.status, exc.reason, None)
        return _in_callers_format(request, _http_error(request, exc))
    except Exception:  # noqa: BLE001 - a bug must still answer in the format clients parse
        log.exception("unexpected error serving %s %s", request.method, request.path)
        message = "internal error in the gateway (see its log)"
        started = request.get(STARTED)
        if started is not None:
            return await _end_started(request, started, 500, message, "internal_error")
        return _in_callers_format(request, error_response(500, message, "internal_error"))


async def _end_started(request: web.Request, response: web.StreamResponse, status: int, message: str,
                       code: str | None) -> web.StreamResponse:
    """An error after the headers went out: an event stream ends with an error event (in the shape of the API
    called); any other stream is cut, so its client sees a broken body rather than a complete one. The response
    goes back to aiohttp as it is: already prepared, it sends nothing more (no second status line)."""
    if response.content_type != "text/event-stream":
        if request.transport is not None:
            request.transport.close()
        return response
    # ConnectionError: the client went away meanwhile. RuntimeError: the stream had already ended.
    with contextlib.suppress(ConnectionError, RuntimeError):
        await _failed(response, status, message, code or "internal_error")
    return response


def _http_error(request: web.Request, exc: web.HTTPException) -> web.Response:
    """aiohttp's own HTTP errors (413, 404, 405) as error objects."""
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        limit = request.app[LIMITS].max_body
        return error_response(413, f"request body larger than the gateway's limit of {limit} bytes",
                              "request_too_large")
    allow = exc.headers.get("Allow")
    return error_response(exc.status, exc.reason, None, headers={"Allow": allow} if allow else None)


def _refusal(request: web.Request) -> web.Response | None:
    guard = request.app[GUARD]
    gateway = request.app[CONTROLLER].gateway()
    refused = guard.refusal(request, guard.policy(gateway), gateway["auth"])
    if refused is None:
        return None
    if refused[0] == 401:
        return error_response(401, refused[1], "invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
    return error_response(refused[0], refused[1], "forbidden")


async def expect_continue(request: web.Request) -> web.Response | None:
    """``Expect: 100-continue``: answer a body that is refused anyway (a foreign host, too large) before the
    client sends it, instead of taking it in and refusing it after."""
    refused = _refusal(request)
    if refused is not None:
        return refused
    if request.headers.get("Expect", "").lower() != "100-continue":
        return error_response(417, f"unsupported Expect: {short(request.headers['Expect'])}", "expectation_failed")
    limit = request.app[LIMITS].follow()  # before the middlewares: the limit as it is now, read here too
    if request.content_length is not None and request.content_length > limit:
        return error_response(413, f"request body larger than the gateway's limit of {limit} bytes",
                              "request_too_large")
    if request.version == HttpVersion11:  # an HTTP/1.0 client does not wait for it
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # the interim answer is not part of the response
    return None


async def on_prepare(request: web.Request, response: web.StreamResponse) -> None:
    """Every answer as its headers go out. It is remembered (``STARTED``), so an error after this point ends it
    instead of starting a second one; and it gets CORS headers exactly when the Gateway allows the origin."""
    request[STARTED] = response
    if "Origin" in request.headers:
        guard = request.app[GUARD]
        response.headers.update(guard.cors_headers(request, guard.policy(request.app[CONTROLLER].gateway())))


async def preflight(request: web.Request) -> web.Response:
    guard = request.app[GUARD]
    status, headers, problem = guard.preflight(request, guard.policy(request.app[CONTROLLER].gateway()))
    if problem:
        return error_response(status, problem, "cors_refused", headers=headers)
    return web.Response(status=status, headers=headers)


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def _created(timestamp: str | None) -> int:
    """Unix time of a stored UTC timestamp (``time.mktime`` would read it as local time)."""
    try:
        return calendar.timegm(time.strptime(timestamp, "%Y-%m-%dT%H:%M:%SZ")) if timestamp else 0
    except (TypeError, ValueError):
        return 0


def _model_entry(controller: Controller, name: str, obj: dict[str, Any]) -> dict[str, Any]:
    inst = controller.instances.get(name)
    artifact = obj.get("artifact") or {}
    return {
        "id": name,
        "object": "model",
        "created": _created(obj["metadata"].get("creationTimestamp")),
        "owned_by": "athanor",
        "runtime": obj["spec"]["runtime"],
        "phase": inst.phase.value if inst else Phase.STANDBY.value,
        "aliases": obj["spec"].get("aliases", []),
        "context_length": artifact.get("metadata", {}).get("contextLength"),
        "capabilities": artifact.get("capabilities", []),
        "source": views.source_text(obj["spec"]["source"]),
    }


async def list_models(request: web.Request) -> web.Response:
    controller = request.app[CONTROLLER]
    models = controller.doc()["models"]
    data = [_model_entry(controller, n, o) for n, o in sorted(models.items())
            if o["spec"].get("residency") != "disabled" and o["spec"].get("publish", True)]
    return web.json_response({"object": "list", "data": data})


async def get_model(request: web.Request) -> web.Response:
    controller = request.app[CONTROLLER]
    requested = request.match_info["model"]
    name = controller.resolve(requested)
    if name is None:
        return error_response(404, f"model {short(requested)} not found", "model_not_found", "model")
    return web.json_response(_model_entry(controller, name, controller.doc()["models"][name]))


async def proxy(request: web.Request) -> web.StreamResponse:
    arrived = time.monotonic()
    controller = request.app[CONTROLLER]
    route = request.path
    if route not in ALL_ROUTES:
        return error_response(404, f"no route {short(route)}: the gateway serves {', '.join(sorted(ALL_ROUTES))}",
                              "unknown_route")
    body = await request.read()
    try:
        payload = json.loads(body.decode()) if body else None  # UTF-8, as OpenAI clients send; skips detection
    except (UnicodeDecodeError, ValueError) as exc:
        return error_response(400, f"request body is not valid JSON: {exc}", "invalid_json")
    except RecursionError:
        return error_response(400, "request body is not valid JSON: nested too deeply", "invalid_json")
    requested = payload.get("model") if isinstance(payload, dict) else None
    if not isinstance(requested, str) or not requested:
        return error_response(400, "the request needs a 'model' field naming a model", "missing_model", "model")
    name = controller.resolve(requested)
    if name is None:
        return error_response(404, f"model {short(requested)} not found; GET /v1/models lists them",
                              "model_not_found", "model")
    tap = Tap(request.app[METRICS], name, route, arrived, request.app.get(TELEMETRY))
    status = 0  # none yet: a handler cancelled because its client left has no answer of its own to count
    try:
        response = await _for_model(request, controller, name, requested, route, payload, body, tap)
        status = response.status
        return response
    except Exception:
        status = 500  # the error middleware answers it, or ends the stream it broke
        raise
    finally:
        if not status:
            started = request.get(STARTED)
            status = started.status if started is not None else CLIENT_GONE
        tap.finish(status, client_gone=_client_gone(request, tap))


def _client_gone(request: web.Request, tap: Tap) -> bool:
    """Whether the client went away before the end of its answer. A client may hang up as soon as it has read a
    stream's last event (the openai SDK does, at ``[DONE]``): that one had all of it."""
    transport = request.transport
    return (transport is None or transport.is_closing()) and not tap.stream_ended()


async def _for_model(request: web.Request, controller: Controller, name: str, requested: str, route: str,
                     payload: dict[str, Any], body: bytes, tap: Tap) -> web.StreamResponse:
    """Everything after the model is known (and every answer from here on is counted against it): what it
    cannot be asked is refused, then it is leased and served."""
    obj = controller.model(name)
    assert obj is not None  # resolved just now
    runtime = tap.runtime = obj["spec"]["runtime"]
    if route not in RUNTIMES[runtime].routes:
        return error_response(404, f"model {name!r} runs on {runtime}, which does not serve {route} (it serves "
                              f"{', '.join(sorted(RUNTIMES[runtime].routes))})", "unsupported_route")
    artifact = obj.get("artifact") or {}
    refusal = task_refusal(name, route, artifact.get("capabilities") or [])
    if refusal:
        return error_response(400, refusal, "unsupported_model_task", "model")
    changes, problem = reasoning_changes(name, route, runtime, artifact.get("metadata") or {}, payload)
    if problem:
        return error_response(400, problem, "unsupported_reasoning", "reasoning_effort")
    if changes:
        payload = {k: v for k, v in {**payload, **changes}.items() if v is not None}
        body = json.dumps(payload).encode()
    try:
        lease = controller.use(name)
    except ServingError as exc:
        return error_response(*_status(exc))
    async with lease:
        return await _serve(request, lease, name, requested, payload, body, tap)


async def _serve(
    request: web.Request, lease: Lease, name: str, requested: str, payload: dict[str, Any], body: bytes, tap: Tap
) -> web.StreamResponse:
    """Wait for the runtime, forward, and try once more if it turned out to be gone before it got the request."""
    response: web.StreamResponse | None = None
    try:
        if payload.get("stream") is True and not lease.ready:
            response = _sse_response(request)
            await response.prepare(request)
        for attempt in (1, 2):
            upstream = await _acquire(lease, response, name)
            try:
                return await _forward(request, lease, upstream, requested, payload, body, response, tap)
            except UpstreamUnreachable as exc:
                # Nothing reached the runtime: it died since it was last seen. The lease reports it (a death is
                # recorded once) and the second try gets whatever runtime comes next, a restarted one if need be.
                await lease.runtime_died()
                if attempt == 2:
                    return await _failed(response, 502, f"runtime for {name!r} is not reachable: {exc}",
                                         "upstream_failed")
    except ServingError as exc:
        return await _failed(response, *_status(exc))
    except ConnectionResetError:
        assert response is not None  # the client went away while being kept alive
        return response
    raise AssertionError("unreachable")


async def _acquire(lease: Lease, response: web.StreamResponse | None, name: str) -> Upstream:
    """``lease.acquire()``; a streaming client whose headers are out gets an SSE comment every few seconds
    meanwhile, so it and any proxy in between do not time out."""
    if response is None or lease.ready:
        return await lease.acquire()
    started = time.monotonic()
    ready = asyncio.ensure_future(lease.acquire())
    try:
        while True:
            done, _ = await asyncio.wait({ready}, timeout=KEEPALIVE_S)
            if done:
                return ready.result()
            await response.write(f": loading {name}, {time.monotonic() - started:.0f} s\n\n".encode())
    finally:
        if not ready.done():
            ready.cancel()


def _status(exc: ServingError) -> tuple[int, str, str]:
    if isinstance(exc, QueueFull):
        return 429, str(exc), "queue_full"
    assert isinstance(exc, ModelUnavailable)
    return 503, str(exc), "model_unavailable"


async def _failed(response: web.StreamResponse | None, status: int, message: str, code: str) -> web.StreamResponse:
    """An error as a response, or as the last SSE event of a stream whose headers are out."""
    if response is None:
        return error_response(status, message, code)
    if response.get(ANTHROPIC_STREAM):
        await response.write(b"event: error\ndata: " + json.dumps(anthropic_error(status, message)).encode() + b"\n\n")
    else:
        await response.write(b"data: " + json.dumps(error_body(status, message, code)).encode() + b"\n\n")
    await response.write_eof()
    return response


def _sse_response(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(status=200, headers={
        "Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    if request.path.startswith(ANTHROPIC_PREFIX):
        response[ANTHROPIC_STREAM] = True  # errors in this stream take Anthropic's shape
    return response


def _response_headers(headers: list[tuple[str, str]]) -> CIMultiDict[str]:
    """The runtime's headers a client may see: no framing (aiohttp sets its own) and no CORS (the gateway decides)."""
    return CIMultiDict((k, v) for k, v in headers
                       if k.lower() not in HOP_BY_HOP and not k.lower().startswith("access-control-"))


async def _forward(
    request: web.Request, lease: Lease, upstream: Upstream, requested: str, payload: dict[str, Any], body: bytes,
    started: web.StreamResponse | None, tap: Tap,
) -> web.StreamResponse:
    changes: dict[str, Any] = {}
    model_id = None
    if upstream.served_model != requested:
        changes["model"] = upstream.served_model
        model_id = model_id_rewrite(upstream.served_model, requested)
    if payload.get("stream") is True and request.path in USAGE_ROUTES:
        options = payload.get("stream_options")
        if not (isinstance(options, dict) and options.get("include_usage")):
            changes["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
            tap.drop_usage = True
    if changes:
        body = json.dumps({**payload, **changes}).encode()
    headers = [(k, v) for k, v in request.headers.items() if k.lower() not in REQUEST_SKIP]
    headers.append(("Content-Type", "application/json"))
    if upstream.secret:
        headers.append(("Authorization", f"Bearer {upstream.secret}"))
    response = started
    try:
        async with request.app[POOL].request(upstream.port, request.method, request.rel_url.path_qs, headers, body,
                                             limit=upstream.max_connections, incarnation=upstream.incarnation) as resp:
            lease.answered(resp.status)
            is_sse = "text/event-stream" in resp.content_type
            if response is None and not is_sse:
                data = await resp.read()
                if resp.status == 200:
                    tap.read_usage(data)
                if model_id is not None:
                    data = model_id.apply(data)
                return web.Response(body=data, status=resp.status, headers=_response_headers(resp.headers))
            if response is not None and not is_sse:  # headers already sent: an error becomes an SSE event
                await response.write(b"data: " + await resp.read() + b"\n\n")
                await response.write_eof()
                return response
            if response is None:
                response = _sse_response(request)
                response.set_status(resp.status)
                await response.prepare(request)
            await _pump(resp, response, model_id, tap)
            if resp.close_delimited and not tap.stream_ended() and await lease.runtime_died():
                # A body that ends with the connection cannot tell a finished stream from a dead runtime.
                raise UpstreamClosed("the runtime exited during the stream")
            await response.write_eof()
            return response
    except UpstreamUnreachable:
        raise  # nothing was sent: the caller may retry
    except UpstreamError as exc:
        if isinstance(exc, UpstreamTimeout):
            status, message = 504, f"runtime for {upstream.name!r} stopped answering: {exc}"
        else:
            await lease.runtime_died()  # a death is recorded once, however many requests it broke
            status, message = 502, f"runtime for {upstream.name!r} failed mid-request: {exc}"
        log.warning(message)
        return await _failed(response, status, message, "upstream_failed")
    except ConnectionResetError:
        # The client went away: leaving the block above closed the upstream connection, so the runtime stops
        # generating for it and the slot is freed.
        assert response is not None
        return response


async def _pump(resp: Response, response: web.StreamResponse, model_id: ModelIdRewrite | None, tap: Tap) -> None:
    """Copy the upstream stream as it arrives, whole lines at a time (so a model id or a usage object split
    across two chunks is still found); the last bytes written are left in ``tap.tail``."""
    carry = b""
    first = True
    async for chunk in resp.iter_chunks():
        if first:
            tap.first_byte()
            first = False
        data = carry + chunk if carry else chunk
        cut = data.rfind(b"\n") + 1
        carry = data[cut:]
        if cut:
            await _write_lines(response, data[:cut], model_id, tap)
    if carry:
        await _write_lines(response, carry, model_id, tap)


async def _write_lines(response: web.StreamResponse, lines: bytes, model_id: ModelIdRewrite | None, tap: Tap) -> None:
    if b'"usage"' in lines:
        lines = tap.usage_lines(lines)
    if model_id is not None:
        lines = model_id.apply(lines)
    if lines:
        tap.tail = lines
        await response.write(lines)


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


@web.middleware
async def follow_limits(request: web.Request, handler: Any) -> web.StreamResponse:
    """The Gateway's limits as they are when the request arrives (``limits.py``). aiohttp's body limit is its
    application's ``client_max_size``, set at start: after a change, the request goes on as a copy that carries
    the new one (outermost, so every middleware and the handler see the same request)."""
    limit = request.app[LIMITS].follow()
    if limit != request.client_max_size:
        request = request.clone(client_max_size=limit)
    return await handler(request)


def create_app(controller: Controller, pool: UpstreamPool, listen_host: str) -> web.Application:
    """The ingress. Its limits follow the Gateway spec as it changes (``limits.py``)."""
    limits = Limits(controller, pool)
    app = web.Application(client_max_size=limits.max_body, middlewares=[follow_limits, guard_and_errors])
    app[CONTROLLER] = controller
    app[POOL] = pool
    app[LIMITS] = limits
    app[GUARD] = Guard(listen_host)
    app[METRICS] = Metrics()
    controller.events.listen(app[METRICS].event)
    app.on_response_prepare.append(on_prepare)
    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{model:.+}", get_model)
    app.router.add_post("/v1/{tail:.*}", proxy, expect_handler=expect_continue)
    app.router.add_route("OPTIONS", "/v1/{tail:.*}", preflight)
    return app
