"""The admin API, version 1: what the CLI uses now and the TUI next, under ``/athanor/v1``.

    GET  /athanor/v1/status                       the daemon and every instance (phase, load, pid, port)
    GET  /athanor/v1/models                       every model as ``athanor get models -o json`` shows it, live
    GET  /athanor/v1/models/{model}               one of them
    POST /athanor/v1/models/{model}/{action}      start | stop | restart | unload (unload: stop after draining;
                                                  the next request loads it again, as for stop); start?force=1
                                                  starts it even if the memory guard says it does not fit
    GET  /athanor/v1/events[?since=SEQ][&follow=1]  events as JSON, or as a Server-Sent Events stream that goes on
                                                  (``id:`` is the sequence number: reconnect with ``since``)
    GET  /athanor/v1/models/{model}/logs[?lines=N][&follow=1]   the runtime's log, followed across restarts
    GET  /metrics                                 Prometheus text format

It changes what runs, so the guard (``guard.py``) lets only loopback peers and no web page reach it, unless an
admin key is configured, which every request must then present. Errors are JSON ``{"error": {...}}`` objects.
A new version of the API gets a new prefix; fields are only ever added to a version.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

from aiohttp import web

from athanor import views
from athanor.controller.events import Lagged
from athanor.errors import ModelUnavailable
from athanor.ingress.app import CONTROLLER, METRICS, error_response, short

ADMIN = "/athanor/v1"
ACTIONS = ("start", "stop", "restart", "unload")
LOG_POLL_S = 0.25  # how often a followed log is looked at for new lines
SSE_HEARTBEAT_S = 15.0  # a comment line this often keeps idle streams (and proxies in between) open
MAX_LOG_LINES = 10_000


def _resolved(request: web.Request) -> str | web.Response:
    controller = request.app[CONTROLLER]
    requested = request.match_info["model"]
    name = controller.resolve(requested)
    if name is None:
        return error_response(404, f"model {short(requested)} not found", "model_not_found")
    return name


async def model_action(request: web.Request) -> web.Response:
    controller = request.app[CONTROLLER]
    action = request.match_info["action"]
    if action not in ACTIONS:
        return error_response(404, f"unknown action {short(action)}: {', '.join(ACTIONS)}", "unknown_action")
    name = _resolved(request)
    if isinstance(name, web.Response):
        return name
    try:
        if action == "start":
            await controller.start(name, force=request.query.get("force") in ("1", "true"))
        else:
            await getattr(controller, "stop" if action == "unload" else action)(name)
    except ModelUnavailable as exc:
        return error_response(503, str(exc), "model_unavailable")
    inst = controller.instance(name)
    await controller.recorded()  # the CLI reads state.json next: let it see this change
    return web.json_response({"name": name, "phase": inst.phase.value, "message": inst.message})


async def status(request: web.Request) -> web.Response:
    return web.json_response({"apiVersion": "v1", "pid": os.getpid(), **request.app[CONTROLLER].status()})


def _model_view(request: web.Request, name: str) -> dict[str, Any]:
    controller = request.app[CONTROLLER]
    inst = controller.instances.get(name)
    record = controller.record(inst) if inst is not None else None
    return views.model_view(controller.doc()["models"][name], record, gateway_up=True)


async def models(request: web.Request) -> web.Response:
    names = sorted(request.app[CONTROLLER].doc()["models"])
    return web.json_response({"apiVersion": "v1", "kind": "List", "items": [_model_view(request, n) for n in names]})


async def model(request: web.Request) -> web.Response:
    name = _resolved(request)
    if isinstance(name, web.Response):
        return name
    return web.json_response(_model_view(request, name))


def _since(request: web.Request) -> int | None | web.Response:
    raw = request.query.get("since") or request.headers.get("Last-Event-ID")
    if raw is None:
        return None
    try:
        return int(raw)
    except ValueError:
        return error_response(400, f"since must be an event sequence number, not {short(raw)}", "bad_since")


async def events(request: web.Request) -> web.StreamResponse:
    log = request.app[CONTROLLER].events
    since = _since(request)
    if isinstance(since, web.Response):
        return since
    if request.query.get("follow") not in ("1", "true"):
        return web.json_response({"apiVersion": "v1", "items": log.since(since)})
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                           "X-Accel-Buffering": "no"})
    await response.prepare(request)
    stream = log.follow(since)
    try:
        while True:
            try:
                event = await asyncio.wait_for(anext(stream), SSE_HEARTBEAT_S)
            except TimeoutError:
                await response.write(b": keep-alive\n\n")
                continue
            await response.write(f"id: {event['seq']}\ndata: {json.dumps(event)}\n\n".encode())
    except Lagged as exc:
        await response.write(f"event: lagged\ndata: {json.dumps({'message': str(exc)})}\n\n".encode())
    except ConnectionResetError:
        pass  # the client left
    finally:
        await stream.aclose()
    return response


async def logs(request: web.Request) -> web.StreamResponse:
    """The runtime's log as text. ``follow``: new lines as they are written, across restarts (every runtime of
    a model appends to one file) and rotations (copytruncate: the file shrinks, reading starts over)."""
    name = _resolved(request)
    if isinstance(name, web.Response):
        return name
    controller = request.app[CONTROLLER]
    try:
        lines = min(int(request.query.get("lines", "50")), MAX_LOG_LINES)
    except ValueError:
        return error_response(400, "lines must be a number", "bad_lines")
    path = controller.store.logs_dir / f"{name}.log"
    from athanor.managers import logs as log_files

    head = await asyncio.to_thread(log_files.tail, path, lines)
    follow = request.query.get("follow") in ("1", "true")
    if not follow:
        if not head and not path.exists():
            return error_response(404, f"no log yet for {name}; it has not been started", "no_log")
        return web.Response(text="".join(line + "\n" for line in head))
    response = web.StreamResponse(headers={"Content-Type": "text/plain; charset=utf-8", "Cache-Control": "no-cache",
                                           "X-Accel-Buffering": "no"})
    await response.prepare(request)
    await response.write("".join(line + "\n" for line in head).encode())
    inst = controller.instance(name)
    incarnation = inst.incarnation
    offset = await asyncio.to_thread(_size, path)
    try:
        while True:
            if inst.incarnation != incarnation:
                incarnation = inst.incarnation
                await response.write(f"--- athanor: runtime {incarnation} of {name} starting ---\n".encode())
            chunk, offset = await asyncio.to_thread(_read_from, path, offset)
            if chunk:
                await response.write(chunk)
            else:
                await asyncio.sleep(LOG_POLL_S)  # a polling interval for new lines in the file
    except ConnectionResetError:
        pass
    return response


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _read_from(path: Path, offset: int) -> tuple[bytes, int]:
    """New bytes after ``offset`` (at most 1 MiB at a time); a file that shrank was rotated: start over."""
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if size < offset:
                offset = 0
            fh.seek(offset)
            data = fh.read(2**20)
    except FileNotFoundError:
        return b"", 0
    return data, offset + len(data)


async def metrics(request: web.Request) -> web.Response:
    body = request.app[METRICS].render(request.app[CONTROLLER])
    return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


def add_admin_routes(app: web.Application) -> None:
    app.router.add_get(ADMIN + "/status", status)
    app.router.add_get(ADMIN + "/models", models)
    app.router.add_get(ADMIN + "/events", events)
    app.router.add_get(ADMIN + "/models/{model}/logs", logs)
    app.router.add_get(ADMIN + "/models/{model}", model)
    app.router.add_post(ADMIN + "/models/{model}/{action}", model_action)
    app.router.add_get("/metrics", metrics)
