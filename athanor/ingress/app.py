"""The ingress: one OpenAI-compatible port in front of every model.

The request path, top to bottom: read the body (bounded) -> find ``model`` -> resolve it -> ``controller.use``
(start or swap, shared) -> rewrite ``model`` to what the runtime answers to -> forward with Content-Length over
one pool of keep-alive connections (``upstream.py``) -> stream the answer back chunk by chunk, rewriting ``model``
back to what the client asked.
Bodies are re-serialised only when the model name must change, and streamed chunks are only scanned when it must.

Errors are OpenAI error objects. Before the response has started they carry the right status; after (a stream
that was kept alive while its model loaded) they are sent as a final SSE ``data:`` event.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

from aiohttp import web
from multidict import CIMultiDict

from athanor import views
from athanor.controller.controller import Controller, ModelUnavailable, QueueFull, Upstream
from athanor.controller.instance import Phase
from athanor.ingress.upstream import Response, UpstreamClosed, UpstreamPool, UpstreamUnreachable

log = logging.getLogger("athanor.ingress")

DEFAULT_MAX_BODY = 32 * 2**20
KEEPALIVE_S = 3.0
HOP_BY_HOP = frozenset(
    h.lower() for h in ("Connection", "Keep-Alive", "Proxy-Authenticate", "Proxy-Authorization", "TE", "Trailer",
                        "Transfer-Encoding", "Upgrade", "Host", "Content-Length")
)
# Forwarded as they came, except what the gateway sets itself (framing, the runtime's address, the body type),
# Expect (the gateway already answered it; a runtime's 100 Continue would only precede the real answer) and
# Accept-Encoding (a compressed answer could not have its model id rewritten, and loopback needs no compression).
REQUEST_SKIP = HOP_BY_HOP | {"content-type", "expect", "accept-encoding"}
CONTROLLER: web.AppKey[Controller] = web.AppKey("controller", Controller)
POOL: web.AppKey[UpstreamPool] = web.AppKey("pool", UpstreamPool)
MAX_BODY: web.AppKey[int] = web.AppKey("max_body", int)


def error_body(status: int, message: str, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    if status == 429:
        kind = "rate_limit_error"
    elif status < 500:
        kind = "invalid_request_error"
    else:
        kind = "service_unavailable" if status == 503 else "server_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(status: int, message: str, code: str | None = None, param: str | None = None) -> web.Response:
    return web.json_response(error_body(status, message, code, param), status=status)


@web.middleware
async def openai_errors(request: web.Request, handler: Any) -> web.StreamResponse:
    """aiohttp's own HTTP errors (413, 404, 405) become OpenAI error objects too."""
    try:
        return await handler(request)
    except web.HTTPRequestEntityTooLarge:
        limit = request.app[MAX_BODY]
        return error_response(413, f"request body larger than the gateway's limit of {limit} bytes",
                              "request_too_large")
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return error_response(exc.status, exc.reason, None)


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def _model_entry(controller: Controller, name: str, obj: dict[str, Any]) -> dict[str, Any]:
    inst = controller.instances.get(name)
    artifact = obj.get("artifact") or {}
    created = obj["metadata"].get("creationTimestamp")
    try:
        created_ts = int(time.mktime(time.strptime(created, "%Y-%m-%dT%H:%M:%SZ"))) if created else 0
    except (TypeError, ValueError):
        created_ts = 0
    return {
        "id": name,
        "object": "model",
        "created": created_ts,
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
            if o["spec"].get("residency") != "disabled"]
    return web.json_response({"object": "list", "data": data})


async def get_model(request: web.Request) -> web.Response:
    controller = request.app[CONTROLLER]
    requested = request.match_info["model"]
    name = controller.resolve(requested)
    if name is None:
        return error_response(404, f"model {requested!r} not found", "model_not_found", "model")
    return web.json_response(_model_entry(controller, name, controller.doc()["models"][name]))


async def proxy(request: web.Request) -> web.StreamResponse:
    controller = request.app[CONTROLLER]
    body = await request.read()
    try:
        payload = json.loads(body.decode()) if body else None  # UTF-8, as OpenAI clients send; skips detection
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        return error_response(400, f"request body is not valid JSON: {exc}", "invalid_json")
    requested = payload.get("model") if isinstance(payload, dict) else None
    if not isinstance(requested, str) or not requested:
        return error_response(400, "the request needs a 'model' field naming a model", "missing_model", "model")
    name = controller.resolve(requested)
    if name is None:
        return error_response(404, f"model {requested!r} not found; GET /v1/models lists them",
                              "model_not_found", "model")
    streaming = payload.get("stream") is True
    if streaming and not controller.serving(name):
        return await _stream_after_load(request, controller, name, requested, payload, body)
    for attempt in (1, 2):
        try:
            async with controller.use(name) as upstream:
                return await _forward(request, upstream, requested, payload, body, None)
        except ModelUnavailable as exc:
            return error_response(503, str(exc), "model_unavailable")
        except QueueFull as exc:
            return error_response(429, str(exc), "queue_full")
        except UpstreamUnreachable as exc:
            # Nothing reached the runtime: it died since it was last seen. Let the controller notice, then retry
            # once (a restart) before giving up.
            await controller.check(name)
            if attempt == 2:
                return error_response(502, f"runtime for {name!r} is not reachable: {exc}", "upstream_failed")
    raise AssertionError("unreachable")


async def _stream_after_load(
    request: web.Request, controller: Controller, name: str, requested: str, payload: dict[str, Any], body: bytes
) -> web.StreamResponse:
    """Headers at once, an SSE comment every few seconds while the model loads, then the model's stream."""
    response = _sse_response()
    await response.prepare(request)
    started = time.monotonic()
    ready = asyncio.create_task(controller.ensure_ready(name))
    try:
        while not ready.done():
            done, _ = await asyncio.wait({ready}, timeout=KEEPALIVE_S)
            if not done:
                await response.write(f": loading {name}, {time.monotonic() - started:.0f} s\n\n".encode())
        ready.result()
        async with controller.use(name) as upstream:
            return await _forward(request, upstream, requested, payload, body, response)
    except (ModelUnavailable, QueueFull) as exc:
        status, code = (429, "queue_full") if isinstance(exc, QueueFull) else (503, "model_unavailable")
        await response.write(b"data: " + json.dumps(error_body(status, str(exc), code)).encode() + b"\n\n")
        await response.write_eof()
        return response
    finally:
        if not ready.done():
            ready.cancel()


def _sse_response() -> web.StreamResponse:
    return web.StreamResponse(status=200, headers={
        "Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _forward(
    request: web.Request, upstream: Upstream, requested: str, payload: dict[str, Any], body: bytes,
    started: web.StreamResponse | None,
) -> web.StreamResponse:
    if upstream.served_model != requested:
        body = json.dumps({**payload, "model": upstream.served_model}).encode()
        swap = (json.dumps(upstream.served_model).encode(), json.dumps(requested).encode())
    else:
        swap = None
    headers = [(k, v) for k, v in request.headers.items() if k.lower() not in REQUEST_SKIP]
    headers.append(("Content-Type", "application/json"))
    response = started
    try:
        async with request.app[POOL].request(upstream.port, request.method, request.rel_url.path_qs, headers,
                                             body) as resp:
            is_sse = "text/event-stream" in resp.content_type
            if response is None and not is_sse:
                data = await resp.read()
                if swap:
                    data = data.replace(swap[0], swap[1])
                out_headers = [(k, v) for k, v in resp.headers if k.lower() not in HOP_BY_HOP]
                return web.Response(body=data, status=resp.status, headers=CIMultiDict(out_headers))
            if response is not None and not is_sse:  # headers already sent: an error becomes an SSE event
                await response.write(b"data: " + await resp.read() + b"\n\n")
                await response.write_eof()
                return response
            if response is None:
                response = _sse_response()
                response.set_status(resp.status)
                await response.prepare(request)
            await _pump(resp, response, swap)
            if resp.close_delimited and not request.app[CONTROLLER].running(upstream.name):
                # A body that ends with the connection cannot tell a finished stream from a dead runtime.
                raise UpstreamClosed("the runtime exited during the stream")
            await response.write_eof()
            return response
    except UpstreamUnreachable:
        raise  # nothing was sent: the caller may retry
    except UpstreamClosed as exc:
        asyncio.get_running_loop().create_task(request.app[CONTROLLER].check(upstream.name))
        message = f"runtime for {upstream.name!r} failed mid-request: {exc}"
        log.warning(message)
        if response is None:
            return error_response(502, message, "upstream_failed")
        await response.write(b"data: " + json.dumps(error_body(502, message, "upstream_failed")).encode() + b"\n\n")
        return response
    except ConnectionResetError:
        # The client went away: leaving the block above closed the upstream connection, so the runtime stops
        # generating for it and the slot is freed.
        assert response is not None
        return response


async def _pump(resp: Response, response: web.StreamResponse, swap: tuple[bytes, bytes] | None) -> None:
    """Copy the upstream stream as it arrives. When the model id must be rewritten, work on whole lines so an
    id split across two chunks is still found."""
    if swap is None:
        async for chunk in resp.iter_chunks():
            await response.write(chunk)
        return
    carry = b""
    async for chunk in resp.iter_chunks():
        data = carry + chunk
        cut = data.rfind(b"\n") + 1
        carry = data[cut:]
        if cut:
            await response.write(data[:cut].replace(swap[0], swap[1]))
    if carry:
        await response.write(carry.replace(swap[0], swap[1]))


def create_app(controller: Controller, pool: UpstreamPool, max_body: int = DEFAULT_MAX_BODY) -> web.Application:
    app = web.Application(client_max_size=max_body, middlewares=[openai_errors])
    app[CONTROLLER] = controller
    app[POOL] = pool
    app[MAX_BODY] = max_body
    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{model:.+}", get_model)
    app.router.add_post("/v1/{tail:.*}", proxy)
    return app
