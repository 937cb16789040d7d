"""The admin API, version 1: what the CLI uses now and the TUI next, under ``/athanor/v1``.

    GET  /athanor/v1/daemon                       the daemon itself: version, addresses, service manager, uptime,
                                                  this machine's CPU, load and memory (with the budget)
    GET  /athanor/v1/daemon/logs[?lines=N][&follow=1]   the daemon's own log, served like a model's
    GET  /athanor/v1/status[?follow=1]            the daemon and every instance (phase, load, pid, port); follow:
                                                  as Server-Sent Events, again on every change (coalesced)
    GET  /athanor/v1/metrics                      the counts /metrics renders, as JSON per model
    GET  /athanor/v1/models                       every model as ``athanor get models -o json`` shows it, live,
                                                  with ``status.fit`` and (live runtimes) ``status.process``
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

``{model}`` is a model's name, an alias or its discovered id; a Hugging Face id holds a "/", sent percent-encoded
(``/models/org%2Frepo/start``): aiohttp matches the path with ``%2F`` still encoded and decodes the segment.

It changes what runs, so the guard (``guard.py``) lets only loopback peers and no web page reach it, unless an
admin key is configured, which every request must then present (a read-only key admits GETs alone). Errors are
JSON ``{"error": {...}}`` objects. A new version of the API gets a new prefix; fields are only ever added to a version.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any, TypeVar

from aiohttp import web

from athanor import __version__, heartbeat, views
from athanor.addresses import authority
from athanor.controller.events import Lagged
from athanor.errors import InvalidValueError, ModelUnavailable
from athanor.ingress import admin_facts, admin_telemetry
from athanor.ingress.app import CONTROLLER, METRICS, error_response, short
from athanor.managers.log_reader import POLL_S, LogReader
from athanor.timestamps import utc_timestamp

if TYPE_CHECKING:
    from pathlib import Path

    from athanor.controller.controller import Controller
    from athanor.controller.instance import Instance
    from athanor.managers.base import Handle, ServiceManager

ADMIN = "/athanor/v1"
ACTIONS = ("start", "stop", "restart", "unload")
MAX_LOG_LINES = 10_000
KEEP_ALIVE = b": keep-alive\n\n"  # an SSE comment: clients skip it, proxies and read timeouts see bytes
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}

STATUS_MIN_GAP_S = 0.25  # the status feed sends at most four updates a second: a burst of changes is one update
_LIVE_PHASES = ("Starting", "Ready", "Draining", "Stopping")

T = TypeVar("T")
_END = object()
FITS: web.AppKey[admin_facts.FitCache] = web.AppKey("fits", admin_facts.FitCache)
PROCESSES: web.AppKey[admin_facts.ProcessSampler] = web.AppKey("processes", admin_facts.ProcessSampler)
MEMORY: web.AppKey[admin_facts.MemoryCache] = web.AppKey("memory", admin_facts.MemoryCache)
RECORD: web.AppKey[admin_facts.DaemonRecord] = web.AppKey("daemon_record", admin_facts.DaemonRecord)


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


def _status_body(controller: Controller) -> dict[str, Any]:
    return {"apiVersion": "v1", "pid": os.getpid(), **controller.status()}


async def status(request: web.Request) -> web.StreamResponse:
    """The status; ``follow``: as Server-Sent Events (``event: status``), at once and then whenever a phase, an
    in-flight or waiting count, an instance or the event log changes, at most every ``STATUS_MIN_GAP_S`` (a burst
    is one update, with the counts as they are when it is sent), with heartbeats while nothing changes."""
    controller = request.app[CONTROLLER]
    if request.query.get("follow") not in ("1", "true"):
        return web.json_response(_status_body(controller))
    interval = _heartbeat()
    if isinstance(interval, web.Response):
        return interval
    response = web.StreamResponse(headers=SSE_HEADERS)
    await response.prepare(request)
    try:
        async with contextlib.aclosing(with_heartbeats(_status_feed(controller), interval)) as stream:
            async for body in stream:
                if body is None:
                    await response.write(KEEP_ALIVE)
                else:
                    await response.write(f"event: status\ndata: {json.dumps(body)}\n\n".encode())
    except ConnectionResetError:
        pass  # the client left
    return response


async def _status_feed(controller: Controller) -> AsyncIterator[dict[str, Any]]:
    """The status now, then again after each change (``controller.changes``), no closer than the minimum gap; an
    update that would say the same as the last one (a request in and out within the gap) is not sent."""
    changes = controller.changes
    seen = changes.version
    last = _status_body(controller)
    yield last
    loop = asyncio.get_running_loop()
    sent_at = loop.time()
    while True:
        await changes.after(seen)
        wait = sent_at + STATUS_MIN_GAP_S - loop.time()
        if wait > 0:
            await asyncio.sleep(wait)  # the rate limit: changes meanwhile join this update
        seen = changes.version
        body = _status_body(controller)
        if body != last:
            last = body
            sent_at = loop.time()
            yield body


async def _model_views(request: web.Request, only: str | None = None) -> list[dict[str, Any]]:
    """The views of every model (or of ``only``), built in a thread: a live model's view reads its process tree from
    /proc (psutil), and its estimate file sizes, which must not hold up the loop and the streams it serves (a TUI
    asks for this every second). What the views are made of is taken here, on the loop, where the controller
    changes it."""
    controller = request.app[CONTROLLER]
    fits, processes, memory = request.app[FITS], request.app[PROCESSES], request.app[MEMORY]
    doc = controller.doc()
    models = doc["models"]
    triples = [(name, models[name], controller.record(inst) if (inst := controller.instances.get(name)) else None)
               for name in ([only] if only else sorted(models))]

    def build() -> list[dict[str, Any]]:
        machine_memory = memory.get()
        items = []
        for name, obj, record in triples:
            view = views.model_view(obj, record, gateway_up=True)
            estimate = fits.fit(doc, name, machine_memory)
            if estimate is not None:
                view["status"]["fit"] = estimate
            if record and record.get("phase") in _LIVE_PHASES:
                sample = processes.sample(name, record.get("handle"))
                if sample is not None:
                    view["status"]["process"] = sample
            items.append(view)
        if only is None:
            processes.forget_except({name for name, _, record in triples
                                     if record and record.get("phase") in _LIVE_PHASES})
        return items

    return await asyncio.to_thread(build)


async def models(request: web.Request) -> web.Response:
    items = await _model_views(request)
    return web.json_response({"apiVersion": "v1", "kind": "List", "items": items})


async def model(request: web.Request) -> web.Response:
    name = _resolved(request)
    if isinstance(name, web.Response):
        return name
    return web.json_response((await _model_views(request, name))[0])


async def daemon(request: web.Request) -> web.Response:
    """The daemon's own facts: its version and pid, where it listens (and where its admin API does), the service
    manager it runs models under, when it started, and this machine's CPU, load and memory."""
    controller = request.app[CONTROLLER]
    gateway = controller.gateway()
    started = request.app[METRICS].started
    memory, daemon_record = request.app[MEMORY], request.app[RECORD]
    sockname = request.transport.get_extra_info("sockname") if request.transport else None

    def build() -> dict[str, Any]:
        from athanor.managers import resolve_manager

        record = daemon_record.get()  # {} when not recorded (yet): this server, as the request reached it
        here = authority(sockname[0], sockname[1]) if isinstance(sockname, tuple) else None
        return {"apiVersion": "v1", "version": __version__, "pid": os.getpid(),
                "listen": record.get("listen") or here, "admin": record.get("admin", here),
                "serviceManager": resolve_manager(gateway["serviceManager"]), "startedAt": utc_timestamp(started),
                "uptimeSeconds": round(time.time() - started, 1), "machine": admin_facts.machine(),
                "memory": admin_facts.memory_view(memory.get(), gateway.get("residency", {}))}

    return web.json_response(await asyncio.to_thread(build))


async def metrics_json(request: web.Request) -> web.Response:
    return web.json_response({"apiVersion": "v1", **request.app[METRICS].as_json(request.app[CONTROLLER])})


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
    inst = controller.instances.get(name)
    if inst is not None and inst.handle is not None and not controller.manager_of(inst.handle).local:
        return await _pod_log(request, controller.manager_of(inst.handle), inst.handle)
    return await _serve_log(request, controller.store.logs_dir / f"{name}.log", lambda: controller.instance(name),
                            f"no log yet for {name}; it has not been started")


async def _pod_log(request: web.Request, manager: ServiceManager, handle: Handle) -> web.StreamResponse:
    """A runtime in a cluster logs to its pod, not to a file here: its tail, as the cluster keeps it (followed,
    it is sent once, as one piece)."""
    try:
        lines = min(int(request.query.get("lines", "50")), MAX_LOG_LINES)
    except ValueError:
        return error_response(400, "lines must be a number", "bad_lines")
    text = "".join(line + "\n" for line in await manager.log_tail(handle, lines))
    if request.query.get("follow") in ("1", "true") and "text/event-stream" in request.headers.get("Accept", ""):
        response = web.StreamResponse(headers=SSE_HEADERS)
        await response.prepare(request)
        await response.write(f"data: {json.dumps({'text': text})}\n\n".encode())
        return response
    return web.Response(text=text)


async def daemon_logs(request: web.Request) -> web.StreamResponse:
    """The daemon's own log (``logs/daemon.log``, where ``athanor up`` and the service files send its output),
    served as a model's log is, without the lines that mark a new runtime."""
    return await _serve_log(request, request.app[CONTROLLER].store.logs_dir / "daemon.log", None,
                            "no daemon log here: this daemon's output goes elsewhere (started in a terminal, or to "
                            "the journal)")


async def _serve_log(request: web.Request, path: Path, instance: Callable[[], Instance] | None,
                     missing: str) -> web.StreamResponse:
    """``path`` as the log endpoints serve it; ``instance``: the model's instance, whose new runtimes a followed log
    marks (None: the daemon's log)."""
    try:
        lines = min(int(request.query.get("lines", "50")), MAX_LOG_LINES)
    except ValueError:
        return error_response(400, "lines must be a number", "bad_lines")
    if request.query.get("follow") not in ("1", "true"):
        from athanor.managers import logs as log_files

        head = await asyncio.to_thread(log_files.tail, path, lines)
        if not head and not path.exists():
            return error_response(404, missing, "no_log")
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
    source = _followed_log(instance() if instance else None, reader, head)
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


async def _followed_log(inst: Instance | None, reader: LogReader, head: list[str]) -> AsyncIterator[dict[str, Any]]:
    """``{"text": ...}`` pieces of the log: ``head``, then what ``reader`` finds written next, with a line of its own
    (which also carries ``incarnation``) where a new runtime of the model ``inst`` starts (None: the daemon's
    log, which has no runtimes)."""
    if head:
        yield {"text": "".join(line + "\n" for line in head)}
    incarnation = inst.incarnation if inst is not None else 0
    while True:
        if inst is not None and inst.incarnation != incarnation:
            incarnation = inst.incarnation
            yield {"text": f"--- athanor: runtime {incarnation} of {inst.name} starting ---\n",
                   "incarnation": incarnation}
        text = await asyncio.to_thread(reader.read)
        if text:
            yield {"text": text}
        else:
            await asyncio.sleep(POLL_S)  # a polling interval for new lines in the file


async def metrics(request: web.Request) -> web.Response:
    body = request.app[METRICS].render(request.app[CONTROLLER])
    return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


def add_admin_routes(app: web.Application) -> None:
    app[FITS] = admin_facts.FitCache()
    app[PROCESSES] = admin_facts.ProcessSampler()
    app[MEMORY] = admin_facts.MemoryCache()
    app[RECORD] = admin_facts.DaemonRecord(app[CONTROLLER].store.state)
    app.router.add_get(ADMIN + "/daemon", daemon)
    app.router.add_get(ADMIN + "/daemon/logs", daemon_logs)
    app.router.add_get(ADMIN + "/metrics", metrics_json)
    app.router.add_get(ADMIN + "/status", status)
    app.router.add_get(ADMIN + "/models", models)
    app.router.add_get(ADMIN + "/events", events)
    app.router.add_get(ADMIN + "/models/{model}/logs", logs)
    app.router.add_get(ADMIN + "/models/{model}", model)
    app.router.add_post(ADMIN + "/models/{model}/{action}", model_action)
    app.router.add_get("/metrics", metrics)
    admin_telemetry.add_telemetry_routes(app)
