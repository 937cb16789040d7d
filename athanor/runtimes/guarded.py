"""Run an MLX server (mlx_lm.server, mlx_vlm.server) in this process, refusing every request without the secret.

    python guarded.py --secret-file FILE -- /path/to/mlx_lm.server ARGS...

The MLX servers check no key and answer any Origin (mlx_lm.server sends ``Access-Control-Allow-Origin: *``), so any
web page the user visits could read completions from their loopback port. This launcher reads the secret athanor
wrote for this start (``athanor/runtimes/secret.py``), hooks the HTTP layer the server is built on, then runs the
server's own console script in this same process (``runpy``): the pid, the signals and the supervisor's stop are
the server's. Every request, whatever its method or path, needs ``Authorization: Bearer <secret>`` or
``X-Api-Key: <secret>``; any other gets 401 (no CORS headers: a browser sees a network error) and the connection
is closed. Responses to the gateway lose their ``Access-Control-*`` headers too: nobody else reads them.

Two hooks, one per HTTP layer the MLX servers use:
- ``http.server`` (mlx_lm.server's ``APIHandler``): ``BaseHTTPRequestHandler.parse_request``, which every request
  passes through before its ``do_<METHOD>`` runs, whatever the handler class is called;
- uvicorn (mlx_vlm.server's FastAPI app): ``uvicorn.config.Config.load``, which builds the ASGI app uvicorn serves;
  the app is wrapped in an ASGI middleware outside all of the app's own. Installed when uvicorn.config is first
  imported, so a server that does not use uvicorn never loads it.
Tested with mlx-lm 0.32.2, mlx-vlm 0.7.10 and uvicorn 0.55.0 (the pins in pyproject.toml; tests/test_runtime_secret.py).

Only the standard library: this runs under the Python of the server's shebang, which need not have athanor.
"""

from __future__ import annotations

import hmac
import importlib.abc
import importlib.util
import json
import os
import runpy
import shutil
import sys
from collections.abc import Callable
from typing import Any

if sys.path and os.path.abspath(sys.path[0] or ".") == os.path.dirname(os.path.abspath(__file__)):
    del sys.path[0]  # run as a file: athanor/runtimes/ must not shadow top-level modules of the server's

USAGE = "usage: guarded.py --secret-file FILE -- SERVER_SCRIPT [ARGS...]"
MAX_DRAINED_BODY = 1 << 20  # a refused request's body is read (up to this) so the close does not reset the 401
REFUSAL = json.dumps({"error": {"message": "this runtime answers athanor's gateway only; send requests to the "
                                           "gateway's port", "type": "authentication_error", "code": 401}}).encode()


def authorized(header: Callable[[str], str | None], secret: bytes) -> bool:
    """Whether a request carries the secret: ``Authorization: Bearer <secret>`` or ``X-Api-Key: <secret>``
    (``header`` looks a header up by its lower-case name). Compared in constant time."""
    bearer = header("authorization") or ""
    if bearer[:7].lower() == "bearer " and hmac.compare_digest(bearer[7:].strip().encode(), secret):
        return True
    key = header("x-api-key")
    return key is not None and hmac.compare_digest(key.strip().encode(), secret)


def guard_http_server(secret: bytes) -> None:
    """Every ``http.server`` handler in this process refuses requests without the secret and sends no CORS."""
    from http.server import BaseHTTPRequestHandler

    parse_request = BaseHTTPRequestHandler.parse_request
    send_header = BaseHTTPRequestHandler.send_header

    def guarded_parse_request(self: BaseHTTPRequestHandler) -> bool:
        if not parse_request(self):
            return False  # a malformed request: http.server has answered it already
        if authorized(lambda name: self.headers.get(name), secret):
            return True
        _refuse_http(self)
        return False  # the handler's do_<METHOD> never runs

    def guarded_send_header(self: BaseHTTPRequestHandler, keyword: str, value: str) -> None:
        if not keyword.lower().startswith("access-control-"):
            send_header(self, keyword, value)

    BaseHTTPRequestHandler.parse_request = guarded_parse_request  # type: ignore[method-assign]
    BaseHTTPRequestHandler.send_header = guarded_send_header  # type: ignore[method-assign]


def _refuse_http(handler: Any) -> None:
    handler.close_connection = True
    try:
        length = int(handler.headers.get("Content-Length") or 0)
    except ValueError:
        length = 0
    if 0 < length <= MAX_DRAINED_BODY:
        handler.rfile.read(length)
    handler.send_response(401)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(REFUSAL)))
    handler.send_header("Connection", "close")
    handler.end_headers()
    if handler.command != "HEAD":
        handler.wfile.write(REFUSAL)


class AsgiGuard:
    """ASGI middleware: refuses HTTP and WebSocket connections without the secret; strips CORS from answers."""

    def __init__(self, app: Any, secret: bytes):
        self.app = app
        self.secret = secret

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)  # lifespan: the server's own start-up and shutdown
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers") or ()}
        if not authorized(headers.get, self.secret):
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
                return
            await send({"type": "http.response.start", "status": 401,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(REFUSAL)).encode()), (b"connection", b"close")]})
            await send({"type": "http.response.body", "body": REFUSAL if scope.get("method") != "HEAD" else b""})
            return

        async def send_without_cors(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                kept = [(k, v) for k, v in message.get("headers") or () if not k.lower().startswith(b"access-control-")]
                message = {**message, "headers": kept}
            await send(message)

        await self.app(scope, receive, send_without_cors)


def guard_uvicorn(secret: bytes) -> None:
    """Every ASGI app uvicorn serves in this process is wrapped in ``AsgiGuard``."""

    def patch(config_module: Any) -> None:
        config = config_module.Config
        load = config.load  # an AttributeError here fails the server's start: never serve unguarded

        def guarded_load(self: Any) -> None:
            load(self)
            self.loaded_app = AsgiGuard(self.loaded_app, secret)

        config.load = guarded_load

    if "uvicorn.config" in sys.modules:
        patch(sys.modules["uvicorn.config"])
    else:
        sys.meta_path.insert(0, _AfterImport("uvicorn.config", patch))


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs ``patch`` on module ``name`` right after it is first imported, if it ever is."""

    def __init__(self, name: str, patch: Callable[[Any], None]):
        self.name = name
        self.patch = patch

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)  # the usual finders, now without this one
        if spec is None or spec.loader is None:
            return spec
        exec_module, patch = spec.loader.exec_module, self.patch

        def exec_and_patch(module: Any) -> None:
            exec_module(module)
            patch(module)

        spec.loader.exec_module = exec_and_patch  # type: ignore[method-assign]
        return spec


def read_secret(path: str) -> bytes:
    with open(path, "rb") as fh:
        secret = fh.read().strip()
    if not secret:
        raise ValueError("the file is empty")
    return secret


def main(argv: list[str]) -> None:
    if len(argv) < 4 or argv[0] != "--secret-file" or argv[2] != "--":
        sys.exit(f"guarded: {USAGE}")
    secret_file, script, args = argv[1], argv[3], argv[4:]
    if os.sep not in script:  # a bare name (a container image's PATH): the console script it names
        script = shutil.which(script) or script
    try:
        secret = read_secret(secret_file)
    except (OSError, ValueError) as exc:
        sys.exit(f"guarded: cannot read the runtime secret {secret_file}: {getattr(exc, 'strerror', None) or exc}")
    try:
        with open(script, "rb") as fh:
            compile(fh.read(), script, "exec")
    except OSError as exc:
        sys.exit(f"guarded: cannot read the server {script}: {exc.strerror or exc}")
    except (SyntaxError, ValueError):
        sys.exit(f"guarded: {script} is not a Python script; the MLX servers are console scripts, and this runs "
                 "them in its own process")
    os.umask(0o077)  # what the server writes is private: mlx-vlm's cache shards (conversations) are 0644 otherwise
    guard_http_server(secret)
    guard_uvicorn(secret)
    sys.argv = [script, *args]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
