"""The gateway's port: the front door (``wire.py``) and the aiohttp application behind it.

The front door takes every connection. Model requests (``POST /v1/...``, the hot path) are answered by the proxy
(``proxy.py``) without passing through aiohttp, and so are Ollama's (``/api/chat`` and the like: ``ollama/``,
which translates them for the same proxy); every other request is relayed to the aiohttp application built here
(``relay.py``): ``/health``, ``/v1/models``, Ollama's other paths, CORS preflights, and the admin API and
``/metrics`` that ``admin.py`` adds. Both sides pass the same guard (``guard.py``: Host, Origin, keys) and answer
errors in the format of the API called.
"""

from __future__ import annotations

import calendar
import contextlib
import logging
import time
from typing import Any

from aiohttp import web

from athanor import views
from athanor.controller.controller import Controller
from athanor.controller.instance import Phase
from athanor.ingress.errors import ANTHROPIC_PREFIX, OLLAMA_PREFIX, anthropic_error, error_body, error_bytes, short
from athanor.ingress.guard import Guard
from athanor.ingress.limits import Limits
from athanor.ingress.proxy import REQUEST_SKIP_BYTES, Proxy
from athanor.ingress.relay import Relay, ServerFactory
from athanor.ingress.upstream import UpstreamPool
from athanor.ingress.wire import Front, Refused, Request
from athanor.metrics import Metrics
from athanor.ollama.routes import MODEL_POSTS, OllamaFront, add_routes
from athanor.telemetry.recorder import Recorder

__all__ = ["ANTHROPIC_PREFIX", "anthropic_error", "error_body", "error_response", "short"]  # for admin.py and
# protocol.py, which answer in the same formats

log = logging.getLogger("athanor.ingress")

CONTROLLER: web.AppKey[Controller] = web.AppKey("controller", Controller)
POOL: web.AppKey[UpstreamPool] = web.AppKey("pool", UpstreamPool)
LIMITS: web.AppKey[Limits] = web.AppKey("limits", Limits)
GUARD: web.AppKey[Guard] = web.AppKey("guard", Guard)
METRICS: web.AppKey[Metrics] = web.AppKey("metrics", Metrics)
PROXY: web.AppKey[Proxy] = web.AppKey("proxy", Proxy)
TELEMETRY: web.AppKey[Recorder] = web.AppKey("telemetry", Recorder)  # set by the daemon (daemon.py)


def error_response(status: int, message: str, code: str | None = None, param: str | None = None,
                   headers: dict[str, str] | None = None) -> web.Response:
    body = error_body(status, message, code, param)
    response = web.json_response(body, status=status, headers=headers)
    response[GATEWAY_ERROR] = body["error"]  # the middleware re-shapes it for Anthropic's routes
    return response


GATEWAY_ERROR: web.ResponseKey[dict[str, Any]] = web.ResponseKey("athanor.error", dict)
STARTED: web.RequestKey[web.StreamResponse] = web.RequestKey("athanor.started", web.StreamResponse)


def _in_callers_format(request: web.Request, response: web.StreamResponse) -> web.StreamResponse:
    """The gateway's own errors in the format of the API the client called (the runtimes' pass as they are)."""
    error = response.get(GATEWAY_ERROR)
    if error is None:
        return response
    if request.path.startswith(ANTHROPIC_PREFIX):
        body = anthropic_error(response.status, error["message"])
    elif request.path.startswith(OLLAMA_PREFIX):
        body = {"error": error["message"]}
    else:
        return response
    headers = {k: v for k, v in response.headers.items() if k.lower() in ("allow", "www-authenticate")}
    return web.json_response(body, status=response.status, headers=headers)


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
        error = error_bytes(request.path, status, message, code or "internal_error", None)
        await response.write(b"data: " + error + b"\n\n")
        await response.write_eof()
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


async def escaped_route(request: web.Request) -> web.Response:
    """A POST under /v1 whose path has escapes (the front door answers all others): no runtime serves one."""
    return error_response(404, f"no route {short(request.path)}", "unknown_route")


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
    """The aiohttp side of the gateway, and the proxy the front door answers model requests with (``PROXY``).
    Its limits follow the Gateway spec as it changes (``limits.py``)."""
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
    app.router.add_post("/v1/{tail:.*}", escaped_route)  # the front door answers every other POST there
    app.router.add_route("OPTIONS", "/v1/{tail:.*}", preflight)
    add_routes(app, controller, controller.store, preflight)
    app[PROXY] = Proxy(controller, pool, app[GUARD], app[METRICS])
    return app


def front_door(app: web.Application, aiohttp_server: ServerFactory, **timeouts: float) -> Front:
    """The protocol factory for the gateway's listening sockets: model requests go to the app's proxy (Ollama's
    through their translation), everything else to ``aiohttp_server`` (``protocol.GatewayRunner.relayed``), which
    serves ``app``."""
    guard, limits = app[GUARD], app[LIMITS]

    def cors(request: Request) -> list[tuple[str, str]]:
        return list(guard.cors_headers(request, guard.policy(app[CONTROLLER].gateway())).items())

    def expect(request: Request) -> Refused | None:
        """Before ``100 Continue``: is the request refused anyway (a foreign host, a missing key, an expectation
        other than 100-continue)? Then it is answered before the client sends its body. (A body over the limit
        is refused by the front door itself.)"""
        gateway = app[CONTROLLER].gateway()
        refused = guard.refusal(request, guard.policy(gateway), gateway["auth"])
        if refused is not None and refused[0] == 401:
            return Refused(401, refused[1], "invalid_api_key", [("WWW-Authenticate", "Bearer")])
        if refused is not None:
            return Refused(refused[0], refused[1], "forbidden")
        if request.headers["Expect"].lower() != "100-continue":
            return Refused(417, f"unsupported Expect: {short(request.headers['Expect'])}", "expectation_failed")
        return None

    ollama = OllamaFront(app[CONTROLLER], app[PROXY], guard)
    return Front(app[PROXY], Relay(aiohttp_server), max_body=limits.follow, expect=expect, error_body=error_bytes,
                 cors=cors, posts=dict.fromkeys(MODEL_POSTS, ollama), fast=app[PROXY].fast,
                 forward_skip=REQUEST_SKIP_BYTES, **timeouts)
