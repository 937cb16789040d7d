"""The admin API's telemetry endpoints (``telemetry/``): per-request records kept across restarts.

    GET    /athanor/v1/telemetry[?model=M][&since=S][&limit=N]   records, newest first; ``since``: a span back
                                                  from now (30m, 2h, 7d) or a UTC time; ``limit`` default 100
    GET    /athanor/v1/telemetry/compare?model=A&model=B[&last=N]  each model over its last N requests (default
                                                  100): requests, errors, p50/p95 TTFT, tokens/s, tokens
    DELETE /athanor/v1/telemetry                  deletes every record

Every answer is read after the pending records are written (``Recorder.read`` flushes first), so a client sees
its own requests. Model names are resolved as requests resolve them (an alias finds its model); a name that no
longer resolves (a deleted model) is looked up as given, so its records stay reachable.
"""

from __future__ import annotations

from aiohttp import web

from athanor.errors import InvalidValueError
from athanor.ingress.app import CONTROLLER, TELEMETRY, error_response
from athanor.telemetry import db
from athanor.telemetry.recorder import Recorder

ADMIN = "/athanor/v1"
MAX_LIMIT = 100_000


def add_telemetry_routes(app: web.Application) -> None:
    app.router.add_get(ADMIN + "/telemetry", records)
    app.router.add_get(ADMIN + "/telemetry/compare", compare)
    app.router.add_delete(ADMIN + "/telemetry", clear)


def _recorder(request: web.Request) -> Recorder | web.Response:
    recorder = request.app.get(TELEMETRY)
    if recorder is None:
        return error_response(404, "this gateway records no telemetry", "no_telemetry")
    return recorder


def _model(request: web.Request, requested: str) -> str:
    return request.app[CONTROLLER].resolve(requested) or requested


def _count(request: web.Request, key: str, default: int) -> int | web.Response:
    raw = request.query.get(key)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if not 1 <= value <= MAX_LIMIT:
        return error_response(400, f"{key} must be a whole number from 1 to {MAX_LIMIT}, not {raw[:64]!r}",
                              f"bad_{key}")
    return value


async def records(request: web.Request) -> web.Response:
    recorder = _recorder(request)
    if isinstance(recorder, web.Response):
        return recorder
    limit = _count(request, "limit", db.DEFAULT_LIMIT)
    if isinstance(limit, web.Response):
        return limit
    since = None
    if request.query.get("since"):
        try:
            since = db.parse_since(request.query["since"])
        except InvalidValueError as exc:
            return error_response(400, str(exc), "bad_since")
    model = _model(request, request.query["model"]) if request.query.get("model") else None
    items = await recorder.read(db.records, model, since, limit)
    return web.json_response({"apiVersion": "v1", "items": items})


async def compare(request: web.Request) -> web.Response:
    recorder = _recorder(request)
    if isinstance(recorder, web.Response):
        return recorder
    models = [_model(request, m) for m in request.query.getall("model", []) if m]
    if not models:
        return error_response(400, "compare needs at least one model: ?model=A&model=B", "missing_model")
    last = _count(request, "last", db.DEFAULT_LAST)
    if isinstance(last, web.Response):
        return last
    return web.json_response({"apiVersion": "v1", "models": await recorder.read(db.compare, models, last)})


async def clear(request: web.Request) -> web.Response:
    recorder = _recorder(request)
    if isinstance(recorder, web.Response):
        return recorder
    return web.json_response({"apiVersion": "v1", "deleted": await recorder.read(db.clear)})
