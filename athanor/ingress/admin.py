"""The admin API, version 1: what the CLI uses now and the TUI next, under ``/athanor/v1``.

    GET  /athanor/v1/status                       the daemon and every instance (phase, load, pid, port)
    GET  /athanor/v1/models                       every model as ``athanor get models -o json`` shows it, live
    GET  /athanor/v1/models/{model}               one of them
    POST /athanor/v1/models/{model}/{action}      start | stop | restart | unload (unload: stop after draining;
                                                  the next request loads it again, as for stop); start?force=1
                                                  starts it even if the memory guard says it does not fit
    GET  /athanor/v1/events[?since=SEQ][&follow=1]  events as JSON, or as a Server-Sent Events stream that goes on
                                                  (``id:`` is the sequence number: reconnect with ``since``)
    GET  /athanor/v1/models/{model}/logs[?lines=N][&follow=1]   the runtime's log, followed across restarts (as
                                                  Server-Sent Events for a client that accepts text/event-stream)
    GET  /metrics                                 Prometheus text format

Streams that go on send a heartbeat while they are quiet (``heartbeat.py``: every 15 s, a ``: keep-alive``
comment, which SSE clients skip). A followed log as plain text has none: any byte sent would be a byte of the log.

It changes what runs, so the guard (``guard.py``) lets only loopback peers and no web page reach it, unless an
admin key is configured, which every request must then present. Errors are JSON ``{"error": {...}}`` objects.
A new version of the API gets a new prefix; fields are only ever added to a version.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, TypeVar

from aiohttp import web

from athanor import views
from athanor.controller.events import Lagged
from athanor.errors import InvalidValueError, ModelUnavailable
from athanor.ingress import heartbeat
from athanor.ingress.app import CONTROLLER, METRICS, error_response, short
from athanor.managers.log_reader import POLL_S, LogReader

if TYPE_CHECKING:
    from athanor.controller.controller import Controller

ADMIN = "/athanor/v1"
ACTIONS = ("start", "stop", "restart", "unload")
MAX_LOG_LINES = 10_000
KEEP_ALIVE = b": keep-alive\n\n"  # an SSE comment: clients skip it, proxies and read timeouts see bytes
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}

T = TypeVar("T")
_END = object()


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


async def _model_views(controller: Controller, only: str | None = None) -> list[dict[str, Any]]:
    """The views of every model (or of ``only``), built in a thread: a live model's view reads its process tree from
    /proc (psutil), which must not hold up the loop and the streams it serves (a TUI asks for this every second).
    What the views are made of is taken here, on the loop, where the controller changes it."""
    models = controller.doc()["models"]
    pairs = [(models[name], controller.record(inst) if (inst := controller.instances.get(name)) else None)
             for name in ([only] if only else sorted(models))]
    return await asyncio.to_thread(lambda: [views.model_view(obj, record, gateway_up=True) for obj, record in pairs])


async def models(request: web.Request) -> web.Response:
    items = await _model_views(request.app[CONTROLLER])
    return web.json_response({"apiVersion": "v1", "kind": "List", "items": items})


async def model(request: web.Request) -> web.Response:
    name = _resolved(request)
    if isinstance(name, web.Response):
        return name
    return web.json_response((await _model_views(request.app[CONTROLLER], name))[0])


def _since(request: web.Request) -> int | None | web.Response:
    raw = request.query.get("since") or request.headers.get("Last-Event-ID")
    if raw is None:
        return None
    try:
        return int(raw)
    except ValueError:
        return error_response(400, f"since must be an event sequence number, not {short(raw)}", "bad_since")


async def with_heartbeats(source: AsyncIterator[T], interval: float) -> AsyncIterator[T | None]:
    """``source``'s items as they come, and None each time it has been quiet for ``interval`` seconds.

    One read of ``source`` stays pending across heartbeats: a heartbeat never cancels it. (``wait_for`` would, and
    cancelling an async generator's read finishes the generator: the stream would end at its first heartbeat.)
    Closing this closes ``source``.
    """
    pending: asyncio.Future[Any] = asyncio.ensure_future(anext(source, _END))
    try:
        while True:
            done, _ = await asyncio.wait({pending}, timeout=interval)
            if not done:
                yield None
                continue
            item = pending.result()  # an error of the source (Lagged) goes to the caller
            if item is _END:
                return
            pending = asyncio.ensure_future(anext(source, _END))
            yield item
    finally:
        if not pending.done():
            pending.cancel()
            await asyncio.wait({pending})
        if not pending.cancelled():
            pending.exception()  # seen: a read nobody waits for any more is not reported as lost
        await source.aclose()


def _heartbeat() -> float | web.Response:
    try:
        return heartbeat.interval()
    except InvalidValueError as exc:
        return error_response(500, f"the gateway's heartbeat setting is invalid: {exc}", "bad_heartbeat")


async def events(request: web.Request) -> web.StreamResponse:
    log = request.app[CONTROLLER].events
    since = _since(request)
    if isinstance(since, web.Response):
        return since
    if request.query.get("follow") not in ("1", "true"):
        return web.json_response({"apiVersion": "v1", "items": log.since(since)})
    interval = _heartbeat()
    if isinstance(interval, web.Response):
        return interval
    response = web.StreamResponse(headers=SSE_HEADERS)
    await response.prepare(request)
    try:
        async with contextlib.aclosing(with_heartbeats(log.follow(since), interval)) as stream:
            async for event in stream:
                if event is None:
                    await response.write(KEEP_ALIVE)
                else:
                    await response.write(f"id: {event['seq']}\ndata: {json.dumps(event)}\n\n".encode())
    except Lagged as exc:
        await response.write(f"event: lagged\ndata: {json.dumps({'message': str(exc)})}\n\n".encode())
    except ConnectionResetError:
        pass  # the client left
    return response


async def logs(request: web.Request) -> web.StreamResponse:
    """The runtime's log as text. ``follow``: new lines as they are written, across restarts (every runtime of
    a model appends to one file) and rotations (copytruncate: the file shrinks, reading starts over).

    A client that accepts ``text/event-stream`` (the CLI, the TUI) gets the followed log as Server-Sent Events,
    ``data: {"text": ...}`` (``"incarnation": N`` too on the line that says a new runtime starts), with heartbeats
    while the log is quiet. Any other client gets plain text and no heartbeat."""
    name = _resolved(request)
    if isinstance(name, web.Response):
        return name
    controller = request.app[CONTROLLER]
    try:
        lines = min(int(request.query.get("lines", "50")), MAX_LOG_LINES)
    except ValueError:
        return error_response(400, "lines must be a number", "bad_lines")
    path = controller.store.logs_dir / f"{name}.log"
    if request.query.get("follow") not in ("1", "true"):
        from athanor.managers import logs as log_files

        head = await asyncio.to_thread(log_files.tail, path, lines)
        if not head and not path.exists():
            return error_response(404, f"no log yet for {name}; it has not been started", "no_log")
        return web.Response(text="".join(line + "\n" for line in head))
    sse = "text/event-stream" in request.headers.get("Accept", "")
    interval = _heartbeat()
    if isinstance(interval, web.Response):
        return interval
    response = web.StreamResponse(headers=SSE_HEADERS if sse else {
        "Content-Type": "text/plain; charset=utf-8", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    await response.prepare(request)
    reader = LogReader(path)
    head = await asyncio.to_thread(reader.start, lines)
    source = _followed_log(controller, name, reader, head)
    try:
        async with contextlib.aclosing(with_heartbeats(source, interval) if sse else source) as stream:
            async for piece in stream:
                if not sse:
                    await response.write(piece["text"].encode())
                elif piece is None:
                    await response.write(KEEP_ALIVE)
                else:
                    await response.write(f"data: {json.dumps(piece)}\n\n".encode())
    except ConnectionResetError:
        pass  # the client left
    return response


async def _followed_log(controller: Controller, name: str, reader: LogReader,
                        head: list[str]) -> AsyncIterator[dict[str, Any]]:
    """``{"text": ...}`` pieces of the log: ``head``, then what ``reader`` finds written next, with a line of its own
    (which also carries ``incarnation``) where a new runtime of the model starts."""
    if head:
        yield {"text": "".join(line + "\n" for line in head)}
    inst = controller.instance(name)
    incarnation = inst.incarnation
    while True:
        if inst.incarnation != incarnation:
            incarnation = inst.incarnation
            yield {"text": f"--- athanor: runtime {incarnation} of {name} starting ---\n", "incarnation": incarnation}
        text = await asyncio.to_thread(reader.read)
        if text:
            yield {"text": text}
        else:
            await asyncio.sleep(POLL_S)  # a polling interval for new lines in the file


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
