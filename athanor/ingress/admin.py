"""The admin API the CLI talks to (``athanor start|stop|restart``, status), under ``/athanor/v1``.

It changes what runs, so the guard (``guard.py``) lets only loopback peers and no web page reach it.
"""

from __future__ import annotations

import os

from aiohttp import web

from athanor.errors import ModelUnavailable
from athanor.ingress.app import CONTROLLER, error_response, short

ADMIN = "/athanor/v1"
ACTIONS = ("start", "stop", "restart")


async def model_action(request: web.Request) -> web.Response:
    controller = request.app[CONTROLLER]
    requested, action = request.match_info["model"], request.match_info["action"]
    if action not in ACTIONS:
        return error_response(404, f"unknown action {short(action)}: {', '.join(ACTIONS)}", "unknown_action")
    name = controller.resolve(requested)
    if name is None:
        return error_response(404, f"model {short(requested)} not found", "model_not_found")
    try:
        await getattr(controller, action)(name)
    except ModelUnavailable as exc:
        return error_response(503, str(exc), "model_unavailable")
    inst = controller.instance(name)
    await controller.recorded()  # the CLI reads state.json next: let it see this change
    return web.json_response({"name": name, "phase": inst.phase.value, "message": inst.message})


async def status(request: web.Request) -> web.Response:
    return web.json_response({"pid": os.getpid(), **request.app[CONTROLLER].status()})


def add_admin_routes(app: web.Application) -> None:
    app.router.add_post(ADMIN + "/models/{model}/{action}", model_action)
    app.router.add_get(ADMIN + "/status", status)
