"""Ollama's API on the gateway: where each path is answered.

Model requests (``POST /api/chat``, ``/api/generate``, ``/api/embed``, ``/api/embeddings``) are answered in the
front door, like ``/v1``: ``OllamaFront`` checks the guard, resolves the name, translates the body
(``shapes.py``) and hands it to the same proxy as ``/v1`` through an ``OllamaExchange``. Everything else
(``GET /`` and ``HEAD /``, ``/api/version``, ``/api/tags``, ``/api/ps``, ``/api/show``, ``/api/pull``, and the
operations athanor does its own way) is an aiohttp route added by ``add_routes``. Errors are Ollama's
``{"error": "..."}`` with its status codes, from the gateway's guard included.

``keep_alive`` follows Ollama: 0 unloads the model once the request is answered (a request with nothing to
generate only unloads it: Open WebUI's eject), a duration becomes the model's idle limit until it next unloads,
a negative one keeps it loaded; a request with nothing to generate and no ``keep_alive: 0`` loads the model.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web

from athanor.errors import ServingError
from athanor.ollama import listing, shapes
from athanor.ollama.exchange import JSON, OllamaExchange

if TYPE_CHECKING:
    from athanor.controller.controller import Controller
    from athanor.controller.instance import Instance
    from athanor.ingress.guard import Guard
    from athanor.ingress.proxy import Proxy
    from athanor.ingress.wire import Request
    from athanor.store import Store

log = logging.getLogger("athanor.ingress")

# The Ollama API level athanor answers as. Clients gate on it: VS Code Copilot Chat refuses a server below 0.6.4.
OLLAMA_VERSION = "0.12.0"
MODEL_POSTS = {"/api/chat": "chat", "/api/generate": "generate", "/api/embed": "embed",
               "/api/embeddings": "embeddings"}
ROOT_TEXT = "Ollama is running"
INSTEAD = {
    "delete": "athanor keeps models in its registry: `athanor delete model NAME` removes one (and, asked to, its "
              "files)",
    "copy": "athanor names a model once and adds aliases: list them in the model's spec.aliases and `athanor apply`",
    "create": "athanor has no Modelfiles: a model is a spec with a preset and a recipe, applied with "
              "`athanor apply -f FILE`",
    "push": "athanor does not push models; it pulls them from Hugging Face (`athanor pull ORG/REPO`)",
    "blobs": "athanor has no blob store; `athanor pull ORG/REPO` fetches weights from Hugging Face",
}


def resolve(controller: Controller, requested: str, *, refresh: bool = True) -> str | None:
    """A model's name from an Ollama name: as on ``/v1`` (name, alias, HF id), or without ``:latest``, or the
    name it was pulled by (``hf.co/ORG/REPO[:QUANT]``, ``pull.py``)."""
    for candidate in shapes.candidates(requested):
        name = controller.resolve(candidate, refresh=refresh)
        if name is not None:
            return name
    return _pulled_as(controller, requested)


def _pulled_as(controller: Controller, requested: str) -> str | None:
    """The model a pull name registered: from that Hub repo and, with a tag, of that quantization (the one model
    of the repo without a tag, when there is just one)."""
    from athanor.errors import InvalidValueError
    from athanor.ollama.pull import hub_repo

    if "/" not in requested:
        return None
    try:
        repo, tag = hub_repo(requested)
    except InvalidValueError:
        return None
    found = [name for name, obj in sorted(controller.doc()["models"].items())
             if (obj["spec"]["source"].get("hf") or {}).get("repo") == repo
             and (tag is None or str(((obj.get("artifact") or {}).get("metadata") or {}).get("quantization", "")
                                     ).upper() == tag.upper())]
    return found[0] if len(found) == 1 else None


def not_found(requested: str) -> str:
    return f"model {requested[:100]!r} not found; GET /api/tags lists the models athanor serves"


# ---------------------------------------------------------------------------------------------- model requests


class OllamaFront:
    """The front door's handler for Ollama's model requests (``wire.Front``'s ``posts``)."""

    def __init__(self, controller: Controller, proxy: Proxy, guard: Guard):
        self.controller, self.proxy, self.guard = controller, proxy, guard

    async def __call__(self, request: Request) -> None:
        kind = MODEL_POSTS[request.path]
        clock = shapes.Clock()
        controller = self.controller
        gateway = controller.gateway(refresh=False)  # the front door read the desired state for this request
        refused = self.guard.refusal(request, self.guard.policy(gateway), gateway["auth"])
        if refused is not None:
            headers = [("WWW-Authenticate", "Bearer")] if refused[0] == 401 else []
            await _error(request, refused[0], refused[1], headers)
            return
        try:
            body = json.loads(request.body.decode()) if request.body else None
            if not isinstance(body, dict):
                raise shapes.BadRequest("the request body must be a JSON object")
            requested = shapes.model_name(body)
            keep_alive = shapes.keep_alive_seconds(body.get("keep_alive"))
        except (ValueError, RecursionError) as exc:  # BadRequest, bad JSON, bad UTF-8
            await _error(request, 400, str(exc) if isinstance(exc, shapes.BadRequest) else
                         f"request body is not valid JSON: {exc}")
            return
        name = resolve(controller, requested, refresh=False)
        obj = controller.model(name) if name is not None else None
        if name is None or obj is None:
            await _error(request, 404, not_found(requested))
            return
        try:
            translated = _translate(kind, body, name)
        except shapes.BadRequest as exc:
            await _error(request, 400, str(exc))
            return
        if translated.num_ctx is not None:
            problem = _context_problem(controller, name, obj, translated.num_ctx)
            if problem:
                await _error(request, 400, problem)
                return
        if _nothing_to_generate(kind, body):
            await self._load_or_unload(request, kind, name, requested, keep_alive)
            return
        inst = controller.instance(name)
        clock.waited = _waited(inst, clock.arrived, controller.serving(inst))
        exchange = OllamaExchange(request, translated.route, json.dumps(translated.body).encode(), kind=kind,
                                  model=requested, stream=translated.stream, clock=clock)
        await self.proxy(exchange)
        if exchange.status == 200 and keep_alive is not None:
            await _keep_alive(controller, inst, keep_alive)

    async def _load_or_unload(self, request: Request, kind: str, name: str, requested: str,
                              keep_alive: float | None) -> None:
        """A request with nothing to generate: unload the model (``keep_alive: 0``), else load it."""
        controller = self.controller
        if keep_alive == 0:
            await controller.stop(name)
            reason = "unload"
        else:
            try:
                async with controller.use(name) as lease:
                    await lease.acquire()
            except ServingError as exc:
                from athanor.ingress.proxy import serving_status

                status, message, _code = serving_status(exc)
                await _error(request, status, message)
                return
            if keep_alive is not None:
                await _keep_alive(controller, controller.instance(name), keep_alive)
            reason = "load"
        out: dict[str, Any] = {"model": requested, "created_at": shapes.now_rfc3339()}
        if kind == "generate":
            out["response"] = ""
        else:
            out["message"] = {"role": "assistant", "content": ""}
        out.update({"done": True, "done_reason": reason})
        await request.respond(200, JSON, json.dumps(out).encode())


def _translate(kind: str, body: dict[str, Any], name: str) -> shapes.Translated:
    if kind == "chat":
        return shapes.chat_request(body, name)
    if kind == "generate":
        return shapes.generate_request(body, name)
    return shapes.embed_request(body, name, legacy=kind == "embeddings")


def _nothing_to_generate(kind: str, body: dict[str, Any]) -> bool:
    """Ollama's load (and, with ``keep_alive: 0``, unload) request: a chat without messages, a generate without
    a prompt or images."""
    if kind == "chat":
        return not body.get("messages")
    if kind == "generate":
        return not body.get("prompt") and not body.get("images")
    return False


def _context_problem(controller: Controller, name: str, obj: dict[str, Any], num_ctx: int) -> str | None:
    """``num_ctx`` larger than the context the model is served with: said, not silently cut."""
    from athanor import fit

    served = fit.estimate_model(controller.doc(), obj).context
    if served and num_ctx > served:
        return (f"options.num_ctx {num_ctx} is larger than the {served}-token context model {name!r} is served with; "
                f"raise its ctxSize preset (athanor describe model {name}) or ask for at most {served}")
    return None


def _waited(inst: Instance, arrived: float, ready: bool) -> Callable[[], float]:
    """How long the request waited for its model: nothing if it served on arrival, else until it became ready."""
    if ready:
        return lambda: 0.0

    def waited() -> float:
        if inst.load_seconds is None:
            return 0.0
        return max(inst.starting_since + inst.load_seconds - arrived, 0.0)

    return waited


async def _keep_alive(controller: Controller, inst: Instance, seconds: float) -> None:
    """After a request was answered: 0 unloads now, anything else is the model's idle limit until it unloads."""
    if seconds == 0:
        await controller.stop(inst.name)
    else:
        inst.keep_alive = seconds


async def _error(request: Request, status: int, message: str, headers: list[tuple[str, str]] | None = None) -> None:
    await request.respond(status, [*JSON, *(headers or [])], json.dumps({"error": message}).encode())


# ---------------------------------------------------------------------------------------------- the rest


def ollama_error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def add_routes(app: web.Application, controller: Controller, store: Store | None,
               preflight: Callable[[web.Request], Awaitable[web.Response]]) -> None:
    """Ollama's paths other than the model requests, on the gateway's aiohttp application, and a CORS preflight
    (``preflight``) on each of Ollama's paths; any other path under /api is a 404, as Ollama answers it."""

    async def root(request: web.Request) -> web.Response:
        return web.Response(text=ROOT_TEXT)

    async def version(request: web.Request) -> web.Response:
        return web.json_response({"version": OLLAMA_VERSION})

    async def tags(request: web.Request) -> web.Response:
        return web.json_response(listing.tags(controller))

    async def ps(request: web.Request) -> web.Response:
        return web.json_response(listing.ps(controller))

    async def show(request: web.Request) -> web.Response:
        try:
            body = await request.json()
            if not isinstance(body, dict):
                raise shapes.BadRequest("the request body must be a JSON object")
            requested = shapes.model_name(body)
        except (ValueError, RecursionError) as exc:
            return ollama_error(400, str(exc) if isinstance(exc, shapes.BadRequest) else
                                f"request body is not valid JSON: {exc}")
        name = resolve(controller, requested)
        obj = controller.model(name) if name is not None else None
        if name is None or obj is None or not obj.get("artifact"):
            return ollama_error(404, not_found(requested))
        return web.json_response(await asyncio.to_thread(listing.show, controller.doc(), name, obj))

    async def pull(request: web.Request) -> web.StreamResponse:
        from athanor.ollama import pull as pulling

        if store is None:
            return ollama_error(501, "this gateway has no store to pull into")
        return await pulling.handle(request, store)

    def instead(what: str) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def refuse(request: web.Request) -> web.Response:
            return ollama_error(501, f"{what} is not part of athanor's Ollama API: {INSTEAD[what]}")

        return refuse

    app.router.add_get("/", root)
    app.router.add_get("/api/version", version)
    app.router.add_get("/api/tags", tags)
    app.router.add_get("/api/ps", ps)
    app.router.add_post("/api/show", show)
    app.router.add_post("/api/pull", pull)
    app.router.add_delete("/api/delete", instead("delete"))
    app.router.add_post("/api/copy", instead("copy"))
    app.router.add_post("/api/create", instead("create"))
    app.router.add_post("/api/push", instead("push"))
    app.router.add_route("*", "/api/blobs/{digest}", instead("blobs"))
    for path in sorted({*MODEL_POSTS, "/api/version", "/api/tags", "/api/ps", "/api/show", "/api/pull",
                        "/api/delete", "/api/copy", "/api/create", "/api/push"}):
        app.router.add_route("OPTIONS", path, preflight)
